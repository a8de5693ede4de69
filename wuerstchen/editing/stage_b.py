"""Edit-aware Stage B: the source's VQGAN latent is kept outside the edit, regenerated inside.

Stage B samples as usual (the official DDPM update, or DDIM; same schedule, guidance and CPU
noise as :func:`wuerstchen.pipeline.stages.sample_stage_b`), conditioned on the edited Stage C latent,
but after every step the latent outside the edit is replaced by the source latent noised to the
step's time (``a'·src + b'·z``, fresh z each step, as in RePaint), with a feathered mask so the
seam is blended over a few latent cells; the last x0 is blended with the clean source the same
way. Where the mask is 0 the result is the source latent exactly, so Stage A decodes the
source's own round trip there (up to the decoder's reach across the edge).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs import limits
from ..pipeline.stages import StageBSettings, cpu_generator, stage_b_latent_size
from ..sampling.samplers import batch_conditioning, guide
from ..sampling.schedule import step_schedule
from .masks import feather

ETA = {"ddpm": 1.0, "ddim": 0.0}
"""The Stage B samplers the edit loop has (DDIM with this eta; ddpm is the official one)."""


def latent_mask(mask: torch.Tensor, latent_size: Tuple[int, int], feather_cells: int = 2) -> torch.Tensor:
    """A pixel mask [H, W] (or Stage C cells [h, w], any size) as a feathered Stage B mask [h, w]:
    1 on every cell the mask touches, falling to 0 over ``2·feather_cells`` cells around it."""
    m = F.adaptive_max_pool2d(mask.float()[None, None], latent_size)[0, 0] > 0
    if mask.shape[-2] < latent_size[0]:  # coarser than the latent: nearest upsampling of the cells
        m = F.interpolate(mask.float()[None, None], size=latent_size, mode="nearest")[0, 0] > 0
    return feather(m, feather_cells)


@torch.no_grad()
def sample_stage_b_edit(model: nn.Module, stage_c_latent: torch.Tensor, pooled: torch.Tensor,
                        pooled_uncond: torch.Tensor, source: torch.Tensor, edit_mask: torch.Tensor, *,
                        size: Tuple[int, int], seed: int = 0, settings: StageBSettings = StageBSettings(),
                        feather_cells: int = 2, callback=None) -> torch.Tensor:
    """The Stage B latent [B, 4, h, w] for the edited Stage C latent, equal to ``source`` (the source
    picture's Stage A encode, [1 or B, 4, h, w]) wherever the feathered ``edit_mask`` is 0.
    ``edit_mask`` is a pixel mask [H, W] (or the edit's Stage C cells) of what changed."""
    settings.check()
    if settings.sampler not in ETA:
        raise limits.RequestError(f"edit-aware Stage B samples with {' or '.join(ETA)}, not {settings.sampler!r}")
    height, width = limits.check_size(size[0], size[1], "Stage B output size")
    param = next(model.parameters())
    device = param.device
    patch = model.embedding[0].downscale_factor if hasattr(model, "embedding") else 2
    h, w = stage_b_latent_size(height, width, patch)
    batch = stage_c_latent.shape[0]
    if source.dim() != 4 or source.shape[1] != 4 or source.shape[0] not in (1, batch):
        raise limits.RequestError(f"the source Stage B latent must be [1 or {batch}, 4, h, w], got {list(source.shape)}")
    src = source.float()[..., :h, :w]
    sh, sw = src.shape[-2:]
    if (sh, sw) != (h, w):  # a source short of the even sides: its edge repeated, and regenerated
        src = F.pad(src, (0, w - sw, 0, h - sh), mode="replicate")
    src = src.expand(batch, -1, -1, -1).to(device)
    mask = latent_mask(edit_mask, (h, w), feather_cells)
    mask[sh:, :] = 1
    mask[:, sw:] = 1
    mask = mask.to(device)
    generator = cpu_generator(seed)
    x = torch.randn((batch, 4, h, w), generator=generator).to(device)
    effnet = stage_c_latent.float().to(device)
    cond = {"effnet": effnet, "clip": pooled.float().expand(batch, *pooled.shape[1:]).to(device)}
    uncond = {"effnet": torch.zeros_like(effnet), "clip": pooled_uncond.float().expand(batch, *pooled_uncond.shape[1:]).to(device)}
    inputs = batch_conditioning(cond, uncond, batch, device) if settings.cfg != 1 else cond
    schedule = step_schedule(settings.steps, shift=settings.shift)
    eta = ETA[settings.sampler]
    check = limits.finite_callback("Stage B", param.dtype, callback, fp16_guard=bool(getattr(model, "fp16_guard", False)))

    def draw():
        return torch.randn((batch, 4, h, w), generator=generator).to(device)

    x0 = x
    for i in range(settings.steps):
        r = schedule.r[i].expand(batch).to(device)
        if settings.cfg != 1:
            out = model(torch.cat([x, x]), r.repeat(2), **inputs).float()
            eps = guide(*out.chunk(2), settings.cfg, settings.cfg_rho)
        else:
            eps = model(x, r, **inputs).float()
        a, b, a1, b1 = (schedule.a[i], schedule.b[i], schedule.a[i + 1], schedule.b[i + 1])
        x0 = (x - eps * b.item()) / a.item()
        if eta == 0:
            x = a1.item() * x0 + b1.item() * eps
        else:
            sigma = eta * (b1 ** 2 / b ** 2).sqrt() * (1 - a ** 2 / a1 ** 2).sqrt()
            x = a1.item() * x0 + (b1 ** 2 - sigma ** 2).sqrt().item() * eps + sigma.item() * draw()
        known = a1.item() * src + b1.item() * draw()
        x = x * mask + known * (1 - mask)
        check(i + 1, settings.steps, x0)
    return (x0 * mask + src * (1 - mask)).float().cpu()
