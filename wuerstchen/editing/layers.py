"""Layers of a picture: object layers (a mask per object over an inverted trajectory) and a
background layer whose hole is filled later, with the transforms that place an object again.

Placement rule (Stage C cells are about 42 pixels at 1024²): **offsets are snapped to whole
latent cells** and move the layer's inverted latents by exactly that many cells (the cells that
leave the canvas are dropped, the ones that enter are empty); **flips** mirror the object's
bounding box of cells in place, also exactly; **scaling** resamples the object's clean latent
(bilinear, its cell mask by nearest) about its box centre, pastes it into the source latent and
inverts that again, so the scaled object gets a trajectory of its own. Depth orders the objects
when they are fused: higher depth is pasted later, i.e. lies on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .inversion import Trajectory


@dataclass(frozen=True)
class Transform:
    """Where an object goes: offset in whole cells (dx right, dy down), scale about its centre,
    flips of its box, and its depth (order of pasting; higher = on top)."""

    dx: int = 0
    dy: int = 0
    scale: float = 1.0
    flip_h: bool = False
    flip_v: bool = False
    depth: int = 0

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number, got {self.scale!r}")

    def then(self, other: "Transform") -> "Transform":
        """This transform followed by ``other`` (offsets add, scales multiply, flips toggle)."""
        return Transform(self.dx + other.dx, self.dy + other.dy, self.scale * other.scale,
                         self.flip_h != other.flip_h, self.flip_v != other.flip_v, other.depth or self.depth)


def snap_offset(dx: float, dy: float, image_size: Tuple[int, int], cells: Tuple[int, int]) -> Tuple[int, int]:
    """A pixel offset (right, down) as whole latent cells, rounded to the nearest, for a picture of
    ``image_size`` (H, W) stretched over ``cells`` (h, w)."""
    return int(round(dx * cells[1] / image_size[1])), int(round(dy * cells[0] / image_size[0]))


def cell_bbox(cells: torch.Tensor) -> Tuple[int, int, int, int]:
    """(top, left, bottom, right) of a boolean [h, w] cell mask; bottom/right exclusive."""
    rows = torch.nonzero(cells.any(dim=1)).flatten()
    cols = torch.nonzero(cells.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("the layer's mask covers no cell")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def shift_cells(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x [..., h, w] moved by whole cells (right/down positive), zeros where nothing comes in."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


def flip_box(x: torch.Tensor, box: Tuple[int, int, int, int], horizontal: bool, vertical: bool) -> torch.Tensor:
    """x [..., h, w] with the cells of ``box`` mirrored in place."""
    if not (horizontal or vertical):
        return x
    top, left, bottom, right = box
    out = x.clone()
    dims = [d for d, on in ((-1, horizontal), (-2, vertical)) if on]
    out[..., top:bottom, left:right] = x[..., top:bottom, left:right].flip(dims)
    return out


@dataclass
class ObjectLayer:
    """An object: its cells [h, w] (bool) over a trajectory (of the source or of another picture)."""

    trajectory: Trajectory
    cells: torch.Tensor
    transform: Transform = field(default_factory=Transform)
    name: str = "object"

    def with_transform(self, transform: Transform) -> "ObjectLayer":
        return replace(self, transform=transform)

    def placed(self) -> Tuple[Trajectory, torch.Tensor]:
        """(trajectory, cells) after the flips and the offset; the scale must already be applied
        (see :func:`scaled_source`), since it needs a new inversion."""
        t = self.transform
        box = cell_bbox(self.cells)
        trajectory, cells = self.trajectory, self.cells
        if t.flip_h or t.flip_v:
            trajectory = trajectory.map(lambda x: flip_box(x, box, t.flip_h, t.flip_v))
            cells = flip_box(cells, box, t.flip_h, t.flip_v)
        if t.dx or t.dy:
            trajectory = trajectory.map(lambda x: shift_cells(x, t.dx, t.dy))
            cells = shift_cells(cells, t.dx, t.dy)
        return trajectory, cells

    def off_canvas(self) -> bool:
        """Whether the offset moves any of the object's cells off the canvas."""
        return int(shift_cells(self.cells, self.transform.dx, self.transform.dy).sum()) < int(self.cells.sum())


def scaled_source(source: torch.Tensor, cells: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(latent, cells): the object's box of a clean latent [B, 16, h, w] resampled by ``scale`` about the
    box centre (snapped to a cell) and pasted into the source latent; its cells by nearest."""
    h, w = cells.shape
    top, left, bottom, right = cell_bbox(cells)
    bh, bw = bottom - top, right - left
    nh, nw = max(1, round(bh * scale)), max(1, round(bw * scale))
    crop = source[..., top:bottom, left:right].float()
    mask = cells[top:bottom, left:right].float()[None, None]
    crop = F.interpolate(crop, size=(nh, nw), mode="bilinear", align_corners=False)
    mask = F.interpolate(mask, size=(nh, nw), mode="nearest")[0, 0] > 0.5
    cy, cx = (top + bottom) // 2, (left + right) // 2
    y0, x0 = cy - nh // 2, cx - nw // 2
    # clip the pasted box to the canvas
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1, sx1 = nh - max(0, y0 + nh - h), nw - max(0, x0 + nw - w)
    if sy1 <= sy0 or sx1 <= sx0:
        raise ValueError(f"scale {scale:g} leaves nothing of the object on the canvas")
    out_latent = source.clone().float()
    out_cells = torch.zeros_like(cells)
    ty, tx = y0 + sy0, x0 + sx0
    region = (slice(ty, ty + sy1 - sy0), slice(tx, tx + sx1 - sx0))
    keep = mask[sy0:sy1, sx0:sx1]
    piece = crop[..., sy0:sy1, sx0:sx1]
    out_latent[..., region[0], region[1]] = torch.where(keep, piece, out_latent[..., region[0], region[1]])
    out_cells[region] = keep
    if not bool(out_cells.any()):
        raise ValueError(f"scale {scale:g} leaves no cell of the object")
    return out_latent, out_cells


@dataclass
class Background:
    """The background: a trajectory whose ``hole`` cells [h, w] (bool) are to be filled."""

    trajectory: Trajectory
    hole: torch.Tensor


@dataclass
class Layers:
    """A decomposed picture: the source trajectory, the background, and the objects (in any order;
    their transforms' depth orders the fusion)."""

    source: Trajectory
    background: Background
    objects: List[ObjectLayer]
    image_size: Tuple[int, int]  # (H, W) of the picture, for pixel <-> cell conversion

    @property
    def cells(self) -> Tuple[int, int]:
        return tuple(self.source.source.shape[-2:])

    def cell_pixels(self) -> Tuple[float, float]:
        """Pixels per cell (vertical, horizontal)."""
        return self.image_size[0] / self.cells[0], self.image_size[1] / self.cells[1]

    def snap(self, dx_pixels: float, dy_pixels: float) -> Tuple[int, int]:
        """A pixel offset as whole cells (rounded to the nearest)."""
        return snap_offset(dx_pixels, dy_pixels, self.image_size, self.cells)

    def replace_objects(self, objects: Sequence[ObjectLayer]) -> "Layers":
        return replace(self, objects=list(objects))

    def transformed(self, index: int, transform: Transform) -> "Layers":
        """The layers with object ``index``'s transform followed by ``transform``."""
        if not 0 <= index < len(self.objects):
            raise IndexError(f"there is no object layer {index}; the layers hold {len(self.objects)} "
                             f"(0..{len(self.objects) - 1})")
        objects = list(self.objects)
        objects[index] = objects[index].with_transform(objects[index].transform.then(transform))
        return self.replace_objects(objects)


def ordered(objects: Sequence[ObjectLayer]) -> List[ObjectLayer]:
    """Objects in pasting order: by depth, then as given (a stable sort)."""
    return sorted(objects, key=lambda layer: layer.transform.depth)
