"""``python -m wuerstchen train-lora``: a Stage C LoRA from a folder of pictures and captions.

Official recipe (see :mod:`wuerstchen.train`); every value is checked, and the folder read and
checked, before any model loads. ``--save-every N`` writes a checkpoint (``OUT.ckpt``) every N
updates; ``--resume CKPT`` continues one to the same result as an uninterrupted run. Ctrl-C keeps
the last checkpoint and also writes the LoRA trained so far.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..files.management import WEIGHT_DTYPES


def register(subparsers) -> None:
    t = subparsers.add_parser("train-lora", help="train a Stage C LoRA on a folder of pictures + .txt captions")
    t.add_argument("--models", required=True, help="folder holding the weight files (Stage C, CLIP-G, effnet)")
    t.add_argument("--data", required=True, help="folder of name.png|jpg|webp pictures with name.txt captions")
    t.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    t.add_argument("--steps", type=int, default=1000, help="optimizer updates (default 1000)")
    t.add_argument("--rank", type=int, default=4, help="LoRA rank (official 4)")
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (official 1e-4)")
    t.add_argument("--warmup", type=int, default=1, help="linear warm-up updates (official 1)")
    t.add_argument("--batch", type=int, default=1, help="pictures per micro-batch (one aspect bucket)")
    t.add_argument("--accum", type=int, default=1, help="micro-batches per update (gradient accumulation)")
    t.add_argument("--resolution", type=int, default=768, help="bucket resolution (official 768; multiple of 32)")
    t.add_argument("--filters", default=".attn", help="comma-separated module name filters (official .attn)")
    t.add_argument("--token", action="append", default=[], metavar="'[name]:REGEX' | REGEX",
                   help="learn a new word [name] starting as the mean of the tokens matching REGEX, or learn "
                        "the existing tokens matching REGEX; repeatable")
    t.add_argument("--text-dropout", type=float, default=0.05, help="share of empty captions (official 0.05)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast (auto: bf16 on CUDA when supported, fp32 on CPU); LoRA weights stay fp32")
    t.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false",
                   help="keep all activations (faster, much more memory)")
    t.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N updates")
    t.add_argument("--resume", default=None, help="continue from this checkpoint (same settings)")
    t.add_argument("--log", default=None, help="write one JSON line per update (step, loss, ...) to this file")
    t.add_argument("--stage-c-variant", choices=["full", "lite"], default=None)
    t.add_argument("--dtype", choices=list(WEIGHT_DTYPES), default="auto", help="dtype the base weights load in")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    t.set_defaults(func=run)


def _config(args):
    from ..options.generate import UsageError
    from ..train import TrainConfig, TokenSpec

    try:
        tokens = tuple(TokenSpec.parse(t) for t in args.token)
        return TrainConfig(steps=args.steps, rank=args.rank, lr=args.lr, warmup=args.warmup, batch=args.batch,
                           accum=args.accum, resolution=args.resolution,
                           module_filters=tuple(f for f in args.filters.split(",") if f), tokens=tokens,
                           text_dropout=args.text_dropout, seed=args.seed, precision=args.precision,
                           gradient_checkpointing=args.checkpointing)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check(args):
    """Everything the command line names, before any model loads: (config, examples)."""
    from ..options.generate import UsageError, _writable_folder
    from ..inputs.limits import RequestError, check_device
    from ..train import read_folder
    from ..train.dataset import check_examples

    models = Path(args.models)
    if not models.is_dir():
        raise UsageError(f"--models {args.models!r} {'is a file' if models.exists() else 'does not exist'}; "
                         "give the folder that holds the weight files")
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise UsageError(f"--out {args.out!r}: end it with .safetensors")
    if out.is_dir():
        raise UsageError(f"--out {args.out!r} is a folder; give a file name such as my_lora.safetensors")
    _writable_folder(out.parent if str(out.parent) else Path("."), "--out")
    if args.resume is not None and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume!r}: no such checkpoint")
    if args.save_every < 0:
        raise UsageError("--save-every must be 0 (off) or a number of updates")
    if args.log is not None:
        _writable_folder(Path(args.log).parent if str(Path(args.log).parent) else Path("."), "--log")
    config = _config(args)
    try:
        check_device(args.device, "--device")
    except RequestError as exc:
        raise UsageError(str(exc)) from None
    try:
        examples = read_folder(args.data)
        check_examples(examples, config.resolution)
    except RequestError as exc:
        raise UsageError(f"--data {args.data!r}: {exc}") from None
    return config, examples


def run(args) -> int:
    from tqdm import tqdm

    from ..pipeline.cascade import CascadeFiles, FolderCascade, MissingWeightsError
    from ..options.generate import UsageError
    from ..inputs.limits import RequestError
    from ..files.management import ModelManager
    from ..train import save_lora
    from ..train.session import encode_dataset, train

    try:
        config, examples = _check(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = CascadeFiles.from_dir(args.models, args.stage_c_variant)
    cascade = FolderCascade(files, ModelManager(dtype=WEIGHT_DTYPES[args.dtype], device=args.device),
                            root=args.models)
    try:
        effnet, stage_c, text = cascade.model("effnet"), cascade.model("stage_c"), cascade.model("clip_text")
    except MissingWeightsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    out = Path(args.out)
    checkpoint = out.with_name(out.name + ".ckpt") if args.save_every else None
    log = open(args.log, "a", encoding="utf-8") if args.log else None
    bar = tqdm(total=config.steps, unit="step", desc="train-lora")
    holder = {}

    def on_step(step, total, record):
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        bar.update(step - bar.n)
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def ready(trainer):
        holder["trainer"] = trainer
        bar.n = trainer.step
        bar.refresh()

    try:
        data = encode_dataset(cascade.manager, effnet, examples, config.resolution)
        trainer = train(cascade.manager, stage_c, text, data, config, on_step=on_step, checkpoint=checkpoint,
                        save_every=args.save_every, resume=args.resume, trainer_ready=ready)
    except KeyboardInterrupt:
        trainer = holder.get("trainer")
        if trainer is not None and trainer.step:
            partial = out.with_name(out.stem + f"_step{trainer.step}.safetensors")
            save_lora(trainer, partial, base_model=files.parts["stage_c"][0].name)
            print(f"\ninterrupted at update {trainer.step}: wrote {partial}"
                  + (f"; last checkpoint {checkpoint}" if checkpoint and checkpoint.exists() else ""), file=sys.stderr)
        return 130
    except (RequestError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, RequestError) else 1
    finally:
        bar.close()
        if log is not None:
            log.close()
    path, meta = save_lora(trainer, out, base_model=files.parts["stage_c"][0].name)
    first = trainer.history[0]["loss"] if trainer.history else float("nan")
    print(f"wrote {path}: {meta['rank']}-rank LoRA on {len(trainer.lora.targets)} Stage C weights, "
          f"{trainer.step} updates on {len(examples)} pictures (loss {first:.4f} -> {trainer.history[-1]['loss']:.4f})")
    return 0
