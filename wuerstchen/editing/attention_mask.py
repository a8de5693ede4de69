"""Key-masked self-attention on Stage C (DesignEdit's background filling), as a context manager.

Every attention of the Stage C blocks goes through ``PackedMultiheadAttention._sdpa(q, kv_parts,
ws)``; in a self-attention block the key/value parts are the image tokens (H·W, row-major) and
then the conditioning tokens. Inside :func:`key_mask` the self-attention modules of the network
get an instance-level ``_sdpa`` that passes ``scaled_dot_product_attention`` a boolean mask: the
image keys inside the hole get no weight at all (their logits are −inf, so their softmax weight is
exactly 0), the conditioning keys and the keys outside the hole are untouched. Every query keeps
the conditioning keys, so no row of the softmax is empty. The network is not copied; the original
method is back on every module when the block exits, on error too.

The hole is given per instance, [B, h, w] at the latent's cells (True = masked key); an all-False
instance attends as usual. The CFG batch [cond; uncond] repeats it. Blocks that run at a coarser
resolution (a Stage C with level switches) take the hole max-pooled to their size.
"""

from __future__ import annotations

import contextlib
import types
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import AttnBlock, PackedMultiheadAttention


def self_attention_modules(model: nn.Module) -> List[PackedMultiheadAttention]:
    """The attention modules of the blocks whose keys include the image tokens."""
    return [m.attention.attn for m in model.modules() if isinstance(m, AttnBlock) and m.self_attn]


class _KeyMask:
    """The keep-mask for each (batch, token count) a block asks for, built once per shape."""

    def __init__(self, hole: torch.Tensor):
        if hole.dim() != 3:
            raise ValueError(f"the key-mask hole must be [batch, height, width], got {list(hole.shape)}")
        self.hole = hole.bool()
        self._cache: Dict[Tuple, torch.Tensor] = {}

    def _grid(self, length: int) -> torch.Tensor:
        """The hole at the resolution whose cell count is ``length`` ([B, length], True = masked)."""
        h, w = self.hole.shape[-2:]
        for factor in (1, 2, 4, 8, 16):
            hh, ww = -(-h // factor), -(-w // factor)
            if hh * ww == length:
                hole = self.hole.float()[:, None]
                if factor > 1:
                    hole = F.adaptive_max_pool2d(hole, (hh, ww))
                return hole.reshape(hole.shape[0], length) > 0
        raise ValueError(f"a self-attention block has {length} image tokens, which no downscale of the "
                         f"{w}x{h} hole gives")

    def keep(self, batch: int, length: int, total: int, device: torch.device) -> torch.Tensor:
        """Boolean [batch, 1, 1, total] (True = attend) for image tokens first, then the others."""
        key = (batch, length, total, device)
        mask = self._cache.get(key)
        if mask is None:
            hole = self._grid(length)
            if batch % hole.shape[0]:
                raise ValueError(f"the key-mask hole has {hole.shape[0]} instances but the attention batch is {batch}")
            hole = hole.repeat(batch // hole.shape[0], 1)  # [cond; uncond] halves repeat the instances
            extra = torch.zeros(batch, total - length, dtype=torch.bool)
            mask = self._cache[key] = (~torch.cat([hole, extra], dim=1)).view(batch, 1, 1, total).to(device)
        return mask


def _masked_sdpa(state: _KeyMask):
    def _sdpa(self, q, kv_parts, ws):
        c, heads = self.embed_dim, self.num_heads
        head_dim = c // heads
        batch, length, _ = q.shape
        kv = torch.cat(list(kv_parts), dim=1) if len(kv_parts) > 1 else kv_parts[0]
        total = kv.shape[1]
        k, v = kv.reshape(batch, total, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        qh = q.reshape(batch, length, heads, head_dim).transpose(1, 2)
        keep = state.keep(batch, kv_parts[0].shape[1], total, q.device)
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=keep, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(batch, length, c)

    return _sdpa


_MISSING = object()


@contextlib.contextmanager
def key_mask(model: nn.Module, hole: torch.Tensor) -> Iterator[List[PackedMultiheadAttention]]:
    """Within the block, Stage C's self-attention gives zero weight to image keys inside ``hole``
    ([B, h, w] bool or 0/1, the latent's cells). Yields the hooked modules."""
    modules = self_attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no self-attention blocks to mask")
    state = _KeyMask(hole)
    saved = []
    try:
        for module in modules:
            saved.append((module, module.__dict__.get("_sdpa", _MISSING)))
            module._sdpa = types.MethodType(_masked_sdpa(state), module)
        yield modules
    finally:
        for module, previous in reversed(saved):
            if previous is _MISSING:
                module.__dict__.pop("_sdpa", None)
            else:
                module._sdpa = previous
