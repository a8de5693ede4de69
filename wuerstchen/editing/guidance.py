"""Stage C conditioning for an edit: the model inputs of both CFG halves, prepared once.

With ``cfg == 1`` only the conditional half runs (as :func:`wuerstchen.sampling.samplers.sample` does);
otherwise one batched [cond; uncond] call per step and the official guidance rule
(:func:`wuerstchen.sampling.samplers.guide`, with the ``cfg_rho`` rescale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from ..pipeline.stages import Conditioning, pad_tokens, repeat_tokens
from ..sampling.samplers import guide


def _match(cond: Dict[str, torch.Tensor], uncond: Dict[str, torch.Tensor]) -> None:
    """Both halves with the same token counts (zero image tokens, repeated text windows)."""
    for key, grow in (("clip_text", repeat_tokens), ("clip_img", pad_tokens)):
        n = max(cond[key].shape[1], uncond[key].shape[1])
        cond[key], uncond[key] = grow(cond[key], n), grow(uncond[key], n)


@dataclass
class Guidance:
    """An epsilon predictor for latents of one batch size: ``guidance(model, x, r)``."""

    inputs: Dict[str, torch.Tensor]
    cfg: float = 1.0
    cfg_rho: float = 0.7

    @classmethod
    def prepare(cls, model: nn.Module, cond: Conditioning, uncond: Optional[Conditioning] = None, *,
                batch: int = 1, cfg: float = 1.0, cfg_rho: float = 0.7) -> "Guidance":
        """Inputs for ``batch`` latents on the model's device; ``uncond`` is needed only when cfg != 1."""
        param = next(model.parameters())
        c_clip_img = model.clip_img_mapper.in_features
        cond_in = cond.stage_c_inputs(batch, c_clip_img)
        if cfg == 1:
            return cls({k: v.to(param.device) for k, v in cond_in.items()}, 1.0, cfg_rho)
        if uncond is None:
            raise ValueError(f"classifier-free guidance (cfg={cfg}) needs the negative conditioning")
        uncond_in = uncond.stage_c_inputs(batch, c_clip_img)
        _match(cond_in, uncond_in)
        paired = {k: torch.cat([cond_in[k], uncond_in[k].to(cond_in[k].dtype)]).to(param.device) for k in cond_in}
        return cls(paired, float(cfg), cfg_rho)

    @property
    def batched(self) -> bool:
        return self.cfg != 1

    def __call__(self, model: nn.Module, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The (guided) epsilon prediction in float32 for x [B, 16, h, w] at model time r (a scalar)."""
        batch = x.shape[0]
        if not self.batched:
            return model(x, r.expand(batch).to(x.device), **self.inputs).float()
        out = model(torch.cat([x, x]), r.expand(2 * batch).to(x.device), **self.inputs).float()
        eps_cond, eps_uncond = out.chunk(2)
        return guide(eps_cond, eps_uncond, self.cfg, self.cfg_rho)
