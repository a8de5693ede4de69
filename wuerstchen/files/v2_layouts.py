"""Recognise Würstchen v2 weights from their keys and shapes, in both key spellings, and read their configs.

Pure functions over ``{key: shape}`` (no file access, no model building): each ``detect_v2_*``
returns the constructor config of the network when the shapes are that network, else None. They
accept the diffusers spelling of the hub files (``attention.to_q/to_k/to_v``, ``to_out.0``) and the
original dome272 spelling (``attention.attn.in_proj_*``, ``attn.out_proj``); :func:`key_spelling`
tells them apart. The original ``.pt`` files wrap the weights in a dict (:data:`V2_CONTAINERS`).

Markers (what no Stable Cascade file has):

* prior: a flat ``blocks.N`` list with ``projection``, ``cond_mapper`` and ``out`` heads;
* decoder: ``clip_mapper`` and the U-Net heads without Stable Cascade stage B's ``effnet_mapper`` /
  ``pixels_mapper`` (its effnet maps are ``effnet_mappers.N``, its level changes live inside
  ``down_blocks.N.0`` / the last entry of ``up_blocks.N``);
* EfficientNet: Stable Cascade's layout plus the affine ``mapper.1.weight`` / ``mapper.1.bias``;
* text towers: a CLIP text tower without ``text_projection`` (bigG 1280 wide for the prior,
  ViT-H-14 1024 wide for the decoder).

The VQGAN has exactly Stable Cascade's stage A layout and shapes (the hub file spells the codebook
``vquantizer.embedding.weight``, the original file like stage A); only the pipeline's scale
(0.3764 instead of 0.43) differs, so no function here claims it.

Hyper-parameters that leave no trace in the shapes take the released values: heads = width / 64,
dropout 0.1, patch size 2 for the decoder.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

Shapes = Mapping[str, Sequence[int]]

V2_CONTAINERS = ("ema_state_dict", "state_dict", "effnet_state_dict")
"""Keys of the original ``.pt`` dicts that hold weights: stage C ``ema_state_dict`` (training files
also carry a non-EMA ``state_dict``; prefer the EMA one), stage B ``state_dict`` plus the v2
EfficientNet under ``effnet_state_dict``, VQGAN ``state_dict``."""

PRIOR_CONTAINER_ORDER = ("ema_state_dict", "state_dict")
DECODER_CONTAINER = "state_dict"
EFFNET_CONTAINER = "effnet_state_dict"

_HEAD_WIDTH = 64
_RELEASED_DROPOUT = 0.1
_DECODER_PATCH = 2


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes for m in [rx.match(k)] if m})


def _has(shapes: Shapes, *keys: str) -> bool:
    return all(k in shapes for k in keys)


def _heads(width: int, heads: Optional[int]) -> int:
    return heads if heads else max(1, width // _HEAD_WIDTH)


def _is_attention(shapes: Shapes, p: str) -> bool:
    return f"{p}attention.attn.in_proj_weight" in shapes or f"{p}attention.to_q.weight" in shapes


def key_spelling(shapes: Shapes) -> Optional[str]:
    """"original" (packed ``attn.in_proj``), "diffusers" (``to_q``/``to_k``/``to_v``), or None without attention."""
    for key in shapes:
        if key.endswith(".attention.attn.in_proj_weight"):
            return "original"
        if key.endswith(".attention.to_q.weight"):
            return "diffusers"
    return None


# ----------------------------------------------------------------------------------------------
# Prior


def detect_v2_prior(shapes: Shapes, heads: Optional[int] = None) -> Optional[dict]:
    """``WuerstchenPrior`` kwargs (c_in, c, c_cond, c_r, depth, nhead, dropout), or None."""
    if not _has(shapes, "projection.weight", "cond_mapper.0.weight", "cond_mapper.2.weight", "out.1.weight",
                "blocks.0.depthwise.weight"):
        return None
    c, c_in = shapes["projection.weight"][:2]
    blocks = _indices(shapes, r"blocks\.(\d+)\.")
    if len(blocks) % 3 or blocks != list(range(len(blocks))):
        return None
    for j in range(0, len(blocks), 3):
        if not (f"blocks.{j}.depthwise.weight" in shapes and f"blocks.{j + 1}.mapper.weight" in shapes
                and _is_attention(shapes, f"blocks.{j + 2}.")):
            return None
    return dict(c_in=c_in, c=c, c_cond=shapes["cond_mapper.0.weight"][1], c_r=shapes["blocks.1.mapper.weight"][1],
                depth=len(blocks) // 3, nhead=_heads(c, heads), dropout=_RELEASED_DROPOUT)


# ----------------------------------------------------------------------------------------------
# Decoder


def _level_letters(shapes: Shapes, prefix: str) -> tuple[str, list[int]]:
    """Block letters of one level's module list and the indices of the non-block entries (level changes)."""
    letters, others = [], []
    for j in _indices(shapes, re.escape(prefix) + r"(\d+)\."):
        p = f"{prefix}{j}."
        if f"{p}depthwise.weight" in shapes:
            letters.append("C")
        elif _is_attention(shapes, p):
            letters.append("A")
        elif f"{p}mapper.weight" in shapes:
            letters.append("T")
        else:
            others.append(j)
    return "".join(letters), others


def _period(seq: str) -> tuple[str, int]:
    for size in range(1, len(seq) + 1):
        if len(seq) % size == 0 and seq[:size] * (len(seq) // size) == seq:
            return seq[:size], len(seq) // size
    return seq, 1


def detect_v2_decoder(shapes: Shapes, heads: Optional[Sequence[int]] = None) -> Optional[dict]:
    """``WuerstchenDiffNeXt`` kwargs, or None. ``heads`` overrides the per-level head counts."""
    if not _has(shapes, "clip_mapper.weight", "embedding.1.weight", "clf.1.weight", "down_blocks.0.0.depthwise.weight"):
        return None
    if any(k.startswith(("effnet_mapper.", "pixels_mapper.", "down_downscalers.")) for k in shapes):
        return None  # Stable Cascade stage B
    levels = _indices(shapes, r"down_blocks\.(\d+)\.")
    if levels != list(range(len(levels))) or _indices(shapes, r"up_blocks\.(\d+)\.") != levels:
        return None
    level_config, blocks, c_hidden = [], [], []
    for i in levels:
        letters, others = _level_letters(shapes, f"down_blocks.{i}.")
        if others != ([0] if i > 0 else []) or not letters:
            return None
        unit, count = _period(letters)
        level_config.append(unit)
        blocks.append(count)
        first_res = next(j for j in _indices(shapes, rf"down_blocks\.{i}\.(\d+)\.")
                         if f"down_blocks.{i}.{j}.depthwise.weight" in shapes)
        c_hidden.append(shapes[f"down_blocks.{i}.{first_res}.depthwise.weight"][0])
    mappers = _indices(shapes, r"effnet_mappers\.(\d+)\.")
    inject = [i in mappers for i in levels]
    c_cond, clip_embd = shapes["clip_mapper.weight"]
    effnet_embd = shapes[f"effnet_mappers.{mappers[0]}.weight"][1] if mappers else 16
    t_key = next(k for k in shapes if re.match(r"down_blocks\.\d+\.\d+\.mapper\.weight$", k))
    c_in_total = shapes["embedding.1.weight"][1]
    nhead = list(heads) if heads is not None else [
        _heads(c, None) if "A" in cfg else -1 for c, cfg in zip(c_hidden, level_config)]
    return dict(
        c_in=c_in_total // _DECODER_PATCH ** 2, c_out=shapes["clf.1.weight"][0] // (2 * _DECODER_PATCH ** 2),
        c_r=shapes[t_key][1], patch_size=_DECODER_PATCH, c_cond=c_cond, c_hidden=c_hidden, nhead=nhead,
        blocks=blocks, level_config=level_config, inject_effnet=inject, effnet_embd=effnet_embd,
        clip_embd=clip_embd, kernel_size=shapes["down_blocks.0.0.depthwise.weight"][-1], dropout=_RELEASED_DROPOUT,
    )


# ----------------------------------------------------------------------------------------------
# EfficientNet and text towers


def detect_v2_effnet(shapes: Shapes) -> Optional[dict]:
    """``EfficientNetEncoder`` kwargs for the v2 semantic compressor (affine mapper BatchNorm), or None.

    The backbone is Stable Cascade's EfficientNetV2-S; a custom backbone's stage table is read by
    the same code as Stable Cascade's encoder.
    """
    if not _has(shapes, "backbone.0.0.weight", "mapper.0.weight", "mapper.1.weight", "mapper.1.bias",
                "mapper.1.running_mean"):
        return None
    return dict(c_latent=shapes["mapper.0.weight"][0], family="v2")


_TEXT_ANCHORS = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")


def detect_v2_text(shapes: Shapes, heads: Optional[int] = None) -> Optional[dict]:
    """``CLIPTextEncoder`` kwargs for a projection-free CLIP text tower (HF spelling, with or without
    the ``text_model.`` wrapper), with ``role`` "prior" (1280 wide, bigG) or "decoder" (1024, ViT-H-14)."""
    anchor = next((a for a in _TEXT_ANCHORS if a in shapes), None)
    if anchor is None or "text_projection.weight" in shapes:
        return None
    head = anchor[: -len("embeddings.token_embedding.weight")]
    vocab, width = shapes[anchor]
    layers = _indices(shapes, re.escape(head) + r"encoder\.layers\.(\d+)\.")
    mlp = shapes.get(f"{head}encoder.layers.0.mlp.fc1.weight", (4 * width,))[0]
    role = {1280: "prior", 1024: "decoder"}.get(width, "custom")
    return dict(width=width, layers=len(layers), heads=_heads(width, heads), mlp_width=mlp, vocab_size=vocab,
                context_length=shapes[f"{head}embeddings.position_embedding.weight"][0], projection_dim=None,
                activation="gelu", layer_norm_eps=1e-5, family="v2", role=role)


def detect_v2(shapes: Shapes) -> Optional[tuple[str, dict]]:
    """``(kind, config)`` for any v2 network above ("prior", "decoder", "effnet", "text"), or None."""
    for kind, detect in (("prior", detect_v2_prior), ("decoder", detect_v2_decoder),
                         ("effnet", detect_v2_effnet), ("text", detect_v2_text)):
        config = detect(shapes)
        if config is not None:
            return kind, config
    return None


# ----------------------------------------------------------------------------------------------
# Layout functions for the kinds table: ``fn(shapes, hint) -> (variant, config)``


def _with_hint(config: dict, official: dict, hint: Optional[Mapping], free: Sequence[str]) -> tuple[str, dict]:
    """The official config when the shapes give it; else the shapes' config, with the values that
    shapes cannot show (``free``) taken from a metadata hint that agrees with everything else."""
    if config == official:
        return "official", dict(official)
    if hint and all(hint.get(k) == v for k, v in config.items() if k not in free):
        config = {**config, **{k: hint[k] for k in free if k in hint}}
    return "custom", config


def prior_layout(shapes: Shapes, hint: Optional[Mapping] = None) -> tuple[str, dict]:
    from ..models.configs import V2_PRIOR
    from .layouts import LayoutError

    config = detect_v2_prior(shapes)
    if config is None:
        raise LayoutError("a Würstchen v2 prior whose block list (ResBlock, TimestepBlock, AttnBlock) cannot be read")
    return _with_hint(config, V2_PRIOR, hint, ("nhead", "dropout"))


def decoder_layout(shapes: Shapes, hint: Optional[Mapping] = None) -> tuple[str, dict]:
    from ..models.configs import V2_DECODER
    from .layouts import LayoutError

    config = detect_v2_decoder(shapes)
    if config is None:
        raise LayoutError("a Würstchen v2 decoder whose levels cannot be read")
    return _with_hint(config, V2_DECODER, hint, ("nhead", "dropout"))


def effnet_layout(shapes: Shapes, hint: Optional[Mapping] = None) -> tuple[str, dict]:
    """The v2 semantic compressor: Stable Cascade's backbone reading, plus ``family="v2"``."""
    from ..models.configs import V2_EFFNET
    from .layouts import effnet

    _variant, config = effnet(shapes, hint)
    config = {**config, "family": "v2"}
    return ("official" if config == V2_EFFNET else "custom"), config


TEXT_WIDTHS = {"prior": 1280, "decoder": 1024}
"""Widths of the released v2 text towers: bigG for the prior, ViT-H-14 for the decoder."""
_TEXT_VARIANTS = {"prior": "bigG", "decoder": "ViT-H-14"}


def text_layout(shapes: Shapes, hint: Optional[Mapping] = None) -> tuple[str, dict]:
    """``CLIPTextEncoder`` kwargs of a projection-free v2 text tower (heads from a hint, else width / 64)."""
    from .layouts import LayoutError

    config = detect_v2_text(shapes, (hint or {}).get("num_attention_heads"))
    if config is None:
        raise LayoutError("a CLIP text tower in the Hugging Face layout was expected")
    role = config.pop("role")
    return _TEXT_VARIANTS.get(role, "custom"), config


def text_role_fits(role: str, shapes: Shapes, named_roles: Sequence[str] = ()) -> bool:
    """Whether a projection-free tower can be the ``role`` ("prior" or "decoder") tower: by its
    released width, else by the file's metadata (``named_roles``); a custom tower that no metadata
    names fits either role."""
    config = detect_v2_text(shapes)
    if config is None:
        return False
    width = config["width"]
    if width in TEXT_WIDTHS.values():
        return width == TEXT_WIDTHS[role]
    return not named_roles or role in named_roles
