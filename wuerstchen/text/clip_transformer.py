"""Pieces shared by the CLIP text and image towers: the open_clip block stack and key mapping.

Both towers run open_clip's ``Transformer`` (pre-LN blocks with a fused ``nn.MultiheadAttention``),
so their state dicts use open_clip names.  Released Stable Cascade files use the Hugging Face
names (``q_proj``/``k_proj``/``v_proj`` split, ``layer_norm1``, ``fc1`` ...); the helpers here
translate one to the other and say which rows of a fused tensor a split key fills.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from open_clip.transformer import QuickGELU, Transformer

ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}

# Hugging Face names inside one encoder layer -> open_clip names inside one resblock.
_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV_ORDER = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def build_transformer(width: int, layers: int, heads: int, mlp_width: int, activation: str,
                      layer_norm_eps: float = 1e-5) -> Transformer:
    """open_clip ``Transformer`` with an exact MLP width (open_clip only takes a ratio)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    # int(width * ratio) must give mlp_width exactly; aiming at the middle of the unit avoids
    # float rounding landing just below it.
    ratio = (mlp_width + 0.5) / width
    stack = Transformer(width, layers, heads, ratio, act_layer=ACTIVATIONS[activation],
                        norm_layer=functools.partial(nn.LayerNorm, eps=layer_norm_eps))
    if layers and stack.resblocks[0].mlp.c_fc.out_features != mlp_width:
        raise RuntimeError("open_clip built a different MLP width than requested")
    return stack


def run_blocks(stack: Transformer, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
               collect: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run every block on batch-first ``x``; optionally keep each block's output."""
    batch_first = getattr(stack, "batch_first", False)
    hidden = []
    x = x if batch_first else x.transpose(0, 1)
    for block in stack.resblocks:
        x = block(x, attn_mask=attn_mask)
        if collect:
            hidden.append(x if batch_first else x.transpose(0, 1))
    return (x if batch_first else x.transpose(0, 1)), hidden


def hf_layer_key_to_param(layer_key: str, width: int) -> tuple[str, slice | None]:
    """``'3.self_attn.q_proj.weight'`` -> ``('transformer.resblocks.3.attn.in_proj_weight', rows)``.

    ``layer_key`` is the part after ``encoder.layers.``.  The slice selects the rows of the fused
    ``in_proj`` tensor that the split q/k/v key corresponds to; None means the whole tensor.
    """
    index, _, rest = layer_key.partition(".")
    if not index.isdigit():
        raise KeyError(f"not an encoder layer key: {layer_key!r}")
    module, _, kind = rest.rpartition(".")
    if kind not in ("weight", "bias"):
        raise KeyError(f"expected a .weight or .bias key, got {layer_key!r}")
    head = f"transformer.resblocks.{index}."
    attn, _, proj = module.partition(".")
    if attn == "self_attn" and proj in _QKV_ORDER:
        k = _QKV_ORDER[proj]
        return f"{head}attn.in_proj_{kind}", slice(k * width, (k + 1) * width)
    if module in _LAYER_RENAMES:
        return f"{head}{_LAYER_RENAMES[module]}.{kind}", None
    raise KeyError(f"unknown encoder layer key: {layer_key!r}")


def hf_layer_key_names(index: int) -> list[str]:
    """Every Hugging Face key of encoder layer ``index`` (what :func:`hf_layer_key_to_param` maps)."""
    modules = [f"self_attn.{proj}" for proj in _QKV_ORDER] + list(_LAYER_RENAMES)
    return [f"{index}.{module}.{kind}" for module in modules for kind in ("weight", "bias")]


def find_prefix(keys: Iterable[str], anchors: Sequence[str], what: str) -> tuple[str, str]:
    """Locate the tower inside a state dict by its anchor key.

    Returns ``(prefix, anchor)``: the text in front of the first anchor (in ``anchors`` order)
    that some key ends with.  Several different prefixes are ambiguous and rejected.
    """
    found: dict[str, str] = {}
    for key in keys:
        for anchor in anchors:
            if key == anchor or key.endswith("." + anchor):
                found.setdefault(key[: len(key) - len(anchor)], anchor)
                break
    if not found:
        raise KeyError(f"no {what} weights found: no key ends with any of {list(anchors)}")
    if len(found) > 1:
        raise KeyError(f"several {what} towers in this state dict (prefixes {sorted(found)}); "
                       "pass prefix= to choose one")
    return next(iter(found.items()))


def place(tensor: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    """Cast/move one loaded tensor directly to its final dtype and device."""
    if tensor.is_floating_point() and dtype is not None:
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device) if device is not None else tensor


def assemble(pieces: Mapping[str, list[tuple[slice | None, torch.Tensor]]], width: int,
             what: str) -> dict[str, torch.Tensor]:
    """Build our state dict from mapped pieces, concatenating q/k/v slices in row order."""
    out = {}
    for name, parts in pieces.items():
        if len(parts) == 1 and parts[0][0] is None:
            out[name] = parts[0][1]
            continue
        if any(rows is None for rows, _ in parts) or len(parts) != 3:
            raise KeyError(f"{what}: {name} needs exactly the q, k and v pieces, got "
                           f"{len(parts)} piece(s)")
        parts = sorted(parts, key=lambda p: p[0].start)
        if [p[0].start for p in parts] != [0, width, 2 * width]:
            raise KeyError(f"{what}: {name} has duplicate or missing q/k/v pieces")
        out[name] = torch.cat([t for _, t in parts], 0)
    return out


def unknown_keys_error(what: str, keys: list[str]) -> KeyError:
    shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
    return KeyError(f"unexpected keys in the {what} state dict: {shown}")
