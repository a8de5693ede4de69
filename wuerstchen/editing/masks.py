"""Masks for editing: ComfyUI MASK pictures ([B, H, W] float, 1 = the object) checked and brought to
latent cells, dilated and feathered.

A picture maps onto a latent by stretching (the semantic encoder resizes it to 32 pixels per
Stage C cell, Stage A compresses by 4), so a cell's share of a mask is the mean of the mask over
the pixels it covers (adaptive average pooling).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from ..inputs.limits import RequestError

THRESHOLD = 0.5
"""A mask pixel above this belongs to the object."""


def as_mask(mask: torch.Tensor, size: Tuple[int, int], what: str = "mask") -> torch.Tensor:
    """One mask [H, W] float in [0, 1] for a picture of ``size`` (H, W); refused with one line when it is
    another size, holds more than one picture, or has no pixel above :data:`THRESHOLD`."""
    m = torch.as_tensor(mask).float()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise RequestError(f"{what} must be one mask [H, W] (or [1, H, W]), got {list(torch.as_tensor(mask).shape)}")
    if tuple(m.shape) != tuple(size):
        raise RequestError(f"{what} is {m.shape[1]}x{m.shape[0]} but the picture is {size[1]}x{size[0]}; "
                           "give a mask of the picture's size")
    if not bool(torch.isfinite(m).all()):
        raise RequestError(f"{what} holds NaN or inf values")
    if not bool((m > THRESHOLD).any()):
        raise RequestError(f"{what} is empty (no pixel above {THRESHOLD}); paint the object white")
    return m.clamp(0, 1)


def bbox(mask: torch.Tensor) -> Tuple[int, int, int, int]:
    """(top, left, bottom, right) of a 2-D mask's pixels above the threshold; bottom/right exclusive."""
    rows = torch.nonzero((mask > THRESHOLD).any(dim=1)).flatten()
    cols = torch.nonzero((mask > THRESHOLD).any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("the mask is empty")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def coverage(mask: torch.Tensor, cells: Tuple[int, int]) -> torch.Tensor:
    """The share [h, w] of each latent cell that a pixel mask [H, W] covers."""
    return F.adaptive_avg_pool2d(mask.float()[None, None], cells)[0, 0]


def object_cells(mask: torch.Tensor, cells: Tuple[int, int]) -> torch.Tensor:
    """The cells [h, w] (bool) an object owns: at least half covered, and at least its best cell."""
    share = coverage(mask, cells)
    owned = share >= 0.5
    if not bool(owned.any()):
        owned = share >= share.max()
    return owned


def hole_cells(masks: Sequence[torch.Tensor], cells: Tuple[int, int], dilate_cells: int = 1) -> torch.Tensor:
    """The cells [h, w] (bool) any of the masks touches, grown by ``dilate_cells``."""
    hole = torch.zeros(cells, dtype=torch.bool)
    for m in masks:
        hole |= coverage((m > THRESHOLD).float(), cells) > 0
    return dilate(hole, dilate_cells)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A boolean [..., h, w] mask grown by ``radius`` cells (square neighbourhood)."""
    if radius <= 0:
        return mask.bool()
    shape = mask.shape
    m = mask.float().reshape(-1, 1, *shape[-2:])
    return (F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius) > 0).reshape(shape)


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A soft [..., h, w] mask: 1 on ``mask``, falling linearly-ish to 0 over ``2·radius`` cells outside
    it, and exactly 0 beyond (a box blur of the mask grown by ``radius``)."""
    if radius <= 0:
        return mask.float()
    shape = mask.shape
    grown = dilate(mask, radius).float().reshape(-1, 1, *shape[-2:])
    soft = F.avg_pool2d(F.pad(grown, (radius,) * 4, mode="replicate"), 2 * radius + 1, stride=1)
    return torch.maximum(soft.reshape(shape), mask.float())


def resize_mask(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A pixel mask [H, W] at another size (area average down, bilinear up)."""
    m = mask.float()[None, None]
    mode = "area" if size[0] <= mask.shape[0] and size[1] <= mask.shape[1] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(m, size=size, mode=mode, **kwargs)[0, 0].clamp(0, 1)
