"""Building blocks shared by the Stage C and Stage B diffusion U-Nets.

Every block keeps the official module layout, so ``state_dict()`` keys and shapes match the
released checkpoints (including the packed ``attention.attn.in_proj_weight`` of
``nn.MultiheadAttention``), and its ``forward`` takes ``[B, C, H, W]`` like the official block.
The arithmetic is rewritten for speed, within float32 rounding of the official results:

* The networks keep the residual stream channels-last (``[B, H, W, C]``, contiguous) and call
  each block's ``forward_nhwc``, so the channel-wise MLPs, norms and attention projections
  need no permute copies.
* Under no_grad the networks pass a :class:`Workspace`: large temporaries go into reused
  buffers and residual updates are accumulated in place (on CPU, allocating and first touching
  a large tensor costs about as much as the arithmetic on it).
* Attention calls ``scaled_dot_product_attention`` on the packed projection weights.
* The GRN scale is folded into the following weight when there are more tokens than channels.

Mixed precision ("fp16 guard"): when a block receives a float32 tensor while its weights are
float16, the heavy matrix products still run in float16, on an input rescaled by a power of two
so it cannot overflow, and everything else (residual stream, norms, GRN statistics, attention
softmax) stays in float32. See :func:`linear` and :class:`CascadeUNet`.
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, out=None) -> torch.Tensor:
    """``F.linear``, optionally into the preallocated ``out``, that also takes a float32 ``x``
    for float16 weights (fp16 guard).

    In the guarded case the product runs in float16 on a copy of ``x`` rescaled by a power of two
    and the result comes back in float32 (``out`` is ignored), so a large residual stream never
    overflows float16.
    """
    if x.dtype != weight.dtype:
        x_low, scale = _scaled_down(x, weight.dtype)
        result = F.linear(x_low, weight).to(x.dtype).mul_(scale)
        return result if bias is None else result.add_(bias)
    if out is None:
        return F.linear(x, weight, bias)
    rows, out_rows = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
    if bias is None:
        torch.mm(rows, weight.t(), out=out_rows)
    else:
        torch.addmm(bias, rows, weight.t(), out=out_rows)
    return out


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


class Workspace:
    """Scratch buffers that the blocks of one no-grad forward pass reuse.

    On CPU, allocating and first touching a large tensor costs about as much as a pass of
    arithmetic over it, so short-lived temporaries (the 4c-wide MLP activations, attention
    projections) are written into these buffers instead. Passing a workspace to a block's
    ``forward_nhwc`` also lets the block overwrite its input ``x`` with the result: the networks
    do so only for residual-stream tensors nobody else holds, and never under autograd.
    """

    def __init__(self):
        self._buffers = {}
        self._views = {}

    def get(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` with ``like``'s dtype/device, reusing storage by name."""
        key = (name, tuple(shape), like.dtype, like.device)
        view = self._views.get(key)
        if view is not None:
            return view
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        view = self._views[key] = buf[:numel].view(shape)
        return view


def _get(ws, name, shape, like):
    return None if ws is None else ws.get(name, shape, like)


def _residual(x, update, ws):
    """x + update; written into x when a workspace says x may be overwritten."""
    if ws is not None and x.dtype == update.dtype:
        return x.add_(update)
    return update + x if update.requires_grad else update.add_(x)


def _add_projection(x, h, layer, ws):
    """x + Linear(h) for channels-last x; accumulated straight into x (no temporary) with ``ws``."""
    weight, bias = layer.weight, layer.bias
    if ws is None or x.dtype != weight.dtype or h.dtype != weight.dtype or not x.is_contiguous():
        return _residual(x, linear(h, weight, bias), ws)
    rows = x.view(-1, x.shape[-1])
    rows.addmm_(h.reshape(-1, h.shape[-1]), weight.t())
    return x if bias is None else x.add_(bias)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` tensor (official ``LayerNorm2d``)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


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

    def forward(self, x):
        return self.normalize_(x if x.requires_grad else x.clone())

    def _sum_of_squares(self, rows, ws=None):
        """Per-channel sum of squares over dim 1 of [B, N, C], in float32."""
        batch, length, dim = rows.shape
        if rows.requires_grad or rows.device.type != "cpu":  # accelerators: allocation is cheap
            return rows.float().square().sum(dim=1, keepdim=True)
        step = max(1, min(length, self.chunk_elements // max(1, batch * dim)))
        total = rows.new_zeros((batch, 1, dim), dtype=torch.float32)
        scratch = None
        if rows.dtype == torch.float32:
            scratch = _get(ws, "grn_chunk", (batch, step, dim), rows)
            if scratch is None:
                scratch = rows.new_empty((batch, step, dim))
        for start in range(0, length, step):
            part = rows[:, start:start + step]
            if scratch is not None:
                squares = torch.mul(part, part, out=scratch[:, :part.shape[1]])
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
    hidden = linear(h, fc1.weight, fc1.bias, out=_get(ws, "mlp_hidden", (*h.shape[:-1], fc1.out_features), h))
    hidden = gelu_(hidden)
    use_dropout = training and dropout.p > 0
    batch, width = x.shape[0], hidden.shape[-1]
    tokens = hidden.numel() // (batch * width)
    fold = (ws is not None and grn.fold_scale and not use_dropout and hidden.dtype == fc2.weight.dtype == x.dtype
            and tokens > fc2.out_features and x.is_contiguous())
    if not fold:
        hidden = grn.normalize_(hidden, ws)
        if use_dropout:
            hidden = dropout(hidden)
        return _add_projection(x, hidden, fc2, ws)
    # W2 (h * s + beta) + b2 == (W2 * s) h + (W2 beta + b2), with s per sample and channel
    scale = grn.response_scale(hidden, ws).view(batch, 1, width)
    scaled_weight = torch.mul(fc2.weight, scale, out=ws.get("mlp_folded_weight", (batch, *fc2.weight.shape), x))
    shift = torch.addmv(fc2.bias, fc2.weight, grn.beta.view(width).to(x.dtype))
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

    def forward_nhwc(self, x, x_skip=None, ws=None):
        """x, x_skip: [B, H, W, C]. With a workspace ``ws`` the result overwrites x."""
        h = layer_norm_channels(to_nhwc(conv2d(to_nchw(x), self.depthwise)), self.norm.eps)
        if x_skip is not None:
            shape = (*h.shape[:-1], h.shape[-1] + x_skip.shape[-1])
            h = torch.cat([h, x_skip], dim=-1, out=_get(ws, "res_cat", shape, h))
        return _channel_mlp(x, h, self.channelwise, ws, self.training)

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
            qkv = linear(query, weight, bias, out=_get(ws, "attn_qkv", (batch, length, 3 * c), query))
            q, kv_query = qkv[..., :c], qkv[..., c:]
        else:
            q = linear(query, weight[:c], bias[:c], out=_get(ws, "attn_q", (batch, length, c), query))
            kv_query = None
        kv_cond = linear(cond, weight[c:], bias[c:], out=_get(ws, "attn_kv", (batch, cond.shape[1], 2 * c), cond))
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
        kv = _get(ws, "attn_kv_heads", shape, q)
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

    def forward(self, query, key_value):
        """Attend ``query`` [B, L, c] to ``key_value`` [B, S, c] (the same tensor is keys and values)."""
        c = self.embed_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        q = linear(query, weight[:c], bias[:c])
        kv = linear(key_value, weight[c:], bias[c:])
        return linear(self._sdpa(q, [kv], None), self.out_proj.weight, self.out_proj.bias)


class Attention2D(nn.Module):
    """Attention of image tokens to conditioning tokens (optionally also to themselves)."""

    def __init__(self, c, nhead, dropout=0.0):
        super().__init__()
        self.attn = PackedMultiheadAttention(c, nhead, dropout=dropout)

    def forward(self, x, kv, self_attn=False):
        batch, c, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, c)
        attn = self.attn
        out = linear(attn.attend(tokens, kv, self_attn), attn.out_proj.weight, attn.out_proj.bias)
        return out.view(batch, height, width, c).permute(0, 3, 1, 2)


class AttnBlock(nn.Module):
    """x + Attention(LayerNorm2d(x), Linear(SiLU(cond)))."""

    def __init__(self, c, c_cond, nhead, self_attn=True, dropout=0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward_nhwc(self, x, kv, ws=None):
        """x: [B, H, W, C]; kv: [B, S, c_cond]. With a workspace ``ws`` the result overwrites x."""
        batch, height, width, c = x.shape
        mapper = self.kv_mapper[1]
        kv = linear(F.silu(kv), mapper.weight, mapper.bias)
        tokens = layer_norm_channels(x, self.norm.eps).view(batch, height * width, c)
        attn = self.attention.attn
        out = attn.attend(tokens, kv, self.self_attn, ws)
        return _add_projection(x, out.view(batch, height, width, c), attn.out_proj, ws)

    def forward(self, x, kv):
        return to_nchw(self.forward_nhwc(x.permute(0, 2, 3, 1), kv))


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

    def forward_nhwc(self, x, ws=None):
        """x: [B, H, W, C]. With a workspace ``ws`` the result overwrites x."""
        return _channel_mlp(x, layer_norm_channels(x, self.norm.eps), self.channelwise, ws, self.training)

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

    def forward_nhwc(self, x, t, ws=None):
        """x: [B, H, W, C]; t: time embeddings. With a workspace ``ws`` the result overwrites x."""
        scale, shift = self.modulation(t)
        batch, c = shift.shape
        scale, shift = scale.view(batch, 1, 1, c), shift.view(batch, 1, 1, c)
        if ws is not None and scale.dtype == x.dtype:
            return torch.addcmul(shift, x, scale, out=x)
        return torch.addcmul(shift, x, scale)

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
            return block.forward_nhwc(x, skip, ws)
        if isinstance(block, AttnBlock):
            return block.forward_nhwc(x, clip, ws)
        if isinstance(block, TimestepBlock):
            return block.forward_nhwc(x, r_embed, ws)
        return block.forward_nhwc(x, ws)

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
