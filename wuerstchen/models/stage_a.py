"""Stage A: the f4 VQGAN that maps images to 4-channel latents and back.

Layout and numerics follow the official ``StageA`` (Stable Cascade) and its vector quantizer from
pytorch-tools, so ``stage_a.safetensors`` loads unchanged. The Würstchen v2 VQGAN has the same
network; :func:`stage_a_config_from_diffusers` translates its hub config and the quantizer accepts
its ``vquantizer.embedding.weight`` key name.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

# Rows of the distance matrix computed at once, times the codebook size (bounds VQ memory).
_VQ_CHUNK_ELEMENTS = 1 << 24


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup (squared L2, lowest index wins ties).

    The returned quantized tensor passes gradients straight through to the input, as the
    official pytorch-tools ``VectorQuantize`` does.
    """

    def __init__(self, embedding_size: int, k: int):
        super().__init__()
        self.codebook = nn.Embedding(k, embedding_size)
        nn.init.uniform_(self.codebook.weight, -1.0 / k, 1.0 / k)

    def nearest_indices(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` (N, C), in chunks, at least float32."""
        dtype = torch.promote_types(flat.dtype, torch.float32)
        codebook = self.codebook.weight.detach().to(dtype)
        flat = flat.detach().to(dtype)
        codebook_sqr = codebook.pow(2).sum(dim=1)
        chunk = max(1, _VQ_CHUNK_ELEMENTS // codebook.shape[0])
        indices = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, flat.shape[0], chunk):
            rows = flat[start:start + chunk]
            # Same expression and order as the official kernel: |c|^2 + |x|^2 - 2 x.c
            dist = torch.addmm(codebook_sqr + rows.pow(2).sum(dim=1, keepdim=True), rows, codebook.t(), alpha=-2.0)
            indices[start:start + chunk] = dist.argmin(dim=1)
        return indices

    def forward(self, x: torch.Tensor, dim: int = -1):
        """Return ``(quantized, (vq_loss, commit_loss), indices)``; ``dim`` is the channel axis."""
        moved = x.movedim(dim, -1) if dim != -1 else x
        flat = moved.reshape(-1, moved.shape[-1])
        indices = self.nearest_indices(flat)
        selected = self.codebook.weight.index_select(0, indices)
        vq_loss = (selected - flat.detach()).pow(2).mean()
        commit_loss = (flat - selected.detach()).pow(2).mean()
        quantized = selected.detach().to(flat.dtype) + (flat - flat.detach())
        quantized = quantized.view(moved.shape)
        if dim != -1:
            quantized = quantized.movedim(-1, dim)
        return quantized, (vq_loss, commit_loss), indices.view(moved.shape[:-1])

    def lookup(self, indices: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Codebook vectors for integer ``indices``, channel axis placed at ``dim``."""
        vectors = self.codebook(indices)
        return vectors.movedim(-1, dim) if dim != -1 else vectors

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        legacy = prefix + "embedding.weight"  # diffusers' name for the Würstchen v2 codebook
        if legacy in state_dict and prefix + "codebook.weight" not in state_dict:
            state_dict[prefix + "codebook.weight"] = state_dict.pop(legacy)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ResBlock(nn.Module):
    """Depthwise-conv and channel-MLP branches, each gated by learned scalars ``gammas``.

    gammas = (scale1, shift1, gate1, scale2, shift2, gate2) modulate the two LayerNorms and
    branch outputs. The depthwise conv pads by edge replication.
    """

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class StageA(nn.Module):
    """VQGAN with 4x spatial compression (2x pixel-unshuffle, ``levels - 1`` stride-2 convs).

    ``encode`` returns latents divided by ``scale_factor`` and ``decode`` multiplies them back,
    like the official class. The factor is a plain attribute, not part of the state dict.
    """

    def __init__(self, levels=2, bottleneck_blocks=12, c_hidden=384, c_latent=4, codebook_size=8192,
                 scale_factor=0.43):
        super().__init__()
        self.c_latent = c_latent
        self.codebook_size = codebook_size
        self.scale_factor = scale_factor
        c_levels = [c_hidden // (2 ** i) for i in reversed(range(levels))]

        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down = []
        for i in range(levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(ResBlock(c_levels[i], c_levels[i] * 4))
        down.append(nn.Sequential(
            nn.Conv2d(c_levels[-1], c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent),
        ))
        self.down_blocks = nn.Sequential(*down)

        self.vquantizer = VectorQuantizer(c_latent, k=codebook_size)

        up = [nn.Sequential(nn.Conv2d(c_latent, c_levels[-1], kernel_size=1))]
        for i in range(levels):
            c = c_levels[levels - 1 - i]
            up.extend(ResBlock(c, c * 4) for _ in range(bottleneck_blocks if i == 0 else 1))
            if i < levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype=self.in_block[1].weight.dtype) if x.is_floating_point() else x

    def encode(self, x: torch.Tensor, quantize: bool = False):
        """Encode images in [0, 1] (B, 3, H, W), H and W divisible by 4.

        Returns ``(latent / scale_factor, None, None, None)``, or with ``quantize`` True
        ``(quantized / scale_factor, latent / scale_factor, indices (B, H/4, W/4), vq_loss + 0.25 * commit_loss)``.
        """
        x = self.down_blocks(self.in_block(self._cast(x)))
        if not quantize:
            return x / self.scale_factor, None, None, None
        quantized, (vq_loss, commit_loss), indices = self.vquantizer(x, dim=1)
        return quantized / self.scale_factor, x / self.scale_factor, indices, vq_loss + commit_loss * 0.25

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Decode latents (as returned by ``encode``) to images, roughly in [0, 1]."""
        x = self._cast(x) * self.scale_factor
        return self.out_block(self.up_blocks(x))

    def encode_unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """The unquantized latent without the scale factor (diffusers' ``PaellaVQModel.encode``)."""
        return self.down_blocks(self.in_block(self._cast(x)))

    def decode_unscaled(self, h: torch.Tensor) -> torch.Tensor:
        """Decode ``h`` as given, no scale factor applied (diffusers' ``PaellaVQModel.decode`` without
        quantization; the Würstchen v2 pipeline passes ``0.3764 · latent``)."""
        return self.out_block(self.up_blocks(self._cast(h)))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode codebook indices (B, h, w) to images."""
        return self.decode(self.vquantizer.lookup(indices, dim=1) / self.scale_factor)

    def forward(self, x: torch.Tensor, quantize: bool = False):
        """Round trip as in the official class: ``(decode(encode(x)[0]), vq_loss)``."""
        latent, _, _, vq_loss = self.encode(x, quantize)
        return self.decode(latent), vq_loss


_DIFFUSERS_VQGAN_FIXED = {"in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2}
_DIFFUSERS_VQGAN_RENAMES = {
    "levels": "levels",
    "bottleneck_blocks": "bottleneck_blocks",
    "embed_dim": "c_hidden",
    "latent_channels": "c_latent",
    "num_vq_embeddings": "codebook_size",
    "scale_factor": "scale_factor",
}


def stage_a_config_from_diffusers(config: Mapping) -> dict:
    """Translate a diffusers ``PaellaVQModel`` (Würstchen v2 VQGAN) config to StageA kwargs."""
    for key, expected in _DIFFUSERS_VQGAN_FIXED.items():
        if key in config and config[key] != expected:
            raise ValueError(f"StageA only supports {key}={expected}; the VQGAN config has {key}={config[key]}")
    known = set(_DIFFUSERS_VQGAN_FIXED) | set(_DIFFUSERS_VQGAN_RENAMES)
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unsupported PaellaVQModel config keys: {unknown}")
    return {ours: config[theirs] for theirs, ours in _DIFFUSERS_VQGAN_RENAMES.items() if theirs in config}
