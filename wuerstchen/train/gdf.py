"""The official training recipe of the diffusion framework ("gdf") for Stage C.

Stable Cascade's trainers build ``GDF(CosineSchedule(clamp_range=[1e-4, 0.9999]), VPScaler(),
EpsilonTarget(), CosineTNoiseCond(), P2LossWeight())``. For one training example that is:

* a time ``t = clamp(1 - u + 0.001, 0.001, 1)`` with ``u ~ U[0, 1)``;
* its logSNR ``λ(t)`` on the clipped cosine schedule (:class:`wuerstchen.sampling.schedule.CosineSchedule`);
* the variance-preserving scalers ``a = sqrt(sigmoid λ)``, ``b = sqrt(1 - sigmoid λ)``; the noised
  latent ``a·x0 + b·ε`` and the target ``ε``;
* the network's time condition ``r``: the cosine schedule inverted at λ;
* the P2 loss weight ``(k + exp(s·λ))^-γ`` with k = γ = s = 1, i.e. ``1 / (1 + SNR)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ..sampling.schedule import CosineSchedule, vp_scalers


class Diffused(NamedTuple):
    noised: torch.Tensor  # [B, C, H, W]
    noise: torch.Tensor  # ε
    target: torch.Tensor  # what the network predicts (ε)
    log_snr: torch.Tensor  # [B]
    noise_cond: torch.Tensor  # [B], the time r the network is given
    loss_weight: torch.Tensor  # [B]


def sample_times(batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Training times as gdf draws them when no t is given: ``(1 - U[0,1)) + 0.001``, clamped to [0.001, 1]."""
    u = torch.rand(batch, generator=generator)
    return (1 - u).add(0.001).clamp(0.001, 1.0)


def p2_loss_weight(log_snr: torch.Tensor, k: float = 1.0, gamma: float = 1.0, s: float = 1.0) -> torch.Tensor:
    """gdf's ``P2LossWeight``: ``(k + exp(s·λ)) ** -γ``."""
    return (k + (log_snr * s).exp()) ** -gamma


@dataclass(frozen=True)
class TrainingGDF:
    """The official Stage C training diffusion (see the module docstring). ``shift`` is gdf's
    ``diffuse(shift=…, loss_shift=…)``; the official trainers use 1 for both."""

    schedule: CosineSchedule = CosineSchedule()
    shift: float = 1.0
    loss_shift: float = 1.0

    def diffuse(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> Diffused:
        """Noise a float32 batch ``x0`` at random (or given) times; noise drawn from ``generator`` (CPU)."""
        batch = x0.shape[0]
        if t is None:
            t = sample_times(batch, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
        log_snr = self.schedule.log_snr(t, shift=self.shift).to(x0.device)
        a, b = vp_scalers(log_snr)
        view = (-1,) + (1,) * (x0.dim() - 1)
        noised = x0 * a.view(view) + noise * b.view(view)
        loss_snr = log_snr if self.loss_shift == 1 else log_snr + 2 * torch.log(torch.tensor(float(self.loss_shift)))
        return Diffused(noised, noise, noise, log_snr, self.schedule.model_time(log_snr), p2_loss_weight(loss_snr))


def diffusion_loss(pred: torch.Tensor, diffused: Diffused, accumulation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example MSE [B], the weighted mean divided by ``accumulation``) as the official forward pass."""
    per_example = torch.nn.functional.mse_loss(pred.float(), diffused.target.float(), reduction="none")
    per_example = per_example.mean(dim=list(range(1, pred.dim())))
    return per_example, (per_example * diffused.loss_weight).mean() / accumulation
