"""Command line: ``python -m wuerstchen generate …`` and ``python -m wuerstchen tiny-models DIR``.

``generate`` runs the model family whose files it finds in ``--models`` (Stable Cascade, or
Würstchen v2; ``--family v2|v3`` picks one), with that family's official defaults.

``generate`` takes LoRAs (``--lora PATH[:MODEL_STRENGTH[:TEXT_STRENGTH]]``, repeatable: stacked) and
ControlNet hints (``--control KIND=IMAGE[:STRENGTH][:START:END]``, repeatable: chained, ``--mask``
for inpainting). Everything the command line names is read and checked first: a value that cannot
be used (a setting out of range, a file that is not there or not a picture, an output path that
cannot be written, a device this machine lacks, a request that cannot fit in memory) is one
``error:`` line and exit code 2 before any model loads. A finished image is never lost: if it cannot
be written where ``--out`` says after all, it is saved under a safe name and the line says where.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..files.management import WEIGHT_DTYPES

IMG2IMG_DENOISE = 0.6  # the official notebook's img2img strength
# The flags that set each stage's sampler settings (named in refusals).
STAGE_C_FLAGS = {"steps": "--c-steps", "cfg": "--c-cfg", "shift": "--c-shift", "cfg_rho": "--cfg-rho",
                 "sampler": "--sampler", "denoise": "--denoise"}
STAGE_B_FLAGS = {"steps": "--b-steps", "cfg": "--b-cfg", "shift": "--b-shift", "cfg_rho": "--cfg-rho",
                 "sampler": "--b-sampler"}


FAMILY_FLAGS = {"v3": "stable_cascade", "v2": "wuerstchen_v2"}  # --family -> wuerstchen.files.kinds family

# Options that only Stable Cascade has: (dest, flag, why v2 has none).
_STABLE_CASCADE_ONLY = (
    ("compression", "--compression", "the v2 prior latent is always ceil(side / 42.67)"),
    ("c_shift", "--c-shift", "v2 has no schedule shift"),
    ("b_shift", "--b-shift", "v2 has no schedule shift"),
    ("cfg_rho", "--cfg-rho", "v2 guidance is plain CFG"),
    ("b_sampler", "--b-sampler", "v2 has only its own DDPM scheduler"),
    ("stage_c_variant", "--stage-c-variant", "v2 has one prior"),
    ("stage_b_variant", "--stage-b-variant", "v2 has one decoder"),
    ("variation", "--variation", "image variations are a Stable Cascade feature"),
    ("lora", "--lora", "LoRAs are a Stable Cascade feature"),
    ("control", "--control", "ControlNets are a Stable Cascade feature"),
    ("mask", "--mask", "ControlNets are a Stable Cascade feature"),
)


class UsageError(ValueError):
    """A command-line value that cannot be used: reported as one line, exit code 2, before any model loads."""


def add_generate_arguments(g: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``generate`` (and of every batch job): one definition for both."""
    from ..pipeline.control import KINDS
    from ..sampling.samplers import SAMPLERS

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
    g.add_argument("--family", choices=sorted(FAMILY_FLAGS), default=None,
                   help="v3: Stable Cascade, v2: Würstchen v2 (default: the family whose files --models holds; "
                        "Stable Cascade when it holds both)")
    # None = the family's official value (Stable Cascade | Würstchen v2).
    g.add_argument("--compression", type=float, default=None, help="Stage C compression (official 42.67; v3 only)")
    g.add_argument("--c-steps", type=int, default=None,
                   help="Stage C / prior steps (v3: 20; v2: the hub's 29-step grid, or N uniform steps, e.g. 60)")
    g.add_argument("--c-cfg", type=float, default=None, help="Stage C / prior guidance (official 4 for both)")
    g.add_argument("--c-shift", type=float, default=None, help="Stage C schedule shift (official 2; v3 only)")
    g.add_argument("--b-steps", type=int, default=None, help="Stage B / decoder steps (v3: 10, v2: 12)")
    g.add_argument("--b-cfg", type=float, default=None,
                   help="Stage B / decoder guidance (v3: 1.1; v2: 0 = off, guidance needs > 1)")
    g.add_argument("--b-shift", type=float, default=None, help="Stage B schedule shift (official 1; v3 only)")
    g.add_argument("--cfg-rho", type=float, default=None, help="official CFG rescale 0.7 (0 = plain CFG; v3 only)")
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="sampler for both stages (default ddpm; v2 has only its own DDPM scheduler)")
    g.add_argument("--b-sampler", choices=SAMPLERS, default=None, help="Stage B sampler (default: --sampler)")
    g.add_argument("--image", default=None, help="input image for img2img or --variation")
    g.add_argument("--variation", action="store_true", help="use --image as an image variation reference")
    g.add_argument("--denoise", type=float, default=None,
                   help=f"img2img strength in (0, 1], with --image (default {IMG2IMG_DENOISE}, the official notebook's)")
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

    return g


def generate_parser() -> argparse.ArgumentParser:
    """A stand-alone parser of generate's options (used to read batch jobs)."""
    return add_generate_arguments(argparse.ArgumentParser(prog="python -m wuerstchen generate"))


def _gib(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB (e.g. 4 or 5.5), got {text!r}")
    return int(value * (1 << 30))


def _load_image(path: str, mode: str = "RGB", what: str = "--image") -> torch.Tensor:
    """[1, C, H, W] in [0, 1] (C = 3 for RGB, 1 for a grey mask), 16-bit and float pictures scaled."""
    from ..inputs.images import read_image
    from ..inputs.limits import RequestError

    try:
        return read_image(path, mode, what)
    except RequestError as exc:
        raise UsageError(str(exc)) from None


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
    """``PATH[:MODEL_STRENGTH[:TEXT_STRENGTH]]`` -> a loaded :class:`~wuerstchen.pipeline.stages.LoraUse`."""
    from ..pipeline.stages import LoraUse
    from ..storage.weights_io import WeightFileError

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
    """``KIND=IMAGE[:STRENGTH][:START:END]`` -> a :class:`~wuerstchen.pipeline.control.Control`."""
    from ..pipeline.control import KINDS, Control

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


def _writable_folder(path: Path, what: str) -> None:
    """Refuse a folder that cannot be made or written: its nearest existing ancestor must be a
    writable folder (nothing is created here)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{what}: {str(probe)!r} is a file, so no folder can be made there")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: the folder {str(probe)!r} is not writable")


def check_out(out: str) -> Path:
    """The ``--out`` path, refused (before any work) when it is a folder, lacks a picture suffix
    Pillow can write, or its folder cannot be written. Nothing is created."""
    from PIL import Image

    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        raise UsageError(f"--out {out!r} is a folder; give a file name such as {str(path / 'image.png')!r}")
    Image.init()
    suffix = path.suffix.lower()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if suffix not in writable:
        found = f"the suffix {path.suffix!r}" if suffix else "no suffix"
        raise UsageError(f"--out {out!r} has {found}; end it with .png (or another picture type: .jpg, .webp, "
                         ".tif, .bmp)")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"--out {out!r}: the file exists and is not writable")
    _writable_folder(path.parent, f"--out {out!r}")
    return path


def _parse_settings(args, image_given: bool):
    """Stable Cascade's two stages' settings (the options given, else the official values), each
    refused by the flag that set it."""
    from ..inputs.limits import RequestError, check_sampling
    from ..pipeline.stages import StageBSettings, StageCSettings

    denoise = _denoise(args, image_given)
    C, B = StageCSettings, StageBSettings  # their defaults are the official values
    sampler = _or(args.sampler, C.sampler)
    c = dict(steps=_or(args.c_steps, C.steps), cfg=_or(args.c_cfg, C.cfg), shift=_or(args.c_shift, C.shift),
             sampler=sampler, cfg_rho=_or(args.cfg_rho, C.cfg_rho), denoise=denoise)
    b = dict(steps=_or(args.b_steps, B.steps), cfg=_or(args.b_cfg, B.cfg), shift=_or(args.b_shift, B.shift),
             sampler=args.b_sampler or sampler, cfg_rho=_or(args.cfg_rho, B.cfg_rho))
    try:
        check_sampling("Stage C", **c, names=STAGE_C_FLAGS)
        check_sampling("Stage B", **b, names=STAGE_B_FLAGS)
        return StageCSettings(**c), StageBSettings(**b)
    except RequestError as exc:
        raise UsageError(str(exc)) from None


def _check_request(args) -> None:
    """The command line's own values (folders, output, device, size, batch, compression)."""
    from ..inputs.limits import RequestError, check_batch, check_compression, check_device, check_size

    models = Path(args.models)
    if not models.is_dir():
        problem = "is a file" if models.exists() else "does not exist"
        raise UsageError(f"--models {args.models!r} {problem}; give the folder that holds the weight files")
    if args.embeddings is not None and not Path(args.embeddings).is_dir():
        raise UsageError(f"--embeddings {args.embeddings!r} is not a folder")
    check_out(args.out)
    try:
        check_device(args.device, "--device")
        check_size(args.height, args.width, "--width/--height")
        check_batch(args.batch, "--batch")
        if args.compression is not None:
            check_compression(args.compression, "--compression")
    except RequestError as exc:
        raise UsageError(str(exc)) from None


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


def _save_images(images: torch.Tensor, out: str) -> Tuple[List[Path], bool]:
    """Write the images: (paths written, whether all went where ``out`` says). One that cannot be
    written there after all (the disk filled, the folder went away) is saved as a PNG in the
    temporary folder instead, and a line says where."""
    from PIL import Image

    out_path = Path(out)
    paths, all_there = [], True
    for i, img in enumerate(images):
        arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        path = out_path if len(images) == 1 else out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix}")
        picture = Image.fromarray(arr)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)
        except (OSError, ValueError, KeyError) as exc:
            fallback = Path(tempfile.gettempdir()) / f"wuerstchen-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{i}.png"
            picture.save(fallback)
            print(f"error: could not write {str(path)!r} ({exc.__class__.__name__}: {exc}); the image was saved to "
                  f"{fallback} instead", file=sys.stderr)
            path, all_there = fallback, False
        paths.append(path)
    return paths, all_there


def _progress_bars():
    """(progress callback, the bars it opened): one tqdm bar per stage."""
    from tqdm import tqdm

    bars = {}

    def progress(stage: str, i: int, n: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=n, desc=stage.replace("_", " ").title(), unit="step")
        bar.update(i - bar.n)
        if i >= n:
            bar.close()

    return progress, bars


def _or(value, default):
    return default if value is None else value


def _denoise(args, image_given: bool) -> float:
    if args.variation and not image_given:
        raise UsageError("--variation needs --image (the reference picture to make variations of)")
    if args.denoise is not None and (not image_given or args.variation):
        raise UsageError("--denoise is the img2img strength: it is only used with --image and without --variation")
    return (IMG2IMG_DENOISE if args.denoise is None else args.denoise) if image_given and not args.variation else 1.0


def v2_settings(args, image_given: bool = False) -> tuple:
    """(PriorSettings, DecoderSettings, denoise) for Würstchen v2, refusing the options only Stable
    Cascade has and sizes the v2 decoder cannot make.

    The prior runs the hub's 29-step grid unless ``--c-steps`` asks for N uniform steps; the decoder
    12 steps without guidance unless ``--b-steps``/``--b-cfg`` say otherwise."""
    from ..inputs.limits import RequestError, check_number
    from ..pipeline.stages_v2 import DecoderSettings, PriorSettings, check_size_v2

    for dest, flag, why in _STABLE_CASCADE_ONLY:
        if getattr(args, dest) not in (None, False, []):
            raise UsageError(f"{flag} is a Stable Cascade option and these are Würstchen v2 weights ({why}); "
                             "drop it, or pass --family v3 with Stable Cascade weights")
    if args.sampler not in (None, "ddpm"):
        raise UsageError(f"--sampler {args.sampler}: Würstchen v2 samples with its own DDPM scheduler only "
                         "(--sampler ddpm, or leave it out)")
    denoise = _denoise(args, image_given)
    try:
        check_size_v2(args.height, args.width, where="--width/--height")
        check_number(denoise, "--denoise", above=0, maximum=1, official=IMG2IMG_DENOISE)
        prior = PriorSettings(cfg=_or(args.c_cfg, PriorSettings.cfg), steps=args.c_steps)
        decoder = DecoderSettings(steps=_or(args.b_steps, DecoderSettings.steps), cfg=_or(args.b_cfg, DecoderSettings.cfg))
    except (RequestError, ValueError) as exc:
        message = str(exc)
        for name, flag in (("prior steps", "--c-steps"), ("prior cfg", "--c-cfg"), ("decoder steps", "--b-steps"),
                           ("decoder cfg", "--b-cfg")):
            message = message.replace(name, flag, 1) if message.startswith(name) else message
        raise UsageError(message) from None
    return prior, decoder, denoise
