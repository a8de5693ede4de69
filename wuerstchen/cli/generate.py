"""``python -m wuerstchen generate``: the whole cascade (Stable Cascade or Würstchen v2) from the command line.

The options and their checks live in :mod:`wuerstchen.options.generate` (batch jobs take the same);
this module only runs a checked request and writes the pictures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..files.management import WEIGHT_DTYPES
from .common import RUN_ERRORS, close_bars, files_and_family, report_failure
from ..options.generate import (FAMILY_FLAGS, UsageError, _check_request, _or, _parse_inputs, _parse_settings,
                                _progress_bars, _save_images, add_generate_arguments, v2_settings)


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate images with the whole cascade")
    add_generate_arguments(g)
    g.set_defaults(func=run)


def run(args) -> int:
    return cmd_generate(args)


def cmd_generate(args) -> int:
    from ..pipeline.cascade import Cascade, MissingWeightsError
    from ..files.management import ModelManager
    from ..pipeline.stages import OFFICIAL_COMPRESSION

    try:
        _check_request(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        files, family, note = files_and_family(args)
    except MissingWeightsError as exc:
        return report_failure(exc)
    v2 = family == FAMILY_FLAGS["v2"]
    try:
        if v2:
            prior, decoder, denoise = v2_settings(args, args.image is not None)
        else:
            stage_c, stage_b = _parse_settings(args, args.image is not None)
        image, loras, controls = _parse_inputs(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if note:
        print(f"note: {note}", file=sys.stderr)
    manager = ModelManager(dtype=WEIGHT_DTYPES[args.dtype], device=args.device, memory_budget=args.vram_budget)
    embeddings = args.embeddings or str(Path(args.models) / "embeddings")
    progress, bars = _progress_bars()
    try:
        if v2:
            images = _generate_v2(args, files, manager, embeddings, image, prior, decoder, denoise, progress)
        else:
            cascade = Cascade(files, manager, root=args.models, embeddings=embeddings)
            images = cascade.generate(
                args.prompt, args.negative, width=args.width, height=args.height, batch=args.batch, seed=args.seed,
                stage_c=stage_c, stage_b=stage_b, image=image, image_mode="variation" if args.variation else "img2img",
                compression=_or(args.compression, OFFICIAL_COMPRESSION), loras=loras, controls=controls,
                progress=progress,
            )
    except RUN_ERRORS as exc:
        return report_failure(exc)
    finally:
        close_bars(bars)
    paths, all_there = _save_images(images, args.out)
    for path in paths:
        print(f"wrote {path}")
    return 0 if all_there else 1


def _generate_v2(args, files, manager, embeddings, image, prior, decoder, denoise, progress) -> torch.Tensor:
    from ..pipeline.cascade_v2 import CascadeV2
    from ..pipeline.stages_v2 import output_size

    real = output_size(args.height, args.width)
    if real != (args.height, args.width):
        print(f"note: Würstchen v2 makes {real[1]}x{real[0]} for {args.width}x{args.height} (its latent sizes "
              "are fixed fractions of the image)", file=sys.stderr)
    cascade = CascadeV2(files, manager, root=args.models, embeddings=embeddings)
    return cascade.generate(args.prompt, args.negative, width=args.width, height=args.height, batch=args.batch,
                            seed=args.seed, prior=prior, decoder=decoder, image=image, denoise=denoise,
                            progress=progress)
