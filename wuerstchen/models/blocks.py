"""Building blocks shared by the Stage C and Stage B diffusion U-Nets.

Every block keeps the official module layout, so ``state_dict()`` keys and shapes match the
released checkpoints (including the packed ``attention.attn.in_proj_weight`` of
``nn.MultiheadAttention``). The arithmetic is rewritten for speed:

* Inside the networks the residual stream is kept channels-last (``[B, H, W, C]``, contiguous),
  so the channel-wise MLPs, norms and attention projections need no permute copies. Each block
  has a ``forward_nhwc`` used by the networks; its ``forward`` accepts ``[B, C, H, W]`` like
  the official block.
* Fresh intermediate tensors are updated in place when autograd does not need them; on CPU the
  allocation of large tensors costs more than the arithmetic.
* Attention calls ``scaled_dot_product_attention`` directly on the packed projection weights.

Mixed precision ("fp16 guard"): when a block receives a float32 tensor while its weights are
float16, the heavy matrix products still run in float16, on an input rescaled by a power of two
so it cannot overflow, and everything else (residual stream, norms, GRN statistics, attention
softmax) stays in float32. See :func:`linear` and :class:`CascadeUNet.fp16_guard`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

#: In fp16-guard mode, inputs of float16 matrix products are scaled so that max |x| <= 2**this.
GUARD_INPUT_EXPONENT = 8


# ----------------------------------------------------------------------------------------------
# Mixed-precision helpers
# ----------------------------------------------------------------------------------------------

def _scaled_down(x: torch.Tensor, dtype: torch.dtype):
    """Return (x / s cast to ``dtype``, s), with s a power of two that keeps |x / s| <= 2**8."""
    amax = x.detach().abs().amax().float()
    exponent = torch.ceil(torch.log2(amax.clamp_min(1.0))) - GUARD_INPUT_EXPONENT
    scale = torch.exp2(exponent.clamp_min(0.0))
    return (x / scale).to(dtype), scale


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear`` that also takes a float32 ``x`` for low-precision weights (fp16 guard).

    In that case the product runs in the weight dtype on a rescaled copy of ``x`` and the result
    comes back in float32, so a large residual stream never overflows float16.
    """
    if x.dtype == weight.dtype:
        return F.linear(x, weight, bias)
    x_low, scale = _scaled_down(x, weight.dtype)
    out = F.linear(x_low, weight).to(x.dtype).mul_(scale)
    return out if bias is None else out.add_(bias)


def conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Run ``conv`` (any stride/groups) on ``x``; a float32 ``x`` with float16 weights is guarded."""
    weight, bias = conv.weight, conv.bias
    if x.dtype == weight.dtype:
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if conv.groups > 1:  # depthwise: cheap, just compute it in float32
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                        conv.stride, conv.padding, conv.dilation, conv.groups)
    x_low, scale = _scaled_down(x, weight.dtype)
    out = F.conv2d(x_low, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    out = out.to(x.dtype).mul_(scale)
    return out if bias is None else out.add_(bias.view(-1, 1, 1))


def conv_transpose2d(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """Run a transposed convolution; a float32 ``x`` with float16 weights is guarded."""
    weight, bias = conv.weight, conv.bias
    args = (conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation)
    if x.dtype == weight.dtype:
        return F.conv_transpose2d(x, weight, bias, *args)
    x_low, scale = _scaled_down(x, weight.dtype)
    out = F.conv_transpose2d(x_low, weight, None, *args).to(x.dtype).mul_(scale)
    return out if bias is None else out.add_(bias.view(-1, 1, 1))


def pointwise_conv(x_nhwc: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution applied to a channels-last tensor, as a matrix product."""
    return linear(x_nhwc, conv.weight.flatten(1), conv.bias)


def layer_norm_channels(x_nhwc: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine over the channel (last) dimension."""
    return F.layer_norm(x_nhwc, x_nhwc.shape[-1:], None, None, eps)


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, in place when autograd does not need the input."""
    return F.gelu(x) if x.requires_grad else torch.ops.aten.gelu_(x)


def to_nchw(x_nhwc: torch.Tensor) -> torch.Tensor:
    """View a channels-last ``[B, H, W, C]`` tensor as ``[B, C, H, W]`` (no copy)."""
    return x_nhwc.permute(0, 3, 1, 2)


def to_nhwc(x_nchw: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> contiguous ``[B, H, W, C]``; free for channels-last memory."""
    return x_nchw.permute(0, 2, 3, 1).contiguous()


def resize_nhwc(x_nhwc: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` computed in float32, as the official code does."""
    out = F.interpolate(to_nchw(x_nhwc).float(), size=tuple(size), mode="bilinear", align_corners=True)
    return to_nhwc(out).to(x_nhwc.dtype)


def sinusoidal_r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """The official time embedding: [sin, cos] of r * 10000 * 10000**(-k / (c_r/2 - 1)), float32.

    The float32 operation order (scale r first, then multiply by the frequencies) matches the
    official code exactly; an algebraically equal order moves the U-Net output by ~1e-4.
    """
    r = r.float() * max_positions
    half_dim = c_r // 2
    step = math.log(max_positions) / (half_dim - 1)
    freqs = torch.arange(half_dim, device=r.device).float().mul(-step).exp()
    emb = r[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1), mode="constant")
    return emb


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` tensor (official ``LayerNorm2d``)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on channels-last input: x * (1 + gamma * N(x)) + beta.

    N(x) is the per-channel L2 norm over H and W divided by its mean over channels (+1e-6).
    Statistics are computed in float32 even for low-precision input.
    """

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        return self.normalize_(x if x.requires_grad else x.clone())

    def normalize_(self, x):
        """GRN of x; overwrites x when autograd does not track it (x must be a tensor we own)."""
        batch, dim = x.shape[0], x.shape[-1]
        rows = x.reshape(batch, -1, dim)
        if rows.dtype == torch.float32:
            sum_sq = torch.bmm(x.new_ones(batch, 1, rows.shape[1]), rows * rows)
        else:
            sum_sq = rows.float().square().sum(dim=1, keepdim=True)
        norm = sum_sq.sqrt_().view(batch, 1, 1, dim)
        norm = norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)
        gamma, beta = self.gamma, self.beta
        if gamma.dtype != x.dtype:
            gamma, beta = gamma.to(x.dtype), beta.to(x.dtype)
        scale = norm.to(x.dtype).mul_(gamma).add_(1)
        if x.requires_grad or scale.requires_grad or beta.requires_grad:
            return torch.addcmul(beta, x, scale)
        return torch.addcmul(beta, x, scale, out=x)


class ResBlock(nn.Module):
    """Depthwise conv -> LayerNorm2d -> [concat skip] -> Linear 4c -> GELU -> GRN -> Linear, + residual."""

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(c + c_skip, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward_nhwc(self, x, x_skip=None):
        h = to_nhwc(conv2d(to_nchw(x), self.depthwise))
        h = layer_norm_channels(h)
        if x_skip is not None:
            h = torch.cat([h, x_skip], dim=-1)
        fc1, _, grn, dropout, fc2 = self.channelwise
        h = grn.normalize_(gelu_(linear(h, fc1.weight, fc1.bias)))
        if dropout.p > 0 and self.training:
            h = dropout(h)
        out = linear(h, fc2.weight, fc2.bias)
        return out + x if out.requires_grad else out.add_(x)

    def forward(self, x, x_skip=None):
        skip = None if x_skip is None else x_skip.permute(0, 2, 3, 1)
        return to_nchw(self.forward_nhwc(x.permute(0, 2, 3, 1), skip))


class PackedMultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout, via SDPA.

    Stores ``in_proj_weight`` [3c, c] (q, k, v stacked), ``in_proj_bias`` [3c] and ``out_proj``.
    Inputs are batch-first ``[B, L, c]``.
    """

    def __init__(self, c, nhead, dropout=0.0):
        super().__init__()
        if nhead <= 0 or c % nhead != 0:
            raise ValueError(f"attention width {c} must be divisible by a positive head count, got nhead={nhead}")
        self.embed_dim, self.num_heads, self.dropout = c, nhead, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * c))
        self.out_proj = nn.Linear(c, c)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key_value):
        """Attend ``query`` [B, L, c] to ``key_value`` [B, S, c] (the same tensor is keys and values)."""
        c, heads = self.embed_dim, self.num_heads
        batch, length, _ = query.shape
        weight, bias = self.in_proj_weight, self.in_proj_bias
        q = linear(query, weight[:c], bias[:c]).view(batch, length, heads, c // heads).transpose(1, 2)
        kv = linear(key_value, weight[c:], bias[c:]).view(batch, key_value.shape[1], 2, heads, c // heads)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(batch, length, c)
        return linear(out, self.out_proj.weight, self.out_proj.bias)


class Attention2D(nn.Module):
    """Attention of image tokens to conditioning tokens (optionally also to themselves)."""

    def __init__(self, c, nhead, dropout=0.0):
        super().__init__()
        self.attn = PackedMultiheadAttention(c, nhead, dropout=dropout)

    def forward_tokens(self, x, kv, self_attn=False):
        """x: [B, L, c] image tokens; kv: [B, S, c] conditioning tokens."""
        if self_attn:
            kv = torch.cat([x, kv], dim=1)
        return self.attn(x, kv)

    def forward(self, x, kv, self_attn=False):
        batch, c, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, c)
        out = self.forward_tokens(tokens, kv, self_attn)
        return out.view(batch, height, width, c).permute(0, 3, 1, 2)


class AttnBlock(nn.Module):
    """x + Attention(LayerNorm2d(x), Linear(SiLU(cond)))."""

    def __init__(self, c, c_cond, nhead, self_attn=True, dropout=0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward_nhwc(self, x, kv):
        batch, height, width, c = x.shape
        mapper = self.kv_mapper[1]
        kv = linear(F.silu(kv), mapper.weight, mapper.bias)
        tokens = layer_norm_channels(x).view(batch, height * width, c)
        out = self.attention.forward_tokens(tokens, kv, self.self_attn).view(batch, height, width, c)
        return out + x if out.requires_grad else out.add_(x)

    def forward(self, x, kv):
        return to_nchw(self.forward_nhwc(x.permute(0, 2, 3, 1).contiguous(), kv))


class FeedForwardBlock(nn.Module):
    """x + MLP(LayerNorm2d(x)) with the same GELU/GRN MLP as the ResBlock."""

    def __init__(self, c, dropout=0.0):
        super().__init__()
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(c, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward_nhwc(self, x):
        fc1, _, grn, dropout, fc2 = self.channelwise
        h = grn.normalize_(gelu_(linear(layer_norm_channels(x), fc1.weight, fc1.bias)))
        if dropout.p > 0 and self.training:
            h = dropout(h)
        out = linear(h, fc2.weight, fc2.bias)
        return out + x if out.requires_grad else out.add_(x)

    def forward(self, x):
        return to_nchw(self.forward_nhwc(x.permute(0, 2, 3, 1)))


class TimestepBlock(nn.Module):
    """x * (1 + a) + b, where (a, b) is the sum of one Linear per embedded time value (r, sca, ...)."""

    def __init__(self, c, c_timestep, conds=("sca",)):
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)
        self.conds = list(conds)
        for cname in self.conds:
            setattr(self, f"mapper_{cname}", nn.Linear(c_timestep, c * 2))

    def modulation(self, t):
        """(1 + a, b), each [B, c], from the concatenated embeddings t [B, c_r * (1 + len(conds))]."""
        chunks = t.chunk(len(self.conds) + 1, dim=1)
        ab = linear(chunks[0], self.mapper.weight, self.mapper.bias)
        for i, cname in enumerate(self.conds):
            layer = getattr(self, f"mapper_{cname}")
            ab = ab + linear(chunks[i + 1], layer.weight, layer.bias)
        a, b = ab.chunk(2, dim=1)
        return 1 + a, b

    def forward_nhwc(self, x, t):
        scale, shift = self.modulation(t)
        batch, c = shift.shape
        return torch.addcmul(shift.view(batch, 1, 1, c), x, scale.view(batch, 1, 1, c))

    def forward(self, x, t):
        return to_nchw(self.forward_nhwc(x.permute(0, 2, 3, 1), t))


class UpDownBlock2d(nn.Module):
    """Official Stage C level change: 1x1 conv plus an optional bilinear 2x / 0.5x resample.

    The official block casts to float32; here the resample runs in float32 and the conv in the
    weight dtype, which is what the official code does under autocast.
    """

    def __init__(self, c_in, c_out, mode, enabled=True):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        self.mode, self.enabled = mode, bool(enabled)
        interpolation = nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear",
                                    align_corners=True) if enabled else nn.Identity()
        mapping = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.blocks = nn.ModuleList([interpolation, mapping] if mode == "up" else [mapping, interpolation])

    def _resample(self, x_nhwc):
        if not self.enabled:
            return x_nhwc
        factor = 2.0 if self.mode == "up" else 0.5
        out = F.interpolate(to_nchw(x_nhwc).float(), scale_factor=factor, mode="bilinear", align_corners=True)
        return to_nhwc(out).to(x_nhwc.dtype)

    def forward_nhwc(self, x):
        mapping = self.blocks[1] if self.mode == "up" else self.blocks[0]
        if self.mode == "up":
            return pointwise_conv(self._resample(x), mapping)
        return self._resample(pointwise_conv(x, mapping))

    def forward(self, x):
        return to_nchw(self.forward_nhwc(x.permute(0, 2, 3, 1)))


def nhwc_apply(module: nn.Module, x_nhwc: torch.Tensor) -> torch.Tensor:
    """Apply a level-change module (LayerNorm2d, UpDownBlock2d, Conv2d, ConvTranspose2d,
    or an nn.Sequential of them) to a channels-last tensor."""
    if isinstance(module, nn.Sequential):
        for child in module:
            x_nhwc = nhwc_apply(child, x_nhwc)
        return x_nhwc
    if isinstance(module, LayerNorm2d):
        return layer_norm_channels(x_nhwc, module.eps)
    if isinstance(module, UpDownBlock2d):
        return module.forward_nhwc(x_nhwc)
    if isinstance(module, nn.Conv2d):
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1:
            return pointwise_conv(x_nhwc, module)
        return to_nhwc(conv2d(to_nchw(x_nhwc), module))
    if isinstance(module, nn.ConvTranspose2d):
        return to_nhwc(conv_transpose2d(to_nchw(x_nhwc), module))
    if isinstance(module, nn.Identity):
        return x_nhwc
    raise TypeError(f"no channels-last rule for {type(module).__name__}")


# ----------------------------------------------------------------------------------------------
# The shared U-Net skeleton
# ----------------------------------------------------------------------------------------------

class CascadeUNet(nn.Module):
    """Level structure and traversal shared by StageC and StageB.

    Subclasses build their conditioning and the ``embedding``/``clf`` heads, then call
    :meth:`_build_levels`. Attribute ``fp16_guard`` (default False): when True and the weights
    are float16, the forward keeps the residual stream, norms and statistics in float32 and runs
    only the heavy matrix products in float16 (on inputs rescaled so they cannot overflow).
    """

    fp16_guard: bool = False

    def _build_levels(self, *, c_hidden, nhead, blocks, block_repeat, level_config, dropout, self_attn,
                      c_cond, c_r, t_conds, kernel_size, make_downscaler, make_upscaler):
        levels = len(c_hidden)
        for name, value in (("nhead", nhead), ("level_config", level_config), ("blocks[0]", blocks[0]),
                            ("blocks[1]", blocks[1]), ("dropout", dropout), ("self_attn", self_attn)):
            if len(value) != levels:
                raise ValueError(f"{name} has {len(value)} entries but c_hidden has {levels} levels")

        def get_block(block_type, c, heads, c_skip=0, drop=0.0, attn_self=True):
            if block_type == "C":
                return ResBlock(c, c_skip, kernel_size=kernel_size, dropout=drop)
            if block_type == "A":
                return AttnBlock(c, c_cond, heads, self_attn=attn_self, dropout=drop)
            if block_type == "F":
                return FeedForwardBlock(c, dropout=drop)
            if block_type == "T":
                return TimestepBlock(c, c_r, conds=t_conds)
            raise ValueError(f"block type {block_type!r} not supported (use 'C', 'A', 'F' or 'T')")

        self.down_blocks = nn.ModuleList()
        self.down_downscalers = nn.ModuleList()
        self.down_repeat_mappers = nn.ModuleList()
        for i in range(levels):
            self.down_downscalers.append(make_downscaler(i) if i > 0 else nn.Identity())
            level = nn.ModuleList()
            for _ in range(blocks[0][i]):
                for block_type in level_config[i]:
                    level.append(get_block(block_type, c_hidden[i], nhead[i], drop=dropout[i],
                                           attn_self=self_attn[i]))
            self.down_blocks.append(level)
            if block_repeat is not None:
                self.down_repeat_mappers.append(nn.ModuleList(
                    nn.Conv2d(c_hidden[i], c_hidden[i], kernel_size=1) for _ in range(block_repeat[0][i] - 1)))

        self.up_blocks = nn.ModuleList()
        self.up_upscalers = nn.ModuleList()
        self.up_repeat_mappers = nn.ModuleList()
        for i in reversed(range(levels)):
            self.up_upscalers.append(make_upscaler(i) if i > 0 else nn.Identity())
            level = nn.ModuleList()
            for j in range(blocks[1][::-1][i]):
                for k, block_type in enumerate(level_config[i]):
                    c_skip = c_hidden[i] if i < levels - 1 and j == k == 0 else 0
                    level.append(get_block(block_type, c_hidden[i], nhead[i], c_skip=c_skip, drop=dropout[i],
                                           attn_self=self_attn[i]))
            self.up_blocks.append(level)
            if block_repeat is not None:
                self.up_repeat_mappers.append(nn.ModuleList(
                    nn.Conv2d(c_hidden[i], c_hidden[i], kernel_size=1)
                    for _ in range(block_repeat[1][::-1][i] - 1)))
        if block_repeat is None:  # the official zip() would stop at the empty list
            raise ValueError("block_repeat=None is not supported; use all ones")

    # -- dtype policy ---------------------------------------------------------------------------

    def compute_dtype(self) -> torch.dtype:
        """The parameter dtype; outputs are returned in it."""
        return self.embedding[1].weight.dtype

    def stream_dtype(self) -> torch.dtype:
        """dtype of the residual stream: float32 in fp16-guard mode, else the parameter dtype."""
        dtype = self.compute_dtype()
        if dtype == torch.float16 and self.fp16_guard:
            return torch.float32
        return dtype

    # -- conditioning ---------------------------------------------------------------------------

    def gen_r_embedding(self, r, max_positions=10000):
        return sinusoidal_r_embedding(r, self.c_r, max_positions)

    def _time_embedding(self, r, kwargs, dtype):
        parts = [self.gen_r_embedding(r)]
        for cname in self.t_conds:
            value = kwargs.get(cname)
            parts.append(self.gen_r_embedding(torch.zeros_like(r) if value is None else value.to(r.device)))
        return torch.cat(parts, dim=1).to(dtype)

    def _embed(self, x):
        """PixelUnshuffle -> 1x1 conv -> LayerNorm2d, returning channels-last."""
        patch = self.embedding[0].downscale_factor
        if patch > 1:
            x = F.pixel_unshuffle(x, patch)
        h = pointwise_conv(x.permute(0, 2, 3, 1), self.embedding[1])
        return layer_norm_channels(h, self.embedding[2].eps)

    def _classify(self, x_nhwc, out_dtype):
        """LayerNorm2d -> 1x1 conv -> PixelShuffle, returning a contiguous [B, C, H, W]."""
        h = pointwise_conv(layer_norm_channels(x_nhwc, self.clf[0].eps), self.clf[1])
        out = to_nchw(h)
        patch = self.clf[2].upscale_factor
        if patch > 1:
            out = F.pixel_shuffle(out, patch)
        return out.to(out_dtype).contiguous()

    # -- traversal -------------------------------------------------------------------------------

    @staticmethod
    def _inject(x, cnet, counter):
        """Add ControlNet entry ``counter`` (resized to x) before a ResBlock; None entries are skipped."""
        if cnet is None or counter >= len(cnet) or cnet[counter] is None:
            return x
        extra = cnet[counter].to(device=x.device, dtype=x.dtype)
        extra = F.interpolate(extra, size=x.shape[1:3], mode="bilinear", align_corners=True)
        return (x + extra.permute(0, 2, 3, 1)).contiguous()

    def _run_block(self, block, x, r_embed, clip, skip=None):
        if isinstance(block, ResBlock):
            return block.forward_nhwc(x, skip)
        if isinstance(block, AttnBlock):
            return block.forward_nhwc(x, clip)
        if isinstance(block, TimestepBlock):
            return block.forward_nhwc(x, r_embed)
        return block.forward_nhwc(x)

    def _down_encode(self, x, r_embed, clip, cnet=None, counter=0):
        level_outputs = []
        for level, downscaler, repeat_mappers in zip(self.down_blocks, self.down_downscalers,
                                                     self.down_repeat_mappers):
            x = nhwc_apply(downscaler, x)
            for rep in range(len(repeat_mappers) + 1):
                for block in level:
                    if isinstance(block, ResBlock):
                        x = self._inject(x, cnet, counter)
                        counter += 1
                    x = self._run_block(block, x, r_embed, clip)
                if rep < len(repeat_mappers):
                    x = pointwise_conv(x, repeat_mappers[rep])
            level_outputs.insert(0, x)
        return level_outputs, counter

    def _up_decode(self, level_outputs, r_embed, clip, cnet=None, counter=0):
        x = level_outputs[0]
        for i, (level, upscaler, repeat_mappers) in enumerate(zip(self.up_blocks, self.up_upscalers,
                                                                  self.up_repeat_mappers)):
            for rep in range(len(repeat_mappers) + 1):
                for k, block in enumerate(level):
                    skip = None
                    if isinstance(block, ResBlock):
                        skip = level_outputs[i] if k == 0 and i > 0 else None
                        if skip is not None and x.shape[1:3] != skip.shape[1:3]:
                            x = resize_nhwc(x, skip.shape[1:3])
                        x = self._inject(x, cnet, counter)
                        counter += 1
                    x = self._run_block(block, x, r_embed, clip, skip)
                if rep < len(repeat_mappers):
                    x = pointwise_conv(x, repeat_mappers[rep])
            x = nhwc_apply(upscaler, x)
        return x
