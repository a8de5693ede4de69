"""The Würstchen v2 noise schedule and time grids (diffusers' ``DDPMWuerstchenScheduler``, dome272's Diffuzz).

v2 parameterises the process by the cumulative DDPM signal level ᾱ(t) of the cosine schedule,
without Stable Cascade's logSNR shift: ᾱ(t) = clamp(cos²(π/2·(t+s)/(1+s)) / cos²(π/2·s/(1+s)),
1e-4, 0.9999), and the networks are conditioned on t itself. Values are float32 CPU tensors computed
in the scheduler's operation order, so they match it bit for bit.

Grids list the times from the start (1 = pure noise) down to 0, one more value than steps:

* :func:`default_prior_timesteps`: diffusers' ``DEFAULT_STAGE_C_TIMESTEPS``, 29 steps, the hub
  recipe for the prior (20 values from 1 to 2/3, then 10 more down to 0);
* :func:`uniform_timesteps`: ``linspace(1, 0, steps + 1)``, what the pipelines use otherwise
  (12 steps for the decoder, 60 for the prior);
* :func:`segmented_timesteps`: the original code's consecutive Diffuzz runs, e.g. 1 → 2/3 in 20
  steps then 2/3 → 0 in 10 (30 steps), joined into one grid.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .schedule import COSINE_OFFSET

ALPHA_CUMPROD_RANGE = (1e-4, 0.9999)
"""Clamp range of ᾱ(t); ᾱ(1) = 1e-4."""

PRIOR_STEPS_FIRST_SEGMENT = (1.0, 2 / 3, 20)
PRIOR_STEPS_SECOND_SEGMENT = (2 / 3, 0.0, 11)
"""The two ``np.linspace`` calls of ``DEFAULT_STAGE_C_TIMESTEPS`` (the second drops its first value)."""

ORIGINAL_PRIOR_SEGMENTS = ((1.0, 2 / 3, 20), (2 / 3, 0.0, 10))
"""The original v2 prior recipe: (t_start, t_end, steps) of each Diffuzz run."""

DEFAULT_DECODER_STEPS = 12
UNIFORM_PRIOR_STEPS = 60
"""The pipelines' ``num_inference_steps`` defaults (decoder; prior without ``timesteps``)."""


def alpha_cumprod(t: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
    """ᾱ(t) in float32 (1-D), with the scheduler's operation order."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).cpu()
    s = torch.tensor([COSINE_OFFSET], dtype=torch.float32)
    init = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    value = torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / init
    return value.clamp(*ALPHA_CUMPROD_RANGE)


def _numpy_linspace(start: float, stop: float, num: int) -> list[float]:
    """``np.linspace(start, stop, num)`` in float64, value for value (i·step + start, last = stop)."""
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    return [i * step + start for i in range(num - 1)] + [float(stop)]


def default_prior_timesteps() -> torch.Tensor:
    """diffusers' ``DEFAULT_STAGE_C_TIMESTEPS`` as the float32 grid the scheduler uses (30 values, 29 steps)."""
    first = _numpy_linspace(*PRIOR_STEPS_FIRST_SEGMENT)
    second = _numpy_linspace(*PRIOR_STEPS_SECOND_SEGMENT)[1:]
    return torch.tensor(first + second, dtype=torch.float32)


def uniform_timesteps(steps: int, t_start: float = 1.0) -> torch.Tensor:
    """``steps`` equal steps from ``t_start`` to 0, float32 (the scheduler's default grid)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    return torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float32)


def segmented_timesteps(segments: Sequence[tuple[float, float, int]] = ORIGINAL_PRIOR_SEGMENTS) -> torch.Tensor:
    """Consecutive Diffuzz runs ``(t_start, t_end, steps)`` joined into one grid.

    Each run uses ``torch.linspace(t_start, t_end, steps + 1)`` in float32 and starts where the
    previous one ended, so sampling the joined grid equals running them one after the other.
    """
    parts = []
    for i, (start, end, steps) in enumerate(segments):
        if steps < 1:
            raise ValueError(f"segment {i}: steps must be at least 1, got {steps}")
        grid = torch.linspace(start, end, steps + 1, dtype=torch.float32)
        if parts and grid[0] != parts[-1][-1]:
            raise ValueError(f"segment {i} starts at {start} but the previous one ends at {float(parts[-1][-1])}")
        parts.append(grid if not parts else grid[1:])
    if not parts:
        raise ValueError("segmented_timesteps needs at least one segment")
    return torch.cat(parts)


def check_timesteps(timesteps: torch.Tensor | Sequence[float] | int) -> torch.Tensor:
    """A sampling grid as a float32 CPU tensor; an int means that many uniform steps from 1.

    The grid must be 1-D with at least two values in [0, 1], strictly decreasing.
    """
    if isinstance(timesteps, int):
        return uniform_timesteps(timesteps)
    grid = torch.as_tensor(timesteps, dtype=torch.float32).detach().cpu()
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"timesteps must be a 1-D grid with at least 2 values (start ... end), got shape "
                         f"{tuple(grid.shape)}")
    if bool((grid < 0).any() or (grid > 1).any()):
        raise ValueError(f"timesteps must lie in [0, 1], got {grid.min().item()} .. {grid.max().item()}")
    if bool((grid[1:] >= grid[:-1]).any()):
        raise ValueError("timesteps must be strictly decreasing (1 = pure noise first, 0 last)")
    return grid
