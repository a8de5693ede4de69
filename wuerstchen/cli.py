"""Command line: ``python -m wuerstchen generate …`` and ``python -m wuerstchen tiny-models DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _parser() -> argparse.ArgumentParser:
    from .sampling import SAMPLERS

    p = argparse.ArgumentParser(prog="python -m wuerstchen", description="Stable Cascade (Würstchen v3) text-to-image.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images with the whole cascade")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default="", help="negative prompt (default: empty, as the official notebook)")
    g.add_argument("--models", required=True, help="folder holding the weight files (found by content, any layout)")
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
    g.add_argument("--stage-c-variant", choices=["full", "lite"], default=None)
    g.add_argument("--stage-b-variant", choices=["full", "lite"], default=None)
    g.add_argument("--dtype", choices=list(DTYPES), default="auto",
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


def _load_image(path: str) -> torch.Tensor:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float() / 255.0
    return arr.permute(2, 0, 1).unsqueeze(0)


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

    files = CascadeFiles.from_dir(args.models, args.stage_c_variant, args.stage_b_variant)
    manager = ModelManager(dtype=DTYPES[args.dtype], device=args.device, memory_budget=args.vram_budget)
    cascade = Cascade(files, manager, root=args.models)
    image = _load_image(args.image) if args.image else None
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
            compression=args.compression, progress=progress,
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
