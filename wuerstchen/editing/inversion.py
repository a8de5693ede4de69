"""DDIM inversion of a Stage C latent into its trajectory on our schedule.

The DDIM step from grid index i to i + 1 (see :mod:`.denoise`) is
``x_{i+1} = a_{i+1}·(x_i − b_i·ε(x_i))/a_i + b_{i+1}·ε(x_i)``. Inversion walks the grid
backwards from the clean latent: it needs ε at the unknown x_i, and the classic approximation
uses ε(x_{i+1}) instead (Song et al. 2021; Mokady et al. 2023). ``refine`` > 0 then iterates
``x_i ← a_i·(x_{i+1} − b_{i+1}·ε(x_i))/a_{i+1} + b_i·ε(x_i)``, whose fixed point is an exact inverse
of the step; each iteration costs one more model call per step.

The regeneration of the trajectory's noise end with the same conditioning and cfg 1 returns,
as its last x0 prediction, the source latent up to the error of that approximation, which shrinks
with more steps (the README's table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..sampling.schedule import StepSchedule, step_schedule
from .denoise import Progress, denoise
from .guidance import Guidance


@dataclass
class Trajectory:
    """The latents of an inversion: ``latents[i]`` [B, 16, h, w] at grid index i (0 = noise end,
    ``steps`` = the clean end), ``source`` the clean latent it was made from."""

    latents: torch.Tensor  # [steps + 1, B, 16, h, w]
    source: torch.Tensor  # [B, 16, h, w]
    schedule: StepSchedule

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def noise(self) -> torch.Tensor:
        """The noise end, which regenerates the source."""
        return self.latents[0]

    def at(self, i: int) -> torch.Tensor:
        return self.latents[i]

    def map(self, fn) -> "Trajectory":
        """The same trajectory with ``fn`` applied to every latent and to the source (shifts, flips)."""
        return Trajectory(torch.stack([fn(x) for x in self.latents]), fn(self.source), self.schedule)


@torch.no_grad()
def invert(model: nn.Module, latent: torch.Tensor, guidance: Guidance, *, steps: int, shift: float = 2.0,
           refine: int = 0, progress: Optional[Progress] = None) -> Trajectory:
    """DDIM-invert a clean Stage C latent [B, 16, h, w] with ``steps`` steps at ``shift``."""
    if refine < 0:
        raise ValueError(f"refine must be 0 or more iterations, got {refine}")
    schedule = step_schedule(steps, shift=shift)
    param = next(model.parameters())
    source = latent.detach().float().to(param.device)
    a, b = schedule.a, schedule.b
    last = schedule.steps
    eps = guidance(model, source, schedule.r[last])
    x = a[last].item() * source + b[last].item() * eps
    latents = [x]
    for i in range(last - 1, -1, -1):
        x0 = source if i == last - 1 else (x - b[i + 1].item() * eps) / a[i + 1].item()
        guess = a[i].item() * x0 + b[i].item() * eps
        for _ in range(refine):
            eps = guidance(model, guess, schedule.r[i])
            x0 = source if i == last - 1 else (x - b[i + 1].item() * eps) / a[i + 1].item()
            guess = a[i].item() * x0 + b[i].item() * eps
        x = guess
        if i > 0:
            eps = guidance(model, x, schedule.r[i])
        latents.append(x)
        if progress is not None:
            progress(last - i, last, x)
    return Trajectory(torch.stack(latents[::-1]), source, schedule)


@torch.no_grad()
def regenerate(model: nn.Module, trajectory: Trajectory, guidance: Guidance) -> torch.Tensor:
    """The DDIM regeneration of a trajectory's noise end: its last x0 prediction."""
    return denoise(model, trajectory.noise, guidance, trajectory.schedule)[1]


def round_trip_error(model: nn.Module, latent: torch.Tensor, guidance: Guidance, *, steps: int,
                     shift: float = 2.0, refine: int = 0) -> float:
    """Largest absolute difference between a latent and the regeneration of its inversion."""
    trajectory = invert(model, latent, guidance, steps=steps, shift=shift, refine=refine)
    return float((regenerate(model, trajectory, guidance).cpu() - latent.float().cpu()).abs().max())
