"""A deterministic DDIM (eta 0) loop over a slice of Stage C's schedule, with a per-step hook.

It computes exactly what :func:`wuerstchen.sampling.samplers.sample` does with ``sampler="ddim"`` (same
schedule, same float order: ``x0 = (x − b·ε)/a``, ``x' = a'·x0 + b'·ε``) but can start and stop
at any step and lets the caller change x between steps, which layer fusion and background
blending need. Grid index i is the time ``schedule.t[i]`` (0 = pure noise, ``steps`` = clean).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..sampling.schedule import StepSchedule
from .guidance import Guidance

StepHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``hook(i, x_next, x0)`` after the step from grid index i to i + 1; returns the x to go on with."""

Progress = Callable[[int, int, torch.Tensor], None]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, schedule: StepSchedule, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x0, x at grid index i + 1) from x at grid index i and its epsilon prediction."""
    a, b = schedule.a[i].item(), schedule.b[i].item()
    a_next, b_next = schedule.a[i + 1].item(), schedule.b[i + 1].item()
    x0 = (x - eps * b) / a
    return x0, a_next * x0 + b_next * eps


@torch.no_grad()
def denoise(model: nn.Module, x: torch.Tensor, guidance: Guidance, schedule: StepSchedule, start: int = 0,
            end: Optional[int] = None, hook: Optional[StepHook] = None,
            progress: Optional[Progress] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the steps from grid index ``start`` to ``end`` (default: the last); returns (x at ``end``,
    the last step's x0 prediction), the latter being the sampler's result when ``end`` is the last."""
    end = schedule.steps if end is None else end
    if not 0 <= start < end <= schedule.steps:
        raise ValueError(f"steps {start}..{end} are not inside a {schedule.steps}-step schedule")
    x = x.detach().float().clone()
    x0 = x
    for i in range(start, end):
        eps = guidance(model, x, schedule.r[i])
        x0, x = ddim_step(x, eps, schedule, i)
        if hook is not None:
            x = hook(i, x, x0)
        if progress is not None:
            progress(i + 1, schedule.steps, x0)
    return x, x0
