"""Low-level kernels of the Stage B/C U-Nets: fp16-guarded matrix products, channels-last
helpers and the workspace of reused scratch buffers.

Apart from the network blocks so that what a layer computes (``blocks.py``) reads separately
from how it is computed fast and safely here.

Mixed precision ("fp16 guard"): when a kernel receives a float32 tensor while its weights are
float16, the heavy matrix product still runs in float16, on an input rescaled by a power of two
so it cannot overflow, and the result comes back in float32.

fp8 weight storage: the weights of matrix products (:func:`fp8_weight_names`) may be stored in
float8 to halve their memory; every kernel here upcasts such a weight to the compute dtype (that
of its bias, which stays in it) for the one call (:func:`compute_weight`), so no product ever runs
in fp8.
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

#: Storage-only weight dtypes: upcast before any arithmetic.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def compute_weight(weight: torch.Tensor, bias=None, like=None) -> torch.Tensor:
    """``weight`` in the dtype it computes in: an fp8-stored weight is upcast, for this call only,
    to its bias's dtype (the compute dtype; biases are never stored in fp8), else to ``like``'s."""
    if weight.dtype not in FP8_DTYPES:
        return weight
    return weight.to(bias.dtype if bias is not None else like.dtype)


#: Parameters that only feed matrix products through this module's kernels (declared by the
#: module classes that own them, e.g. a packed attention projection).
FP8_WEIGHTS_ATTRIBUTE = "fp8_weights"


def fp8_weight_names(model: nn.Module):
    """Names of the parameters of ``model`` that may be stored in fp8: the weights of its linear
    layers, its dense (not depthwise) and transposed convolutions, and those its modules declare
    in ``fp8_weights``. Norms, biases, embeddings, GRN gains and buffers are not among them."""
    names = []
    for prefix, module in model.named_modules():
        own = list(getattr(module, FP8_WEIGHTS_ATTRIBUTE, ()))
        if isinstance(module, (nn.Linear, nn.ConvTranspose2d)) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            own.append("weight")
        names += [f"{prefix}.{n}" if prefix else n for n in own if getattr(module, n, None) is not None]
    return names

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
    weight = compute_weight(weight, bias, x)
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
    bias = conv.bias
    weight = compute_weight(conv.weight, bias, x)
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
    bias = conv.bias
    weight = compute_weight(conv.weight, bias, x)
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


def scratch(ws, name, shape, like):
    """A reused buffer from workspace ``ws``, or None without one (the caller then allocates)."""
    return None if ws is None else ws.get(name, shape, like)


def residual(x, update, ws):
    """x + update; written into x when a workspace says x may be overwritten."""
    if ws is not None and x.dtype == update.dtype:
        return x.add_(update)
    return update + x if update.requires_grad else update.add_(x)


def add_projection(x, h, layer, ws):
    """x + Linear(h) for channels-last x; accumulated straight into x (no temporary) with ``ws``."""
    bias = layer.bias
    weight = compute_weight(layer.weight, bias, h)
    if ws is None or x.dtype != weight.dtype or h.dtype != weight.dtype or not x.is_contiguous():
        return residual(x, linear(h, weight, bias), ws)
    rows = x.view(-1, x.shape[-1])
    rows.addmm_(h.reshape(-1, h.shape[-1]), weight.t())
    return x if bias is None else x.add_(bias)
