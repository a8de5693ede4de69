"""The Stable Cascade noise schedule: cosine logSNR with shift, VP scaling, and the model's time input.

Every quantity is computed in float32 on the CPU with the same operation order as the official
``gdf`` package (CosineSchedule, VPScaler, CosineTNoiseCond), so schedule values match it bit for
bit. Tensors are moved to the sampling device only afterwards.

Notation: t in [0, 1] is diffusion time (1 = pure noise), λ = logSNR(t), and a noised sample is
``a·x0 + b·ε`` with ``a = sqrt(sigmoid(λ))`` and ``b = sqrt(sigmoid(-λ))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COSINE_OFFSET = 0.008
"""The ``s`` of the improved-DDPM cosine schedule, as used by Stable Cascade."""

VARIANCE_RANGE = (1e-4, 1.0 - 1e-4)
"""Clip range of the cosine signal variance; it bounds logSNR to about ±9.21."""


@dataclass(frozen=True)
class CosineSchedule:
    """Cosine schedule in logSNR space, shifted by ``-2·ln(shift)`` and clipped to the unshifted bounds.

    The shift moves the whole curve towards lower SNR (more noise) for larger latents; the clip keeps
    the end points of shift 1, so with shift 2 the start of sampling is clipped back to λ = -9.21.
    """

    s: float = COSINE_OFFSET
    variance_range: tuple[float, float] = VARIANCE_RANGE

    def _offset(self) -> torch.Tensor:
        return torch.tensor([self.s], dtype=torch.float32)

    def _min_variance(self) -> torch.Tensor:
        s = self._offset()
        return torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2

    def _unshifted_log_snr(self, t: torch.Tensor) -> torch.Tensor:
        s = self._offset()
        var = torch.cos((s + t) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / self._min_variance()
        var = var.clamp(*self.variance_range)
        return (var / (1 - var)).log()

    def bounds(self) -> tuple[float, float]:
        """(min, max) logSNR, i.e. λ(1) and λ(0) at shift 1; shifted values are clipped to these."""
        low, high = self._unshifted_log_snr(torch.tensor([1.0, 0.0])).tolist()
        return low, high

    def log_snr(self, t: torch.Tensor | float, shift: float = 1.0) -> torch.Tensor:
        """λ(t) in float32 for a float or a 1-D tensor of times (returned as a 1-D tensor)."""
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).cpu().clamp(0, 1)
        log_snr = self._unshifted_log_snr(t)
        if shift != 1:
            log_snr = log_snr + 2 * math.log(1 / shift)
        return log_snr.clamp(*self.bounds())

    def model_time(self, log_snr: torch.Tensor) -> torch.Tensor:
        """The time ``r`` the networks are conditioned on: the cosine schedule inverted at λ.

        Because λ is shifted, r differs from the sampling time t whenever shift != 1.
        """
        s = self._offset().to(log_snr.device)
        var = log_snr.sigmoid().clamp(0, 1)
        r = (((var * self._min_variance().to(log_snr.device)) ** 0.5).acos() / (torch.pi * 0.5)) * (1 + s) - s
        return r.clamp(0, 1)


def vp_scalers(log_snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance-preserving (a, b) for a logSNR: a² = sigmoid(λ), b² = 1 − a²."""
    a_squared = log_snr.sigmoid()
    return a_squared.sqrt(), (1 - a_squared).sqrt()


def time_grid(t_start: float, steps: int) -> torch.Tensor:
    """The ``steps + 1`` sampling times from ``t_start`` down to 0, in float32 (gdf's ``r_range``)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    return torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float32)


def img2img_steps(steps: int, t_start: float) -> int:
    """The official img2img step count: a full-length ``steps`` schedule truncated at ``t_start``.

    The official notebook samples ``int(steps * t_start)`` steps starting from ``t_start``; at least
    one step is always taken.
    """
    return max(1, int(steps * t_start))


@dataclass(frozen=True)
class StepSchedule:
    """Everything a sampler needs for one run, as float32 CPU tensors of length ``steps + 1``."""

    t: torch.Tensor
    log_snr: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    r: torch.Tensor

    @property
    def steps(self) -> int:
        return self.t.numel() - 1


def step_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0,
                  schedule: CosineSchedule = CosineSchedule()) -> StepSchedule:
    """Grid, logSNR, VP scalers and model times for a sampling run."""
    t = time_grid(t_start, steps)
    log_snr = schedule.log_snr(t, shift=shift)
    a, b = vp_scalers(log_snr)
    return StepSchedule(t=t, log_snr=log_snr, a=a, b=b, r=schedule.model_time(log_snr))
