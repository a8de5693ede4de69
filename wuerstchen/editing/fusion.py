"""Decomposition, background filling and layer fusion on Stage C (DesignEdit's recipe, our schedule).

1. **Decompose**: DDIM-invert the source latent (:mod:`.inversion`); each mask gives an object
   layer over that trajectory, and the union of the masks (grown by ``dilate`` cells) is the
   background's hole.
2. **Fill the background**: from the trajectory's noise end, denoise with key-masked
   self-attention (:mod:`.attention_mask`, the hole's keys get no weight) and, after every step,
   put the source trajectory back outside the hole, so only the hole is generated and it is made
   from its surroundings. This runs up to the fusion step.
3. **Fuse** at the fusion step ``round(fuse_at · steps)``: paste the placed object layers (their
   trajectories at that step, moved/flipped/scaled, see :mod:`.layers`) onto the filled
   background in depth order, then denoise the canvas to the end without the key mask, so the
   seams harmonise. With ``preserve`` the cells outside the edit (hole and placed objects, grown
   by ``dilate``) follow the source trajectory on these steps too, and the result there is the
   source latent.

The paper runs this on SDXL with 50 steps, key masking over the first 40 and fusion after
step 42; ``fuse_at`` 0.8 is that proportion. Its guidance uses the inverted prompt on both
halves, i.e. no guidance: cfg 1 here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..inputs.limits import RequestError
from .attention_mask import key_mask
from .denoise import Progress, denoise
from .guidance import Guidance
from .inversion import Trajectory, invert
from .layers import Background, Layers, ObjectLayer, Transform, ordered, scaled_source
from .masks import dilate, hole_cells, object_cells


@dataclass(frozen=True)
class EditSettings:
    """Stage C settings of an edit. ``steps`` are the inversion's and the edit's; ``refine`` the
    fixed-point iterations of the inversion; ``fuse_at`` the fraction of the steps after which the
    layers are fused; ``dilate`` the cells added around holes and edits; ``hole_seed`` starts the
    hole from fresh noise of that seed instead of the inverted noise."""

    steps: int = 20
    shift: float = 2.0
    cfg: float = 1.0
    cfg_rho: float = 0.7
    refine: int = 3
    fuse_at: float = 0.8
    dilate: int = 1
    preserve: bool = True
    hole_seed: Optional[int] = None

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if not isinstance(self.steps, int) or not 2 <= self.steps <= 1000:
            raise RequestError(f"edit steps must be a whole number from 2 to 1000, got {self.steps!r}")
        for name, low in (("shift", 0.0), ("cfg", -1e9)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > low):
                raise RequestError(f"edit {name} must be a finite number{' above 0' if low == 0 else ''}, got {value!r}")
        if not isinstance(self.refine, int) or not 0 <= self.refine <= 50:
            raise RequestError(f"inversion refinement must be 0 to 50 iterations, got {self.refine!r}")
        if not (isinstance(self.fuse_at, (int, float)) and 0 < self.fuse_at < 1):
            raise RequestError(f"fuse_at must be a fraction strictly between 0 and 1 (paper: 0.8), got {self.fuse_at!r}")
        if not isinstance(self.dilate, int) or not 0 <= self.dilate <= 16:
            raise RequestError(f"dilate must be 0 to 16 cells, got {self.dilate!r}")

    def fuse_step(self) -> int:
        """The grid index at which the layers are fused (1 .. steps - 1)."""
        return min(self.steps - 1, max(1, round(self.fuse_at * self.steps)))


def invert_latent(model: nn.Module, latent: torch.Tensor, guidance: Guidance, settings: EditSettings,
                  progress: Optional[Progress] = None) -> Trajectory:
    return invert(model, latent, guidance, steps=settings.steps, shift=settings.shift, refine=settings.refine,
                  progress=progress)


def object_layers(trajectory: Trajectory, masks: Sequence[torch.Tensor], names: Optional[Sequence[str]] = None
                  ) -> List[ObjectLayer]:
    """One layer per pixel mask [H, W] over ``trajectory`` (the source's or another picture's)."""
    cells = tuple(trajectory.source.shape[-2:])
    names = list(names) if names is not None else [f"object {i + 1}" for i in range(len(masks))]
    return [ObjectLayer(trajectory, object_cells(m, cells), name=n) for m, n in zip(masks, names)]


def decompose(model: nn.Module, latent: torch.Tensor, masks: Sequence[torch.Tensor], guidance: Guidance,
              settings: EditSettings, image_size: Tuple[int, int], *, hole: Optional[torch.Tensor] = None,
              progress: Optional[Progress] = None) -> Layers:
    """Invert ``latent`` and split it into one object layer per pixel mask and the background, whose
    hole is the masks' cells grown by ``settings.dilate`` (plus ``hole``, pixel-space, e.g. the area a
    pan uncovers)."""
    trajectory = invert_latent(model, latent, guidance, settings, progress)
    cells = tuple(latent.shape[-2:])
    holes = list(masks) + ([hole] if hole is not None else [])
    background = Background(trajectory, hole_cells(holes, cells, settings.dilate) if holes
                            else torch.zeros(cells, dtype=torch.bool))
    return Layers(trajectory, background, object_layers(trajectory, masks), tuple(image_size))


def resolve_scale(model: nn.Module, layer: ObjectLayer, guidance: Guidance, settings: EditSettings) -> ObjectLayer:
    """An object with scale 1: a scaled one is resampled in its clean latent and inverted again."""
    t = layer.transform
    if t.scale == 1:
        return layer
    latent, cells = scaled_source(layer.trajectory.source, layer.cells, t.scale)
    trajectory = invert_latent(model, latent, guidance, settings)
    return ObjectLayer(trajectory, cells, Transform(t.dx, t.dy, 1.0, t.flip_h, t.flip_v, t.depth), layer.name)


def composite(canvas: torch.Tensor, placed: Sequence[Tuple[Trajectory, torch.Tensor]], step: int) -> torch.Tensor:
    """The canvas latent with each placed (trajectory, cells) pasted at grid index ``step``, in order."""
    out = canvas.clone()
    for trajectory, cells in placed:
        m = cells.to(out.device).float()
        out = out * (1 - m) + trajectory.at(step).to(out.device) * m
    return out


def fill_background(model: nn.Module, background: Background, guidance: Guidance, end: int,
                    hole_seed: Optional[int] = None, progress: Optional[Progress] = None) -> torch.Tensor:
    """The background latent at grid index ``end``, its hole generated under the key mask."""
    trajectory = background.trajectory
    x = trajectory.at(0).clone()
    hole = background.hole.to(x.device)
    if hole_seed is not None:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(hole_seed))).to(x.device)
        x = torch.where(hole, noise, x)
    keep = hole.float()

    def outside_is_source(i, x_next, _x0):
        return x_next * keep + trajectory.at(i + 1).to(x_next.device) * (1 - keep)

    if not bool(hole.any()):
        return trajectory.at(end).clone()
    with key_mask(model, hole.expand(x.shape[0], *hole.shape)):
        x, _ = denoise(model, x, guidance, trajectory.schedule, 0, end, hook=outside_is_source, progress=progress)
    return x


@torch.no_grad()
def fuse(model: nn.Module, layers: Layers, guidance: Guidance, settings: EditSettings,
         progress: Optional[Progress] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The edited Stage C latent [B, 16, h, w] and the edit's cells [h, w] (bool): background filled,
    objects placed and fused at ``settings.fuse_step()``, denoised to the end."""
    background = layers.background
    schedule = background.trajectory.schedule
    if schedule.steps != settings.steps:
        raise ValueError(f"the layers were inverted with {schedule.steps} steps but the settings ask for "
                         f"{settings.steps}; decompose again with the same steps")
    objects = [resolve_scale(model, layer, guidance, settings) for layer in ordered(layers.objects)]
    placed = [layer.placed() for layer in objects]
    for (trajectory, cells), layer in zip(placed, objects):
        if tuple(cells.shape) != tuple(background.hole.shape) or trajectory.steps != schedule.steps:
            raise ValueError(f"{layer.name} was made for a {cells.shape[1]}x{cells.shape[0]} latent with "
                             f"{trajectory.steps} steps; the canvas is {background.hole.shape[1]}x"
                             f"{background.hole.shape[0]} with {schedule.steps}")
    step = settings.fuse_step()
    canvas = fill_background(model, background, guidance, step, settings.hole_seed, progress)
    canvas = composite(canvas, placed, step)
    edit = background.hole.clone()
    for _trajectory, cells in placed:
        edit |= dilate(cells, settings.dilate)
    source = background.trajectory
    keep = edit.to(canvas.device).float()

    def outside_is_source(i, x_next, _x0):
        return x_next * keep + source.at(i + 1).to(x_next.device) * (1 - keep)

    hook = outside_is_source if settings.preserve else None
    _x, x0 = denoise(model, canvas, guidance, schedule, step, schedule.steps, hook=hook, progress=progress)
    if settings.preserve:
        x0 = x0 * keep + source.source.to(x0.device) * (1 - keep)
    return x0, edit


def with_objects_from(layers: Layers, other: Layers) -> Layers:
    """``layers`` with the objects of another decomposed picture added (composition); the pictures must
    have the same latent size and both be inverted with the same steps."""
    if other.cells != layers.cells or other.source.steps != layers.source.steps:
        raise ValueError(f"the other picture's layers are {other.cells[1]}x{other.cells[0]} cells with "
                         f"{other.source.steps} steps, these {layers.cells[1]}x{layers.cells[0]} with "
                         f"{layers.source.steps}; decompose both at the same size and steps")
    return layers.replace_objects(list(layers.objects) + list(other.objects))


def edit_pixels(edit: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """The edit's cells [h, w] as a pixel mask [H, W] (each cell's pixels, nearest)."""
    return torch.nn.functional.interpolate(edit.float()[None, None], size=tuple(size), mode="nearest")[0, 0]
