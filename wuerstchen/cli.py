"""Command line: ``python -m wuerstchen generate …`` and ``python -m wuerstchen tiny-models DIR``.

``generate`` takes LoRAs (``--lora PATH[:MODEL_STRENGTH[:TEXT_STRENGTH]]``, repeatable: stacked) and
ControlNet hints (``--control KIND=IMAGE[:STRENGTH][:START:END]``, repeatable: chained, ``--mask``
for inpainting). Everything the command line names is read and checked first: a value that cannot
be used is one ``error:`` line and exit code 2 before any model loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .management import WEIGHT_DTYPES


class UsageError(ValueError):
    """A command-line value that cannot be used: reported as one line, exit code 2, before any model loads."""


def _parser() -> argparse.ArgumentParser:
    from .control import KINDS
    from .sampling import SAMPLERS

    p = argparse.ArgumentParser(prog="python -m wuerstchen", description="Stable Cascade (Würstchen v3) text-to-image.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images with the whole cascade")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default="", help="negative prompt (default: empty, as the official notebook)")
    g.add_argument("--models", required=True, help="folder holding the weight files (found by content, any layout)")
    g.add_argument("--embeddings", default=None,
                   help="folder of textual-inversion embeddings for embedding:NAME in prompts "
                        "(default: MODELS/embeddings)")
    g.add_argument("--out", required=True, help="output PNG; with --batch > 1, _N is appended")
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compression", type=float, default=42.67, help="Stage C compression (official 42.67)")
    g.add_argument("--c-steps", type=int, default=20)
    g.add_argument("--c-cfg", type=float, default=4.0)
    g.add_argument("--c-shift", type=float, default=2.0)
    g.add_argument("--b-steps", type=int, default=10)
    g.add_argument("--b-cfg", type=float, default=1.1)
    g.add_argument("--b-shift", type=float, default=1.0)
    g.add_argument("--cfg-rho", type=float, default=0.7, help="official CFG rescale (0 = plain CFG)")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="sampler for both stages")
    g.add_argument("--b-sampler", choices=SAMPLERS, default=None, help="Stage B sampler (default: --sampler)")
    g.add_argument("--image", default=None, help="input image for img2img or --variation")
    g.add_argument("--variation", action="store_true", help="use --image as an image variation reference")
    g.add_argument("--denoise", type=float, default=0.6, help="img2img strength (official notebook: 0.6)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:MODEL_STRENGTH[:TEXT_STRENGTH]]",
                   help="apply a LoRA to Stage C (and its text part to CLIP-G); repeat to stack. TEXT_STRENGTH "
                        "defaults to MODEL_STRENGTH, which defaults to 1")
    g.add_argument("--control", action="append", default=[], metavar="KIND=IMAGE[:STRENGTH][:START:END]",
                   help=f"ControlNet hint, KIND one of {', '.join(KINDS)}; repeat to chain. START/END are "
                        "fractions of the Stage C steps run (default 0 and 1); canny takes a picture or an edge map, "
                        "super_resolution the low-resolution image")
    g.add_argument("--mask", default=None, help="inpainting mask image (white = repaint), for --control inpainting")
    g.add_argument("--stage-c-variant", choices=["full", "lite"], default=None)
    g.add_argument("--stage-b-variant", choices=["full", "lite"], default=None)
    g.add_argument("--dtype", choices=list(WEIGHT_DTYPES), default="auto",
                   help="weights dtype; fp8_*: Stage B/C matrix weights in 8 bits, computed in the auto dtype")
    g.add_argument("--vram-budget", type=_gib, default=None, metavar="GB",
                   help="GiB of weights kept on the GPU at once; a larger stage streams its blocks (default: "
                        "as much as is free)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")

    t = sub.add_parser("tiny-models", help="write tiny random checkpoints in every official layout (smoke tests)")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    return p


def _gib(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB (e.g. 4 or 5.5), got {text!r}")
    return int(value * (1 << 30))


def _load_image(path: str, mode: str = "RGB", what: str = "--image") -> torch.Tensor:
    """[1, C, H, W] in [0, 1] (C = 3 for RGB, 1 for a grey mask)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert(mode), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"{what} {path!r}: cannot read the image ({exc.__class__.__name__}: {exc})") from None
    t = torch.from_numpy(arr).float() / 255.0
    return (t[None] if t.dim() == 2 else t.permute(2, 0, 1)).unsqueeze(0)


def _split_numbers(spec: str, most: int, what: str) -> tuple:
    """'name:1:0.5' -> ('name', [1.0, 0.5]): up to ``most`` trailing numbers (paths may hold ':')."""
    parts, numbers = spec.split(":"), []
    while len(parts) > 1 and len(numbers) < most:
        try:
            value = float(parts[-1])
        except ValueError:
            break
        if not np.isfinite(value):
            raise UsageError(f"{what} {spec!r}: {parts[-1]} is not a finite number")
        numbers.insert(0, value)
        parts.pop()
    return ":".join(parts), numbers


def parse_lora(spec: str):
    """``PATH[:MODEL_STRENGTH[:TEXT_STRENGTH]]`` -> a loaded :class:`~wuerstchen.pipeline.LoraUse`."""
    from .pipeline import LoraUse
    from .weights_io import WeightFileError

    path, numbers = _split_numbers(spec, 2, "--lora")
    if not Path(path).is_file():
        raise UsageError(f"--lora {spec!r}: no such file {path!r} (give PATH[:MODEL_STRENGTH[:TEXT_STRENGTH]])")
    model = numbers[0] if numbers else 1.0
    text = numbers[1] if len(numbers) > 1 else model
    try:
        return LoraUse.load(path, model, text)
    except (ValueError, WeightFileError, OSError) as exc:
        raise UsageError(f"--lora {spec!r}: {exc}") from None


def parse_control(spec: str, mask: Optional[torch.Tensor]):
    """``KIND=IMAGE[:STRENGTH][:START:END]`` -> a :class:`~wuerstchen.control.Control`."""
    from .control import KINDS, Control

    kind, sep, rest = spec.partition("=")
    if not sep or kind not in KINDS:
        raise UsageError(f"--control {spec!r}: expected KIND=IMAGE[:STRENGTH][:START:END] with KIND one of "
                         f"{', '.join(KINDS)}")
    path, numbers = _split_numbers(rest, 3, "--control")
    strength, start, end = 1.0, 0.0, 1.0
    if len(numbers) in (1, 3):
        strength = numbers[0]
    if len(numbers) >= 2:
        start, end = numbers[-2:]
    if not Path(path).is_file():
        raise UsageError(f"--control {spec!r}: no such image {path!r}")
    if kind == "inpainting" and mask is None:
        raise UsageError(f"--control {spec!r}: inpainting needs --mask (an image, white = area to repaint)")
    image = _load_image(path, what=f"--control {kind}")
    try:
        return Control(kind, image, mask if kind == "inpainting" else None, strength, start, end)
    except ValueError as exc:
        raise UsageError(f"--control {spec!r}: {exc}") from None


def _parse_inputs(args) -> tuple:
    """Everything the command line names, read and checked before any model loads."""
    image = _load_image(args.image) if args.image else None
    mask = None
    if args.mask:
        if not any(spec.startswith("inpainting=") for spec in args.control):
            raise UsageError("--mask is only used with --control inpainting=IMAGE")
        mask = _load_image(args.mask, "L", "--mask")
    controls = [parse_control(spec, mask) for spec in args.control]
    loras = [parse_lora(spec) for spec in args.lora]
    return image, loras, controls


def _save_images(images: torch.Tensor, out: str) -> List[Path]:
    from PIL import Image

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        path = out_path if len(images) == 1 else out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix or '.png'}")
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from .cascade import Cascade, CascadeFiles, MissingWeightsError
    from .management import ModelManager
    from .pipeline import StageBSettings, StageCSettings

    try:
        image, loras, controls = _parse_inputs(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = CascadeFiles.from_dir(args.models, args.stage_c_variant, args.stage_b_variant)
    manager = ModelManager(dtype=WEIGHT_DTYPES[args.dtype], device=args.device, memory_budget=args.vram_budget)
    embeddings = args.embeddings or str(Path(args.models) / "embeddings")
    cascade = Cascade(files, manager, root=args.models, embeddings=embeddings)
    stage_c = StageCSettings(steps=args.c_steps, cfg=args.c_cfg, shift=args.c_shift, sampler=args.sampler,
                             cfg_rho=args.cfg_rho, denoise=args.denoise if image is not None and not args.variation else 1.0)
    stage_b = StageBSettings(steps=args.b_steps, cfg=args.b_cfg, shift=args.b_shift,
                             sampler=args.b_sampler or args.sampler, cfg_rho=args.cfg_rho)
    bars = {}

    def progress(stage: str, i: int, n: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=n, desc=stage.replace("_", " ").title(), unit="step")
        bar.update(i - bar.n)
        if i >= n:
            bar.close()

    try:
        images = cascade.generate(
            args.prompt, args.negative, width=args.width, height=args.height, batch=args.batch, seed=args.seed,
            stage_c=stage_c, stage_b=stage_b, image=image, image_mode="variation" if args.variation else "img2img",
            compression=args.compression, loras=loras, controls=controls, progress=progress,
        )
    except MissingWeightsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in _save_images(images, args.out):
        print(f"wrote {path}")
    return 0


def cmd_tiny_models(args) -> int:
    from .tiny import write_tiny_models

    written = write_tiny_models(args.dir, seed=args.seed)
    for path in written:
        print(path)
    print(f"wrote {len(written)} tiny random checkpoints to {args.dir} (noise generators for smoke tests, not real models)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        return cmd_generate(args)
    return cmd_tiny_models(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
