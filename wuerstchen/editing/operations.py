"""Edit operations on top of the layers: remove, move, scale, flip, pan and zoom out.

* ``remove`` — the objects leave; their hole is filled from the surroundings.
* ``move:DX,DY`` — every object moves by DX, DY pixels (right, down), snapped to whole Stage C
  cells; the place it leaves is filled.
* ``scale:S`` — every object is resampled by S about its centre (and inverted again); the place it
  leaves is filled.
* ``flip:h`` / ``flip:v`` — every object is mirrored in its box, horizontally or vertically.
* ``pan:DX,DY`` — the whole picture moves by DX, DY pixels (a camera pan the other way); the area
  that appears is filled. Needs no mask.
* ``zoomout:F`` — the picture shrinks to F (0 < F < 1) of its size about the centre; the border
  that appears is filled. Needs no mask.

Pan and zoom out change the picture itself (pixels, exactly) and then fill the uncovered area
like a removal, as the paper does. Everything is checked against the picture and the masks
before any model runs (:func:`check`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..inputs.limits import RequestError
from ..pipeline.stages import stage_c_latent_size
from .layers import Layers, Transform, shift_cells, snap_offset
from .masks import bbox, object_cells

KINDS = ("remove", "move", "scale", "flip", "pan", "zoomout")
OBJECT_KINDS = ("remove", "move", "scale", "flip")
"""Operations on masked objects (the others act on the whole picture and take no mask)."""
SYNTAX = "remove | move:DX,DY | scale:S | flip:h|v | pan:DX,DY | zoomout:F"


@dataclass(frozen=True)
class Operation:
    kind: str
    dx: float = 0.0
    dy: float = 0.0
    factor: float = 1.0  # scale:S or zoomout:F
    flip: str = ""  # "h" or "v"

    @property
    def needs_masks(self) -> bool:
        return self.kind in OBJECT_KINDS

    def __str__(self) -> str:
        if self.kind in ("move", "pan"):
            return f"{self.kind}:{self.dx:g},{self.dy:g}"
        if self.kind in ("scale", "zoomout"):
            return f"{self.kind}:{self.factor:g}"
        if self.kind == "flip":
            return f"flip:{self.flip}"
        return self.kind


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RequestError(f"operation {spec!r}: {text!r} is not a finite number (expected {SYNTAX})")
    return value


def parse(spec: str) -> Operation:
    """An operation from its text, e.g. ``move:120,-40``; refused with the syntax when malformed."""
    kind, _, arg = str(spec).strip().partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        raise RequestError(f"unknown operation {spec!r}; expected {SYNTAX}")
    if kind == "remove":
        if arg:
            raise RequestError(f"operation {spec!r}: remove takes no value")
        return Operation("remove")
    if kind in ("move", "pan"):
        parts = arg.split(",")
        if len(parts) != 2:
            raise RequestError(f"operation {spec!r}: expected {kind}:DX,DY in pixels (right and down positive)")
        dx, dy = (_number(p, spec) for p in parts)
        if dx == 0 and dy == 0:
            raise RequestError(f"operation {spec!r} moves nothing; give a non-zero DX or DY")
        return Operation(kind, dx=dx, dy=dy)
    if kind == "flip":
        if arg not in ("h", "v"):
            raise RequestError(f"operation {spec!r}: expected flip:h (left-right) or flip:v (upside down)")
        return Operation("flip", flip=arg)
    factor = _number(arg, spec)
    if kind == "scale" and not 0 < factor <= 8:
        raise RequestError(f"operation {spec!r}: the scale must be above 0 and at most 8")
    if kind == "zoomout" and not 0 < factor < 1:
        raise RequestError(f"operation {spec!r}: zoomout:F shrinks the picture to F of its size, 0 < F < 1")
    return Operation(kind, factor=factor)


def check(op: Operation, masks: Sequence[torch.Tensor], size: Tuple[int, int]) -> None:
    """Refuse an operation that cannot work on a picture of ``size`` (H, W) with these checked pixel
    masks: object operations without masks, picture operations with them, moves off the canvas,
    scales past its edge, pans by the whole picture."""
    height, width = size
    if op.needs_masks and not masks:
        raise RequestError(f"{op.kind} needs at least one mask (white = the object)")
    if not op.needs_masks and masks:
        raise RequestError(f"{op.kind} acts on the whole picture and takes no mask; drop the masks")
    for i, mask in enumerate(masks, start=1):
        top, left, bottom, right = bbox(mask)
        if op.kind == "move":
            nt, nl, nb, nr = top + op.dy, left + op.dx, bottom + op.dy, right + op.dx
            if nt < 0 or nl < 0 or nb > height or nr > width:
                raise RequestError(
                    f"move:{op.dx:g},{op.dy:g} moves mask {i} off the canvas: the object spans x {left}..{right}, "
                    f"y {top}..{bottom} of a {width}x{height} picture, so it may move by x {-left}..{width - right} "
                    f"and y {-top}..{height - bottom}")
            cells = object_cells(mask, stage_c_latent_size(height, width))
            cdx, cdy = snap_offset(op.dx, op.dy, size, tuple(cells.shape))
            if int(shift_cells(cells, cdx, cdy).sum()) < int(cells.sum()):
                raise RequestError(
                    f"move:{op.dx:g},{op.dy:g} is {cdx}, {cdy} Stage C cells once snapped to whole cells, which "
                    f"moves mask {i}'s object off the {cells.shape[1]}x{cells.shape[0]}-cell canvas; move it less")
        if op.kind == "scale":
            cy, cx = (top + bottom) / 2, (left + right) / 2
            hh, hw = (bottom - top) * op.factor / 2, (right - left) * op.factor / 2
            if cy - hh < -0.5 or cx - hw < -0.5 or cy + hh > height + 0.5 or cx + hw > width + 0.5:
                raise RequestError(f"scale:{op.factor:g} makes mask {i}'s object ({right - left}x{bottom - top} at "
                                   f"x {left}, y {top}) larger than the canvas around its centre; scale it less")
    if op.kind == "pan" and (abs(op.dx) >= width or abs(op.dy) >= height):
        raise RequestError(f"pan:{op.dx:g},{op.dy:g} moves the whole {width}x{height} picture off the canvas")


def transform(op: Operation, layers: Layers) -> Transform:
    """The transform an object operation gives every object (offsets snapped to whole cells)."""
    if op.kind == "move":
        dx, dy = layers.snap(op.dx, op.dy)
        return Transform(dx=dx, dy=dy)
    if op.kind == "scale":
        return Transform(scale=op.factor)
    if op.kind == "flip":
        return Transform(flip_h=op.flip == "h", flip_v=op.flip == "v")
    return Transform()


def apply(op: Operation, layers: Layers) -> Layers:
    """The layers after the operation: objects removed, or every object transformed."""
    if op.kind in ("remove", "pan", "zoomout"):
        return layers.replace_objects([])
    t = transform(op, layers)
    for i in range(len(layers.objects)):
        layers = layers.transformed(i, t)
    return layers


def picture(op: Operation, image: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(picture, uncovered pixel mask [H, W] or None): pan and zoom out make a new picture
    [1, 3, H, W] of the same size whose uncovered area is to be filled; the others keep it."""
    height, width = image.shape[-2:]
    if op.kind == "pan":
        dx, dy = int(round(op.dx)), int(round(op.dy))
        out = image.clone()
        covered = torch.zeros(height, width)
        ys, yd = slice(max(0, -dy), height - max(0, dy)), slice(max(0, dy), height - max(0, -dy))
        xs, xd = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
        out[..., yd, xd] = image[..., ys, xs]
        covered[yd, xd] = 1
        return out, 1 - covered
    if op.kind == "zoomout":
        nh, nw = max(1, round(height * op.factor)), max(1, round(width * op.factor))
        small = F.interpolate(image.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (height - nh) // 2, (width - nw) // 2
        out = image.clone()
        out[..., top:top + nh, left:left + nw] = small.clamp(0, 1)
        hole = torch.ones(height, width)
        hole[top:top + nh, left:left + nw] = 0
        return out, hole
    return image, None
