"""Building blocks shared by the Stage C and Stage B diffusion U-Nets.

Every block keeps the official module layout, so ``state_dict()`` keys and shapes match the
released checkpoints (including the packed ``attention.attn.in_proj_weight`` of
``nn.MultiheadAttention``). The arithmetic is rewritten for speed, within float32 rounding of the
official results:

* The networks keep the residual stream channels-last (``[B, H, W, C]``, contiguous): every
  block's ``forward`` takes and returns channels-last tensors (unlike the official NCHW blocks),
  so the channel-wise MLPs, norms and attention projections need no permute copies.
* Under no_grad the networks pass a :class:`Workspace`: large temporaries go into reused
  buffers and residual updates are accumulated in place (on CPU, allocating and first touching
  a large tensor costs about as much as the arithmetic on it).
* Attention calls ``scaled_dot_product_attention`` on the packed projection weights.
* The GRN scale is folded into the following weight when there are more tokens than channels.

Mixed precision ("fp16 guard"): when a block receives a float32 tensor while its weights are
float16, the heavy matrix products still run in float16, on an input rescaled by a power of two
so it cannot overflow, and everything else (residual stream, norms, GRN statistics, attention
softmax) stays in float32. See :mod:`.ops` and :class:`CascadeUNet`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import (Workspace, add_projection, compute_weight, conv2d, conv_transpose2d, gelu_, is_fp8,
                  layer_norm_channels, linear, pointwise_conv, resize_nhwc, scratch, to_nchw, to_nhwc)


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
    """The official ``LayerNorm2d``: a LayerNorm over channels. On the networks' channels-last
    stream that is plain :class:`nn.LayerNorm`, so nothing is overridden."""


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on channels-last input: gamma * (x * N(x)) + beta + x.

    N(x) is the per-channel L2 norm over H and W divided by its mean over channels (+1e-6).
    Statistics are computed in float32 even for low-precision input.
    """

    #: the sum of squares is accumulated over chunks of about this many elements (no big temporary)
    chunk_elements = 1 << 19
    #: let the MLP fold this GRN's scale into the next weight when that is cheaper (see _channel_mlp)
    fold_scale = True

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _sum_of_squares(self, rows, ws=None):
        """Per-channel sum of squares over dim 1 of [B, N, C], in float32."""
        batch, length, dim = rows.shape
        if rows.requires_grad or rows.device.type != "cpu":  # accelerators: allocation is cheap
            return rows.float().square().sum(dim=1, keepdim=True)
        step = max(1, min(length, self.chunk_elements // max(1, batch * dim)))
        total = rows.new_zeros((batch, 1, dim), dtype=torch.float32)
        buffer = None
        if rows.dtype == torch.float32:
            buffer = scratch(ws, "grn_chunk", (batch, step, dim), rows)
            if buffer is None:
                buffer = rows.new_empty((batch, step, dim))
        for start in range(0, length, step):
            part = rows[:, start:start + step]
            if buffer is not None:
                squares = torch.mul(part, part, out=buffer[:, :part.shape[1]])
            else:
                squares = part.float().square_()
            total += squares.sum(dim=1, keepdim=True)
        return total

    def response_scale(self, x, ws=None):
        """1 + gamma * N(x), shape [B, 1, 1, C], in x's dtype: GRN(x) = x * scale + beta."""
        batch, dim = x.shape[0], x.shape[-1]
        norm = self._sum_of_squares(x.reshape(batch, -1, dim), ws).sqrt_().view(batch, 1, 1, dim)
        norm = norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)
        return norm.to(x.dtype) * self.gamma.to(x.dtype) + 1

    def normalize_(self, x, ws=None):
        """GRN of x; overwrites x when autograd does not track it (x must be a tensor we own)."""
        scale, beta = self.response_scale(x, ws), self.beta.to(x.dtype)
        if x.requires_grad or scale.requires_grad or beta.requires_grad:
            return torch.addcmul(beta, x, scale)
        return torch.addcmul(beta, x, scale, out=x)


def _channel_mlp(x, h, channelwise, ws, training):
    """x + Linear(Dropout(GRN(GELU(Linear(h))))), the MLP shared by ResBlock and FeedForwardBlock.

    With a workspace and the GRN statistics in hand, the GRN's per-(sample, channel) scale is
    folded into a per-sample copy of the second weight when that is smaller than the activation
    (more tokens than channels), saving a full pass over the 4c-wide activation.
    """
    fc1, _, grn, dropout, fc2 = channelwise
    hidden = linear(h, fc1.weight, fc1.bias, out=scratch(ws, "mlp_hidden", (*h.shape[:-1], fc1.out_features), h))
    hidden = gelu_(hidden)
    use_dropout = training and dropout.p > 0
    batch, width = x.shape[0], hidden.shape[-1]
    tokens = hidden.numel() // (batch * width)
    weight2 = compute_weight(fc2.weight, fc2.bias, x)
    fold = (ws is not None and grn.fold_scale and not use_dropout and hidden.dtype == weight2.dtype == x.dtype
            and tokens > fc2.out_features and x.is_contiguous())
    if not fold:
        hidden = grn.normalize_(hidden, ws)
        if use_dropout:
            hidden = dropout(hidden)
        return add_projection(x, hidden, fc2, ws)
    # W2 (h * s + beta) + b2 == (W2 * s) h + (W2 beta + b2), with s per sample and channel
    scale = grn.response_scale(hidden, ws).view(batch, 1, width)
    scaled_weight = torch.mul(weight2, scale, out=ws.get("mlp_folded_weight", (batch, *weight2.shape), x))
    shift = torch.addmv(fc2.bias, weight2, grn.beta.view(width).to(x.dtype))
    x3 = x.view(batch, tokens, x.shape[-1])
    x3.baddbmm_(hidden.view(batch, tokens, width), scaled_weight.transpose(1, 2))
    return x.add_(shift)


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

    def forward(self, x, x_skip=None, ws=None):
        """x, x_skip: [B, H, W, C]. With a workspace ``ws`` the result overwrites x."""
        h = layer_norm_channels(to_nhwc(conv2d(to_nchw(x), self.depthwise)), self.norm.eps)
        if x_skip is not None:
            shape = (*h.shape[:-1], h.shape[-1] + x_skip.shape[-1])
            h = torch.cat([h, x_skip], dim=-1, out=scratch(ws, "res_cat", shape, h))
        return _channel_mlp(x, h, self.channelwise, ws, self.training)


class PackedMultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout, via SDPA.

    Stores ``in_proj_weight`` [3c, c] (q, k, v stacked), ``in_proj_bias`` [3c] and ``out_proj``.
    Inputs are batch-first ``[B, L, c]``.
    """

    fp8_weights = ("in_proj_weight",)  # only ever used through ops.linear (see ops.fp8_weight_names)

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

    def attend(self, query, cond, self_attn, ws=None):
        """Attention before the output projection, [B, L, c].

        Queries come from ``query`` [B, L, c]; keys and values from ``cond`` [B, S, c], preceded
        by ``query`` itself when ``self_attn`` (the official ``cat([x, kv])``). With self_attn,
        q, k and v of the query tokens come from one fused matrix product.
        """
        c = self.embed_dim
        batch, length, _ = query.shape
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if self_attn:
            qkv = linear(query, weight, bias, out=scratch(ws, "attn_qkv", (batch, length, 3 * c), query))
            q, kv_query = qkv[..., :c], qkv[..., c:]
        else:
            q = linear(query, weight[:c], bias[:c], out=scratch(ws, "attn_q", (batch, length, c), query))
            kv_query = None
        kv_cond = linear(cond, weight[c:], bias[c:], out=scratch(ws, "attn_kv", (batch, cond.shape[1], 2 * c), cond))
        return self._sdpa(q, [kv for kv in (kv_query, kv_cond) if kv is not None], ws)

    def _sdpa(self, q, kv_parts, ws):
        """SDPA on projected q [B, L, c] and k/v pieces [B, S_i, 2c] (concatenated along S)."""
        c, heads = self.embed_dim, self.num_heads
        head_dim = c // heads
        batch, length, _ = q.shape
        # The CPU SDPA kernel runs ~25% faster with head-major contiguous keys and values than with
        # strided views. q stays a [B, L, heads, d] view: the output then comes back in that layout,
        # so merging the heads again needs no copy.
        q = q.view(batch, length, heads, head_dim).transpose(1, 2)
        pairs = sum(part.shape[1] for part in kv_parts)
        shape = (2, batch, heads, pairs, head_dim)
        kv = scratch(ws, "attn_kv_heads", shape, q)
        if kv is None:
            kv = q.new_empty(shape)
        start = 0
        for part in kv_parts:
            count = part.shape[1]
            kv[:, :, :, start:start + count].copy_(part.view(batch, count, 2, heads, head_dim).permute(2, 0, 3, 1, 4))
            start += count
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(batch, length, c)


class Attention2D(nn.Module):
    """Attention of image tokens to conditioning tokens (optionally also to themselves)."""

    def __init__(self, c, nhead, dropout=0.0):
        super().__init__()
        self.attn = PackedMultiheadAttention(c, nhead, dropout=dropout)


class AttnBlock(nn.Module):
    """x + Attention(LayerNorm2d(x), Linear(SiLU(cond)))."""

    def __init__(self, c, c_cond, nhead, self_attn=True, dropout=0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x, kv, ws=None):
        """x: [B, H, W, C]; kv: [B, S, c_cond]. With a workspace ``ws`` the result overwrites x."""
        batch, height, width, c = x.shape
        mapper = self.kv_mapper[1]
        kv = linear(F.silu(kv), mapper.weight, mapper.bias)
        tokens = layer_norm_channels(x, self.norm.eps).view(batch, height * width, c)
        attn = self.attention.attn
        out = attn.attend(tokens, kv, self.self_attn, ws)
        return add_projection(x, out.view(batch, height, width, c), attn.out_proj, ws)


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

    def forward(self, x, ws=None):
        """x: [B, H, W, C]. With a workspace ``ws`` the result overwrites x."""
        return _channel_mlp(x, layer_norm_channels(x, self.norm.eps), self.channelwise, ws, self.training)


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

    def forward(self, x, t, ws=None):
        """x: [B, H, W, C]; t: time embeddings. With a workspace ``ws`` the result overwrites x."""
        scale, shift = self.modulation(t)
        batch, c = shift.shape
        scale, shift = scale.view(batch, 1, 1, c), shift.view(batch, 1, 1, c)
        if ws is not None and scale.dtype == x.dtype:
            return torch.addcmul(shift, x, scale, out=x)
        return torch.addcmul(shift, x, scale)


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

    def forward(self, x):
        """x: [B, H, W, C]."""
        mapping = self.blocks[1] if self.mode == "up" else self.blocks[0]
        if self.mode == "up":
            return pointwise_conv(self._resample(x), mapping)
        return self._resample(pointwise_conv(x, mapping))


def nhwc_apply(module: nn.Module, x_nhwc: torch.Tensor) -> torch.Tensor:
    """Apply a level-change module (LayerNorm2d, UpDownBlock2d, Conv2d, ConvTranspose2d,
    or an nn.Sequential of them) to a channels-last tensor."""
    if isinstance(module, nn.Sequential):
        for child in module:
            x_nhwc = nhwc_apply(child, x_nhwc)
        return x_nhwc
    if isinstance(module, (LayerNorm2d, UpDownBlock2d)):
        return module(x_nhwc)
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
        if block_repeat is None:  # the official code would then silently run no blocks at all
            raise ValueError("block_repeat=None is not supported; use [[1] * levels, [1] * levels]")
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
            self.up_repeat_mappers.append(nn.ModuleList(
                nn.Conv2d(c_hidden[i], c_hidden[i], kernel_size=1) for _ in range(block_repeat[1][::-1][i] - 1)))

    # -- dtype policy ---------------------------------------------------------------------------

    def compute_dtype(self) -> torch.dtype:
        """The parameter dtype (for fp8-stored weights, the dtype their biases and norms keep,
        which the layers upcast them to); outputs are returned in it."""
        conv = self.embedding[1]
        return conv.bias.dtype if is_fp8(conv.weight.dtype) else conv.weight.dtype

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
            if value is None:
                value = torch.zeros_like(r)
            elif not torch.is_tensor(value) or value.dim() == 0:  # a plain number: same for the batch
                value = torch.as_tensor(value, dtype=torch.float32, device=r.device).expand(r.shape[0])
            parts.append(self.gen_r_embedding(value.to(r.device)))
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

    def block_schedule(self):
        """The blocks in the order one forward calls them (level repeats included): what a
        weight-streaming schedule (:mod:`wuerstchen.sampling.streaming`) moves to the device one by one."""
        order = []
        for levels in (self.down_blocks, self.up_blocks):
            mappers = self.down_repeat_mappers if levels is self.down_blocks else self.up_repeat_mappers
            for level, repeat_mappers in zip(levels, mappers):
                for _ in range(len(repeat_mappers) + 1):
                    order.extend(level)
        return order

    @staticmethod
    def _inject(x, cnet, counter):
        """Add ControlNet entry ``counter`` (resized to x) before a ResBlock; None entries are skipped."""
        if cnet is None or counter >= len(cnet) or cnet[counter] is None:
            return x
        extra = cnet[counter].to(device=x.device, dtype=x.dtype)
        extra = F.interpolate(extra, size=x.shape[1:3], mode="bilinear", align_corners=True)
        return (x + extra.permute(0, 2, 3, 1)).contiguous()

    def _run_block(self, block, x, r_embed, clip, ws, skip=None):
        if isinstance(block, ResBlock):
            return block(x, skip, ws)
        if isinstance(block, AttnBlock):
            return block(x, clip, ws)
        if isinstance(block, TimestepBlock):
            return block(x, r_embed, ws)
        return block(x, ws)

    def _workspace(self, *inputs):
        """A Workspace when nothing needs autograd (so blocks may work in place), else None."""
        if torch.is_grad_enabled() and (any(t.requires_grad for t in inputs if torch.is_tensor(t))
                                        or any(p.requires_grad for p in self.parameters())):
            return None
        return Workspace()

    def _down_encode(self, x, r_embed, clip, ws=None, cnet=None, counter=0):
        level_outputs = []
        for level, downscaler, repeat_mappers in zip(self.down_blocks, self.down_downscalers,
                                                     self.down_repeat_mappers):
            x = nhwc_apply(downscaler, x)
            for rep in range(len(repeat_mappers) + 1):
                for block in level:
                    if isinstance(block, ResBlock):
                        x = self._inject(x, cnet, counter)
                        counter += 1
                    x = self._run_block(block, x, r_embed, clip, ws)
                if rep < len(repeat_mappers):
                    x = pointwise_conv(x, repeat_mappers[rep])
            level_outputs.insert(0, x)
        return level_outputs, counter

    def _up_decode(self, level_outputs, r_embed, clip, ws=None, cnet=None, counter=0):
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
                    x = self._run_block(block, x, r_embed, clip, ws, skip)
                if rep < len(repeat_mappers):
                    x = pointwise_conv(x, repeat_mappers[rep])
            x = nhwc_apply(upscaler, x)
        return x
