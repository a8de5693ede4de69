"""Würstchen v2 (the ICLR 2024 paper's model): the prior (stage C) and the DiffNeXt decoder (stage B).

Constructor keywords are those of the diffusers classes the hub files load into
(``WuerstchenPrior``, ``WuerstchenDiffNeXt``); the module tree is that of the original dome272
code, whose attention layers are ``nn.MultiheadAttention`` with a packed ``in_proj``. Both key
spellings load: a load-state-dict pre-hook fuses diffusers' ``attention.to_q/to_k/to_v`` into
``attention.attn.in_proj_*`` and renames ``attention.to_out.0`` to ``attention.attn.out_proj``
(see :func:`fuse_attention_keys`; :func:`split_attention_keys` is the inverse).

The blocks are Stable Cascade's (same math: ResBlock, TimestepBlock with one mapper, AttnBlock),
so the forward passes keep the residual stream channels-last, reuse a :class:`Workspace`, and
honour ``fp16_guard`` exactly as StageC/StageB do (see :class:`~.blocks.CascadeUNet`).

Differences from Stable Cascade that matter for parity (numbered as the reference README's v2
quirks):

* the model time is the sampling time t itself (8);
* prior output (x − a)/(|1 − b| + 1e-5); decoder output (x − a)/b with b squashed by a sigmoid (10);
* the decoder's effnet map is resized per level with bicubic, antialias, align_corners=True and
  concatenated into every ResBlock of that level (12);
* text: prior ``cond_mapper`` (Linear, LeakyReLU 0.2, Linear); decoder ``clip_mapper`` then a
  LayerNorm without affine (13).
"""

from __future__ import annotations

import re
from typing import Mapping, MutableMapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttnBlock, CascadeUNet, LayerNorm2d, ResBlock, TimestepBlock, nhwc_apply
from .ops import layer_norm_channels, linear, pointwise_conv, to_nchw, to_nhwc

__all__ = ["WuerstchenPrior", "WuerstchenDiffNeXt", "fuse_attention_keys", "split_attention_keys"]

PRIOR_B_EPS = 1e-5
"""Added to |1 − b| in the prior's output division."""

DECODER_B_EPS = 1e-3
"""The decoder squashes b into [eps, 1 − eps] before dividing by it."""


# ----------------------------------------------------------------------------------------------
# Key layouts
# ----------------------------------------------------------------------------------------------

_SPLIT_KEY = re.compile(r"^(.*\.attention\.)to_([qkv])\.(weight|bias)$")
_OUT_KEY = re.compile(r"^(.*\.attention\.)to_out\.0\.(weight|bias)$")
_PACKED_KEY = re.compile(r"^(.*\.attention\.)attn\.in_proj_(weight|bias)$")
_PACKED_OUT_KEY = re.compile(r"^(.*\.attention\.)attn\.out_proj\.(weight|bias)$")


def fuse_attention_keys(state_dict: MutableMapping[str, torch.Tensor], prefix: str = "") -> None:
    """Rewrite diffusers attention keys under ``prefix`` into the packed layout, in place.

    ``X.attention.to_q/to_k/to_v.{weight,bias}`` become ``X.attention.attn.in_proj_{weight,bias}``
    (rows q, k, v); ``X.attention.to_out.0.*`` becomes ``X.attention.attn.out_proj.*``. An
    incomplete q/k/v triple is left alone, so a strict load then names the missing piece.
    """
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        match = _SPLIT_KEY.match(key)
        if match:
            groups.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = key
            continue
        match = _OUT_KEY.match(key)
        if match:
            state_dict[f"{match.group(1)}attn.out_proj.{match.group(2)}"] = state_dict.pop(key)
    for (head, kind), parts in groups.items():
        if set(parts) != {"q", "k", "v"}:
            continue
        state_dict[f"{head}attn.in_proj_{kind}"] = torch.cat([state_dict.pop(parts[n]) for n in "qkv"], dim=0)


def split_attention_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusers spelling of a packed-layout state dict (a new dict; tensors are views)."""
    out = {}
    for key, tensor in state_dict.items():
        match = _PACKED_KEY.match(key)
        if match:
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"{match.group(1)}to_{name}.{match.group(2)}"] = part
            continue
        match = _PACKED_OUT_KEY.match(key)
        if match:
            out[f"{match.group(1)}to_out.0.{match.group(2)}"] = tensor
            continue
        out[key] = tensor
    return out


def _fuse_hook(module, state_dict, prefix, *_args):
    fuse_attention_keys(state_dict, prefix)


class _V2Net(CascadeUNet):
    """Dtype policy, workspace and r-embedding shared with Stable Cascade; both key spellings load."""

    def __init__(self):
        super().__init__()
        self.register_load_state_dict_pre_hook(_fuse_hook)

    def _levels(self):
        return [self.blocks] if hasattr(self, "blocks") else list(self.down_blocks) + list(self.up_blocks)

    def block_schedule(self):
        """The ResBlocks, TimestepBlocks and AttnBlocks in the order one forward calls them, each
        once: what weight streaming (:mod:`wuerstchen.sampling.streaming`) may move to the device one by one.
        The decoder's level changes run without a module call, so they stay with the trunk."""
        return [b for level in self._levels() for b in level if isinstance(b, (ResBlock, TimestepBlock, AttnBlock))]

    def _run(self, blocks, x, r_embed, clip, ws):
        """Run blocks on the channels-last stream (ResBlocks without extra inputs)."""
        for block in blocks:
            if isinstance(block, ResBlock):
                x = block(x, None, ws)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed, ws)
            elif isinstance(block, AttnBlock):
                x = block(x, clip, ws)
            else:
                x = nhwc_apply(block, x)
        return x


# ----------------------------------------------------------------------------------------------
# Prior (stage C)
# ----------------------------------------------------------------------------------------------

class WuerstchenPrior(_V2Net):
    """Würstchen v2 prior: text embeddings -> 16-channel semantic latent noise prediction.

    ``forward(x, r, c)``: ``x`` [B, c_in, h, w], ``r`` [B] the sampling time t, ``c`` the CLIP
    bigG ``last_hidden_state`` [B, S, c_cond]. A flat stack of ``depth`` × (ResBlock, TimestepBlock,
    AttnBlock) at one resolution.
    """

    def __init__(self, c_in: int = 16, c: int = 1280, c_cond: int = 1024, c_r: int = 64, depth: int = 16,
                 nhead: int = 16, dropout: float = 0.1):
        super().__init__()
        self.c_r = c_r
        self.projection = nn.Conv2d(c_in, c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(c_cond, c), nn.LeakyReLU(0.2), nn.Linear(c, c))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(ResBlock(c, dropout=dropout))
            self.blocks.append(TimestepBlock(c, c_r, conds=()))
            self.blocks.append(AttnBlock(c, c, nhead, self_attn=True, dropout=dropout))
        self.out = nn.Sequential(
            LayerNorm2d(c, elementwise_affine=False, eps=1e-6),
            nn.Conv2d(c, c_in * 2, kernel_size=1),
        )

    def compute_dtype(self) -> torch.dtype:
        return self.projection.weight.dtype

    def forward(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        dtype = self.stream_dtype()
        x_in = x.to(dtype)
        r_embed = self.gen_r_embedding(r).to(dtype)
        first, activation, second = self.cond_mapper
        cond = linear(c.to(dtype), first.weight, first.bias)
        cond = linear(F.leaky_relu(cond, activation.negative_slope), second.weight, second.bias)
        h = pointwise_conv(x_in.permute(0, 2, 3, 1), self.projection)
        h = self._run(self.blocks, h, r_embed, cond, self._workspace(x, r, c))
        out = to_nchw(pointwise_conv(layer_norm_channels(h, self.out[0].eps), self.out[1]))
        a, b = out.chunk(2, dim=1)
        return ((x_in - a) / ((1 - b).abs() + PRIOR_B_EPS)).to(self.compute_dtype()).contiguous()


# ----------------------------------------------------------------------------------------------
# Decoder (stage B)
# ----------------------------------------------------------------------------------------------

class WuerstchenDiffNeXt(_V2Net):
    """Würstchen v2 decoder: denoises the 4-channel VQGAN latent given the prior's effnet map and text.

    ``forward(x, r, effnet, clip, x_cat=None, eps=1e-3, return_noise=True)``: ``x`` [B, c_in, H, W]
    with H and W multiples of ``patch_size · 2^(levels−1)`` (16 for the released model), ``r`` [B]
    the sampling time, ``effnet`` the raw effnet map [B, effnet_embd, h, w] (any size, resized per
    level), ``clip`` the CLIP-H ``last_hidden_state`` [B, S, clip_embd]. With ``x_cat`` the two are
    concatenated before the embedding (``c_in`` counts both). ``return_noise=False`` returns (a, b).

    Module tree as the original: ``down_blocks[i]`` starts with the level's downscaler (i > 0),
    ``up_blocks[j]`` ends with its upscaler; ``effnet_mappers`` lists the down levels, then the up
    levels deepest first (None where a level takes no effnet).
    """

    def __init__(self, c_in: int = 4, c_out: int = 4, c_r: int = 64, patch_size: int = 2, c_cond: int = 1024,
                 c_hidden: Sequence[int] = (320, 640, 1280, 1280), nhead: Sequence[int] = (-1, 10, 20, 20),
                 blocks: Sequence[int] = (4, 4, 14, 4), level_config: Sequence[str] = ("CT", "CTA", "CTA", "CTA"),
                 inject_effnet: Sequence[bool] = (False, True, True, True), effnet_embd: int = 16,
                 clip_embd: int = 1024, kernel_size: int = 3, dropout=0.1, self_attn: bool = True):
        super().__init__()
        levels = len(c_hidden)
        for name, value in (("nhead", nhead), ("blocks", blocks), ("level_config", level_config),
                            ("inject_effnet", inject_effnet)):
            if len(value) != levels:
                raise ValueError(f"WuerstchenDiffNeXt: {name} has {len(value)} entries but c_hidden has {levels} levels")
        dropout = list(dropout) if isinstance(dropout, (list, tuple)) else [dropout] * levels
        inject_effnet = [bool(v) for v in inject_effnet]
        self.c_r, self.c_cond, self.c_out = c_r, c_cond, c_out
        self.patch_size, self.levels = patch_size, levels

        self.clip_mapper = nn.Linear(clip_embd, c_cond)
        self.effnet_mappers = nn.ModuleList(
            nn.Conv2d(effnet_embd, c_cond, kernel_size=1) if inject else None
            for inject in inject_effnet + inject_effnet[::-1])
        self.seq_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(c_in * patch_size ** 2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )

        def block(kind, i, c_skip):
            if kind == "C":
                return ResBlock(c_hidden[i], c_skip, kernel_size=kernel_size, dropout=dropout[i])
            if kind == "A":
                return AttnBlock(c_hidden[i], c_cond, nhead[i], self_attn=self_attn, dropout=dropout[i])
            if kind == "T":
                return TimestepBlock(c_hidden[i], c_r, conds=())
            raise ValueError(f"WuerstchenDiffNeXt: block type {kind!r} not supported (use 'C', 'T' or 'A')")

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            if i > 0:
                level.append(nn.Sequential(
                    LayerNorm2d(c_hidden[i - 1], elementwise_affine=False, eps=1e-6),
                    nn.Conv2d(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2),
                ))
            effnet_skip = c_cond if inject_effnet[i] else 0
            for _ in range(blocks[i]):
                for kind in level_config[i]:
                    level.append(block(kind, i, effnet_skip))
            self.down_blocks.append(level)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for j in range(blocks[i]):
                for k, kind in enumerate(level_config[i]):
                    c_skip = c_hidden[i] if i < levels - 1 and j == k == 0 else 0
                    c_skip += c_cond if inject_effnet[i] else 0
                    level.append(block(kind, i, c_skip))
            if i > 0:
                level.append(nn.Sequential(
                    LayerNorm2d(c_hidden[i], elementwise_affine=False, eps=1e-6),
                    nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2),
                ))
            self.up_blocks.append(level)

        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(c_hidden[0], 2 * c_out * patch_size ** 2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )

    @property
    def size_multiple(self) -> int:
        """Latent sides must be multiples of this (patch size times one halving per extra level)."""
        return self.patch_size * 2 ** (self.levels - 1)

    def _effnet_map(self, index: int, effnet: torch.Tensor, size, dtype) -> torch.Tensor | None:
        """Level ``index``'s effnet map, channels-last: bicubic antialiased resize (float32), 1x1 conv."""
        mapper = self.effnet_mappers[index]
        if mapper is None:
            return None
        resized = F.interpolate(effnet.float(), size=tuple(size), mode="bicubic", antialias=True, align_corners=True)
        return pointwise_conv(to_nhwc(resized).to(dtype), mapper)

    def _level(self, blocks, x, r_embed, clip, ws, effnet, mapper_index, skip=None):
        """Run one level's blocks. Every ResBlock gets the level's effnet map; the level's first
        block, when it is a ResBlock, gets ``skip`` in front of it ([skip, effnet], as the original)."""
        effnet_c = None
        for index, block in enumerate(blocks):
            if not isinstance(block, ResBlock):
                x = self._run([block], x, r_embed, clip, ws)
                continue
            if effnet_c is None:
                effnet_c = self._effnet_map(mapper_index, effnet, x.shape[1:3], x.dtype)
            extra = [t for t in ((skip if index == 0 else None), effnet_c) if t is not None]
            extra = torch.cat(extra, dim=-1) if len(extra) > 1 else (extra[0] if extra else None)
            x = block(x, extra, ws)
        return x

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor,
                x_cat: torch.Tensor | None = None, eps: float = DECODER_B_EPS, return_noise: bool = True):
        if x_cat is not None:
            x = torch.cat([x, x_cat.to(x.dtype)], dim=1)
        multiple = self.size_multiple
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"WuerstchenDiffNeXt: latent size {x.shape[-2]}x{x.shape[-1]} must be a multiple of {multiple} per "
                f"side (patch {self.patch_size}, {self.levels - 1} stride-2 levels, no skip resizing); for images "
                "this means a prior latent side divisible by 3")
        dtype = self.stream_dtype()
        x_in = x.to(dtype)
        r_embed = self.gen_r_embedding(r).to(dtype)
        clip = linear(clip.to(dtype), self.clip_mapper.weight, self.clip_mapper.bias)
        clip = F.layer_norm(clip, clip.shape[-1:], None, None, self.seq_norm.eps)
        ws = self._workspace(x, r, effnet, clip)

        h = self._embed(x_in)
        level_outputs = []
        for i, level in enumerate(self.down_blocks):
            h = self._level(level, h, r_embed, clip, ws, effnet, i)
            level_outputs.insert(0, h)
        h = level_outputs[0]
        for i, level in enumerate(self.up_blocks):
            skip = level_outputs[i] if i > 0 else None
            h = self._level(level, h, r_embed, clip, ws, effnet, self.levels + i, skip)

        out = self._classify(h, dtype)
        a, b = out.chunk(2, dim=1)
        b = b.sigmoid() * (1 - eps * 2) + eps
        if not return_noise:
            return a.to(self.compute_dtype()), b.to(self.compute_dtype())
        return ((x_in - a) / b).to(self.compute_dtype())
