"""``python -m wuerstchen edit``: layered editing of a picture on Stable Cascade (DesignEdit's method).

    python -m wuerstchen edit --models DIR --image IN --mask M1 [--mask M2] \\
        --op remove|move:DX,DY|scale:S|flip:h|flip:v|pan:DX,DY|zoomout:F [--prompt TEXT] --out OUT

Masks are pictures of the image's size, white = the object (one per object). The picture, the
masks and the operation are checked before any model loads: a mask of the wrong size, an empty
mask, a move that takes an object off the canvas, an option out of range are one ``error:`` line
and exit code 2. Moves are snapped to whole Stage C cells (about 42 pixels at 1024²); the line
``note:`` says the offset used.
"""

from __future__ import annotations

import re
import sys

from ..files.management import WEIGHT_DTYPES
from .common import RUN_ERRORS, close_bars, report_failure

DEFAULTS = dict(steps=20, refine=3, fuse_at=0.8, dilate=1, cfg=1.0, b_steps=10, b_cfg=1.1, feather=2)


def register(subparsers) -> None:
    from ..editing.operations import SYNTAX

    e = subparsers.add_parser("edit", help="layered editing: remove, move, scale, flip objects; pan or zoom out")
    e.add_argument("--models", required=True, help="folder holding the Stable Cascade weight files")
    e.add_argument("--image", required=True, help="the picture to edit")
    e.add_argument("--mask", action="append", default=[], metavar="MASK",
                   help="a mask picture of the image's size, white = one object; repeat for more objects "
                        "(needed by remove, move, scale, flip; not used by pan, zoomout)")
    e.add_argument("--op", required=True, metavar="OP", help=SYNTAX + " (pixels; right and down positive)")
    e.add_argument("--prompt", default="", help="what the picture shows (helps filling; default empty)")
    e.add_argument("--negative", default="", help="negative prompt (used when --cfg is not 1)")
    e.add_argument("--out", required=True, help="output PNG")
    e.add_argument("--seed", type=int, default=0, help="Stage B noise seed")
    e.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="Stage C inversion and edit steps (20)")
    e.add_argument("--refine", type=int, default=DEFAULTS["refine"],
                   help="fixed-point iterations per inversion step (3; 0 = plain DDIM inversion)")
    e.add_argument("--fuse-at", type=float, default=DEFAULTS["fuse_at"],
                   help="fraction of the steps after which the layers are fused (0.8, the paper's 42/50)")
    e.add_argument("--dilate", type=int, default=DEFAULTS["dilate"], help="Stage C cells added around holes (1)")
    e.add_argument("--cfg", type=float, default=DEFAULTS["cfg"], help="Stage C guidance (1 = none, as the paper)")
    e.add_argument("--hole-seed", type=int, default=None,
                   help="start holes from fresh noise of this seed (default: the inverted noise)")
    e.add_argument("--b-steps", type=int, default=DEFAULTS["b_steps"], help="Stage B steps (official 10)")
    e.add_argument("--b-cfg", type=float, default=DEFAULTS["b_cfg"], help="Stage B guidance (official 1.1)")
    e.add_argument("--b-sampler", choices=["ddpm", "ddim"], default="ddpm", help="Stage B sampler (official ddpm)")
    e.add_argument("--feather", type=int, default=DEFAULTS["feather"],
                   help="Stage B latent cells (4 px) over which the edit blends into the source (2)")
    e.add_argument("--dtype", choices=list(WEIGHT_DTYPES), default="auto", help="weights dtype")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    e.set_defaults(func=run)


def _request(args):
    """The checked request (cli.UsageError for anything unusable), before any model loads."""
    from pathlib import Path

    from ..options.generate import UsageError, _load_image, check_out
    from ..editing import operations
    from ..editing.editor import EditRequest, check_request
    from ..editing.fusion import EditSettings
    from ..editing.masks import as_mask
    from ..inputs.limits import RequestError, check_device
    from ..pipeline.stages import StageBSettings

    models = Path(args.models)
    if not models.is_dir():
        problem = "is a file" if models.exists() else "does not exist"
        raise UsageError(f"--models {args.models!r} {problem}; give the folder that holds the weight files")
    check_out(args.out)
    if args.feather < 0 or args.feather > 32:
        raise UsageError(f"--feather must be 0 to 32 Stage B cells, got {args.feather}")
    try:
        check_device(args.device, "--device")
        op = operations.parse(args.op)
        image = _load_image(args.image)
        raw = [_load_image(path, "L", f"--mask {path!r}")[0, 0] for path in args.mask]
        masks = [as_mask(m, tuple(image.shape[-2:]), f"--mask {path!r}") for path, m in zip(args.mask, raw)]
        settings = EditSettings(steps=args.steps, refine=args.refine, fuse_at=args.fuse_at, dilate=args.dilate,
                                cfg=args.cfg, hole_seed=args.hole_seed)
        stage_b = StageBSettings(steps=args.b_steps, cfg=args.b_cfg, sampler=args.b_sampler)
        request = EditRequest(image, masks, op, args.prompt, args.negative, args.seed, settings, stage_b, args.feather)
        try:
            return check_request(request)
        except RequestError as exc:  # name the masks as the command line does
            message = re.sub(r"\bmask (\d+)\b", lambda m: f"--mask {args.mask[int(m.group(1)) - 1]!r}", str(exc))
            raise RequestError(message) from None
    except RequestError as exc:
        raise UsageError(str(exc).replace("operation ", "--op ", 1)) from None


def run(args) -> int:
    from ..pipeline.cascade import Cascade, CascadeFiles, MissingWeightsError
    from ..options.generate import UsageError, _progress_bars, _save_images
    from ..editing.editor import LayeredEditor
    from ..files.management import ModelManager

    try:
        request = _request(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = CascadeFiles.from_dir(args.models)
    try:
        files.require(list(LayeredEditor.KINDS), args.models)
    except MissingWeightsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    manager = ModelManager(dtype=WEIGHT_DTYPES[args.dtype], device=args.device)
    progress, bars = _progress_bars()
    try:
        result = LayeredEditor(Cascade(files, manager, root=args.models)).run(request, progress)
    except RUN_ERRORS as exc:
        return report_failure(exc)
    finally:
        close_bars(bars)
    if request.op.kind == "move":
        dx, dy = result.offset_cells
        h, w = request.image.shape[-2:]
        cy, cx = h / result.stage_c.shape[-2], w / result.stage_c.shape[-1]
        print(f"note: moved by {dx}, {dy} Stage C cells ({dx * cx:.0f}, {dy * cy:.0f} pixels) for "
              f"{request.op.dx:g}, {request.op.dy:g}", file=sys.stderr)
    paths, all_there = _save_images(result.image, args.out)
    for path in paths:
        print(f"wrote {path}")
    return 0 if all_there else 1
