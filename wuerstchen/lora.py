"""Stage C LoRAs: read every common file format, patch the weights, and undo the patch exactly.

A LoRA file is parsed once into a :class:`LoraFile` whose deltas name official StageC
parameters (``down_blocks.0.2.attention.attn.in_proj_weight`` plus a row range for q, k or v) or
Hugging Face CLIP-G keys. Patching computes ``W + strength * scale * (up @ down)`` in float32,
casts back to the weight's dtype and swaps the new tensor into the parameter; the original tensor
object is kept aside untouched, so unpatching is bit-exact and a cached base model is never
changed for good. Key spellings of each trainer live in :mod:`wuerstchen.lora_formats`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .lora_formats import (
    BUNDLE_EMBEDDING_KEY,
    CLIP_VOCAB_SIZE,
    OFFICIAL_EMBEDDINGS,
    OFFICIAL_INDICES,
    OFFICIAL_MODULE_FILTERS,
    OFFICIAL_WEIGHT_KEY,
    UNSUPPORTED_KINDS,
    ModuleTarget,
    describe_foreign_lora,
    format_module_name,
    official_lora_modules,
    resolve_module,
    split_key,
)

__all__ = [
    "FORMATS",
    "LoraError",
    "WeightDelta",
    "TokenEmbedding",
    "LoraFile",
    "LoraMatch",
    "LoraPatch",
    "load_lora",
    "parse_lora",
    "official_lora_modules",
    "stage_c_deltas",
    "patched_tensors",
    "check_lora",
    "apply_loras",
    "write_tiny_lora",
]

FORMATS = ("official", "kohya", "onetrainer", "diffusers")
TEXT_TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"

Rows = Optional[Tuple[int, int]]


class LoraError(ValueError):
    """A LoRA that cannot be used with the loaded model; the message says why and what it is."""


@dataclass(frozen=True)
class WeightDelta:
    """One low-rank (``up @ down``) or dense (``diff``) change to one parameter.

    ``target`` is an official StageC parameter name (part "stage_c") or a Hugging Face CLIP key
    (part "text"). ``rows`` limits the change to rows [start, stop) of the target, e.g. the q, k
    or v third of a fused ``in_proj_weight``. With ``broadcast`` (the official trainer's LoRA on
    a convolution) the [out, in] product is added to every kernel position.
    """

    target: str
    source: str
    scale: float
    up: Optional[torch.Tensor] = None
    down: Optional[torch.Tensor] = None
    diff: Optional[torch.Tensor] = None
    rows: Rows = None
    broadcast: bool = False

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def out_features(self) -> int:
        return int((self.diff if self.diff is not None else self.up).shape[0])

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether this delta can be added to a parameter of ``shape``."""
        shape = tuple(shape)
        if not shape:
            return False
        if self.rows is not None:
            start, stop = self.rows
            if stop > shape[0]:
                return False
            shape = (stop - start,) + shape[1:]
        if self.diff is not None:
            return tuple(self.diff.shape) == shape
        if self.up.shape[0] != shape[0] or any(s != 1 for s in self.up.shape[2:]):
            return False
        if self.broadcast:
            return self.down.dim() == 2 and len(shape) >= 2 and self.down.shape[1] == shape[1]
        return self.down[0].numel() == math.prod(shape[1:]) and (self.down.dim() == 2 or self.down.dim() == len(shape))

    def tensor(self, shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
        """``up @ down`` (or ``diff``) shaped like the target rows, without scale or strength."""
        shape = tuple(shape)
        if self.diff is not None:
            return self.diff.to(device=device, dtype=dtype).reshape(shape)
        up = self.up.to(device=device, dtype=dtype).reshape(self.up.shape[0], -1)
        down = self.down.to(device=device, dtype=dtype).reshape(self.down.shape[0], -1)
        product = up @ down
        if self.broadcast and len(shape) > 2:
            return product.reshape(shape[:2] + (1,) * (len(shape) - 2)).expand(shape)
        return product.reshape(shape)

    def describe(self) -> str:
        rows = "" if self.rows is None else f" rows {self.rows[0]}:{self.rows[1]}"
        if self.diff is not None:
            return f"{self.target}{rows} <- diff {list(self.diff.shape)}"
        return f"{self.target}{rows} <- up {list(self.up.shape)} @ down {list(self.down.shape)}"


@dataclass(frozen=True)
class TokenEmbedding:
    """A learned token for the text encoder: ``vectors`` [n, width] stand for ``word``.

    ``output_vectors`` is OneTrainer's optional output embedding (``clip_g_out``).
    """

    word: str
    vectors: torch.Tensor
    source: str
    output_vectors: Optional[torch.Tensor] = None

    @property
    def words(self) -> List[str]:
        """The token words to register: ``word`` itself, or ``word_0 … word_{n-1}`` for n > 1 vectors
        (the text encoder maps one word to one vector, so a multi-vector embedding is typed as
        its n words in a prompt)."""
        n = int(self.vectors.shape[0])
        return [self.word] if n == 1 else [f"{self.word}_{i}" for i in range(n)]


@dataclass(frozen=True)
class IndexedLora:
    """An official-trainer entry ``weights.N``: its module is known only once a model is given."""

    index: int
    up: torch.Tensor
    down: torch.Tensor


@dataclass
class LoraFile:
    """A parsed LoRA file."""

    name: str
    format: str
    stage_c: List[WeightDelta]
    text: List[WeightDelta]
    embeddings: List[TokenEmbedding]
    num_keys: int
    unrecognized: List[str] = field(default_factory=list)
    stage_c_indexed: List[IndexedLora] = field(default_factory=list)
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def counts(self) -> Dict[str, int]:
        return {
            "keys": self.num_keys,
            "stage_c_modules": len(self.stage_c) + len(self.stage_c_indexed),
            "text_modules": len(self.text),
            "embeddings": len(self.embeddings),
            "unrecognized_keys": len(self.unrecognized),
        }

    def summary(self) -> str:
        c = self.counts
        text = (f"{self.name}: {self.format} format, {c['stage_c_modules']} Stage C modules, "
                f"{c['text_modules']} text-encoder modules, {c['embeddings']} embeddings")
        if self.unrecognized:
            text += f"; {len(self.unrecognized)} keys not understood (e.g. {self.unrecognized[0]})"
        return text


# ----------------------------------------------------------------------------------------------
# Reading


def load_lora(path: Union[str, os.PathLike], *, token_words: Optional[Mapping[int, str]] = None) -> LoraFile:
    """Read a LoRA file (.safetensors, or a plain tensor .pt/.ckpt read with weights_only).

    ``token_words`` names the official trainer's new tokens by their index (its ``info.json``
    lists them as ``train_tokens``); unnamed ones become ``<lora_token_INDEX>``. The trainer
    saves only what it learned on top of a new token's starting vector (zeros, or the mean of
    the rows its config's regex picked), so such a token's vector is that learned part.
    """
    from .weights_io import WeightFileError, WeightSource

    path = Path(path)
    try:
        source = WeightSource(path)
        tensors = source.read()
    except WeightFileError as exc:
        raise LoraError(str(exc)) from None
    return parse_lora(tensors, name=path.name, metadata=dict(source.metadata), token_words=token_words)


def _peft_alpha_scales(metadata: Mapping[str, str]) -> Dict[str, float]:
    """lora_alpha / r per component ("" = global) from diffusers' ``lora_adapter_metadata`` header.

    diffusers stores each component's peft config with its prefix (``transformer.lora_alpha``,
    ``text_encoder.r``); per-module ``alpha_pattern`` / ``rank_pattern`` overrides are not read.
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    found: Dict[str, Dict[str, float]] = {}
    for key, value in meta.items():
        prefix, _, field_name = key.rpartition(".")
        if field_name in ("lora_alpha", "r") and isinstance(value, (int, float)) and not isinstance(value, bool):
            found.setdefault(prefix, {})[field_name] = float(value)
    return {prefix: v["lora_alpha"] / v["r"] for prefix, v in found.items()
            if "lora_alpha" in v and v.get("r")}


def _group_module(name: str, kinds: Dict[str, torch.Tensor], target: ModuleTarget,
                  default_scale: float) -> List[WeightDelta]:
    deltas = []
    has_up, has_down = "up" in kinds, "down" in kinds
    if has_up != has_down:
        missing = "up" if has_down else "down"
        raise LoraError(f"LoRA module {name} has no {missing} matrix; the file is incomplete")

    def rows_for(out: int) -> Rows:
        return None if target.qkv is None else (target.qkv * out, (target.qkv + 1) * out)

    if has_up:
        up, down = kinds["up"], kinds["down"]
        if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"LoRA module {name}: up {list(up.shape)} and down {list(down.shape)} "
                            "do not multiply (their rank dimensions differ)")
        rank = int(down.shape[0])
        if rank == 0:
            raise LoraError(f"LoRA module {name} has rank 0")
        scale = float(kinds["alpha"].item()) / rank if "alpha" in kinds else default_scale
        deltas.append(WeightDelta(target.weight, name, scale, up=up, down=down, rows=rows_for(up.shape[0])))
    if "diff" in kinds:
        diff = kinds["diff"]
        deltas.append(WeightDelta(target.weight, name + ".diff", 1.0, diff=diff, rows=rows_for(diff.shape[0])))
    if "diff_b" in kinds:
        diff = kinds["diff_b"]
        deltas.append(WeightDelta(target.bias, name + ".diff_b", 1.0, diff=diff, rows=rows_for(diff.shape[0])))
    return deltas


def parse_lora(tensors: Mapping[str, torch.Tensor], *, name: str = "LoRA",
               metadata: Optional[Mapping[str, str]] = None,
               token_words: Optional[Mapping[int, str]] = None) -> LoraFile:
    """Parse a LoRA state dict (see :func:`load_lora`); the format is detected from its keys."""
    metadata = dict(metadata or {})
    keys = list(tensors)
    if not keys:
        raise LoraError(f"{name}: the file holds no tensors")
    foreign = describe_foreign_lora(keys)
    if foreign:
        raise LoraError(f"{name}: this is {foreign}, not a Stable Cascade Stage C LoRA. "
                        f"None of its {len(keys)} keys can be used with Stage C.")

    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    group_keys: Dict[str, List[str]] = {}
    peft_modules = set()  # modules written with lora_A / lora_B (peft) names
    official: Dict[int, Dict[str, torch.Tensor]] = {}
    bundles: Dict[str, Dict[str, torch.Tensor]] = {}
    unsupported: Dict[str, str] = {}
    unrecognized: List[str] = []
    for key in keys:
        tensor = tensors[key]
        m = OFFICIAL_WEIGHT_KEY.match(key)
        if m:
            official.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
            continue
        if key in (OFFICIAL_EMBEDDINGS, OFFICIAL_INDICES):
            continue
        m = BUNDLE_EMBEDDING_KEY.match(key)
        if m:
            bundles.setdefault(m.group(1), {})[m.group(2)] = tensor
            continue
        split = split_key(key)
        if split is None:
            unrecognized.append(key)
            continue
        module, kind, scheme = split
        if kind in UNSUPPORTED_KINDS:
            unsupported.setdefault(kind, key)
            continue
        if scheme == "peft":
            peft_modules.add(module)
        groups.setdefault(module, {})[kind] = tensor
        group_keys.setdefault(module, []).append(key)

    if unsupported:
        kinds = ", ".join(sorted(unsupported))
        raise LoraError(f"{name}: uses {kinds} (e.g. key {next(iter(unsupported.values()))}); only plain "
                        "LoRA (lora_down/lora_up or lora_A/lora_B, optional alpha) is supported")

    peft_scales = _peft_alpha_scales(metadata)
    stage_c: List[WeightDelta] = []
    text: List[WeightDelta] = []
    namings: Dict[str, int] = {}
    for module, kinds in groups.items():
        resolved = resolve_module(module)
        if resolved is None:
            unrecognized.extend(group_keys[module])
            continue
        target, naming = resolved
        if set(kinds) <= {"alpha"}:
            unrecognized.extend(group_keys[module])
            continue
        if naming in ("kohya", "onetrainer"):
            fmt = naming
        else:  # OneTrainer's OMI files are dotted but keep lora_down / lora_up
            fmt = "onetrainer" if naming == "omi" and module not in peft_modules else "diffusers"
        namings[fmt] = namings.get(fmt, 0) + 1
        component = module.split(".", 1)[0] if "." in module else ""
        default_scale = peft_scales.get(component, peft_scales.get("", 1.0))
        deltas = _group_module(module, kinds, target, default_scale)
        (stage_c if target.part == "stage_c" else text).extend(deltas)

    indexed: List[IndexedLora] = []
    for index in sorted(official):
        pair = official[index]
        if set(pair) != {"down", "up"}:
            raise LoraError(f"{name}: official-format entry weights.{index} lacks lora_"
                            f"{'up' if 'down' in pair else 'down'}; the file is incomplete")
        up, down = pair["up"], pair["down"]
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"{name}: weights.{index}: lora_up {list(up.shape)} and lora_down "
                            f"{list(down.shape)} do not multiply")
        indexed.append(IndexedLora(index, up, down))
    if indexed and [e.index for e in indexed] != list(range(len(indexed))):
        raise LoraError(f"{name}: official-format indices are not 0..{len(indexed) - 1}; entries are missing")

    embeddings: List[TokenEmbedding] = []
    if OFFICIAL_EMBEDDINGS in tensors:
        vectors = tensors[OFFICIAL_EMBEDDINGS]
        indices = tensors.get(OFFICIAL_INDICES)
        if indices is None or indices.numel() != vectors.shape[0]:
            raise LoraError(f"{name}: embeddings.embeddings has {vectors.shape[0]} rows but embeddings.indices "
                            "is missing or of another length")
        words = dict(token_words or {})
        for row, index in enumerate(int(i) for i in indices.reshape(-1).tolist()):
            vector = vectors[row:row + 1]
            if index < CLIP_VOCAB_SIZE:
                # The trainer learned an additive change to an existing token's embedding row.
                text.append(WeightDelta(TEXT_TOKEN_EMBEDDING, f"embeddings[{index}]", 1.0, diff=vector,
                                        rows=(index, index + 1)))
            else:
                word = words.get(index, f"<lora_token_{index}>")
                embeddings.append(TokenEmbedding(word, vector, f"embeddings[{index}]"))
        namings["official"] = namings.get("official", 0) + 1
    for bundle_name, parts in bundles.items():
        if "clip_g" not in parts:
            unrecognized.extend(f"bundle_emb.{bundle_name}.{p}" for p in parts)
            continue
        vectors = parts["clip_g"]
        embeddings.append(TokenEmbedding(bundle_name, vectors.reshape(-1, vectors.shape[-1]),
                                         f"bundle_emb.{bundle_name}", parts.get("clip_g_out")))
        namings["onetrainer"] = namings.get("onetrainer", 0) + 1
    if indexed:
        namings["official"] = namings.get("official", 0) + len(indexed)

    if not (stage_c or text or indexed or embeddings):
        raise LoraError(
            f"{name}: not a Stage C LoRA — none of its {len(keys)} keys (e.g. {keys[0]}) name a Stage C or CLIP-G "
            "module. Expected kohya (lora_unet_…, lora_te_…), OneTrainer (lora_prior_unet_…, lora_prior_te_…), "
            "diffusers (…attention.to_q.lora_A.weight) or the official trainer's weights.N.lora_down/lora_up. "
            "It is probably a LoRA for another model."
        )
    fmt = max(namings, key=lambda k: namings[k])
    return LoraFile(name, fmt, stage_c, text, embeddings, len(keys), unrecognized, indexed, metadata)


# ----------------------------------------------------------------------------------------------
# Matching a LoRA to a model


_STAGE_C_TITLES = {2048: "Stage C (3.6B)", 1536: "Stage C lite (1B)"}
_STAGE_B_WIDTHS = {320, 576, 640, 1152, 1280}


def _attention_width_of_model(shapes: Mapping[str, Sequence[int]]) -> Optional[int]:
    for name, shape in shapes.items():
        if name.endswith(".attention.attn.out_proj.weight"):
            return int(shape[0])
    return None


def _describe_model(shapes: Mapping[str, Sequence[int]], part: str) -> str:
    if part == "text":
        return "the CLIP-G text encoder"
    width = _attention_width_of_model(shapes)
    n_attn = sum(1 for n in shapes if n.endswith(".attention.attn.in_proj_weight"))
    title = _STAGE_C_TITLES.get(width, "a Stage C") if width else "a Stage C"
    return f"{title} (attention width {width}, {n_attn} attention blocks)"


def _describe_lora_widths(deltas: Sequence[WeightDelta]) -> str:
    widths = set()
    for d in deltas:
        if d.target.endswith(".in_proj_weight") and d.rows is None:
            widths.add(d.out_features // 3)  # a LoRA on the whole fused q/k/v projection
        elif ".attention.attn." in d.target:
            widths.add(d.out_features)
        elif d.target.endswith(("channelwise.4.weight", "depthwise.weight")):
            widths.add(d.out_features)
    if not widths:
        return ""
    width = max(widths)
    if width in _STAGE_C_TITLES:
        return f"It looks like a LoRA for {_STAGE_C_TITLES[width]} (width {width}). "
    if width in _STAGE_B_WIDTHS:
        return f"Its widths ({sorted(widths)}) are those of Stage B: this is a Stage B LoRA. "
    return f"It was made for a model of width {width}. "


def _official_attention_weights() -> Dict[int, str]:
    """Number of official-format weights (out_proj + in_proj per attention block) per release."""
    from .configs import STAGE_C

    out = {}
    for variant, cfg in STAGE_C.items():
        levels = range(len(cfg["c_hidden"]))
        blocks = sum((cfg["blocks"][0][i] + cfg["blocks"][1][::-1][i]) * cfg["level_config"][i].count("A")
                     for i in levels)
        out[2 * blocks] = _STAGE_C_TITLES[cfg["c_hidden"][0]]
    return out


def stage_c_deltas(lora: LoraFile, param_names: Union[Iterable[str], Mapping[str, Sequence[int]]],
                   module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS) -> List[WeightDelta]:
    """The Stage C deltas of ``lora`` with official ``weights.N`` entries bound to parameters.

    Binding needs the model: N counts the modules selected by the trainer's ``module_filters``
    (``('.attn',)`` in the official config) in its traversal order. ``param_names`` may be a
    name -> shape mapping, which makes the error messages name the model.
    """
    deltas = list(lora.stage_c)
    if lora.stage_c_indexed:
        targets = official_lora_modules(param_names, module_filters)
        if len(targets) != len(lora.stage_c_indexed):
            n = len(lora.stage_c_indexed)
            model = f", {_describe_model(param_names, 'stage_c')}" if isinstance(param_names, Mapping) else ""
            guess = ""
            if tuple(module_filters) == OFFICIAL_MODULE_FILTERS:
                for variant, title in _official_attention_weights().items():
                    if variant == n:
                        guess = f" {n} weights is what {title} has (2 per attention block)."
            raise LoraError(
                f"{lora.name}: official-format LoRA with {n} weights, but module_filters "
                f"{list(module_filters)} select {len(targets)} weights in the loaded model{model}.{guess} "
                "It was trained for another Stage C size "
                "or with other module_filters."
            )
        for entry, target in zip(lora.stage_c_indexed, targets):
            rank = int(entry.down.shape[0])
            # The official LoRA class uses alpha=1, so its scale is 1/rank.
            deltas.append(WeightDelta(target, f"weights.{entry.index}", 1.0 / rank, up=entry.up,
                                      down=entry.down, broadcast=True))
    return deltas


def _normalize_rows(spec) -> Rows:
    if spec is None:
        return None
    if isinstance(spec, slice):
        return (int(spec.start or 0), int(spec.stop))
    start, stop = spec
    return (int(start), int(stop))


def _text_target(model: nn.Module, delta: WeightDelta) -> Optional[Tuple[str, Rows]]:
    """Our text encoder's parameter (and rows) for a delta on a Hugging Face CLIP key."""
    try:
        mapped = model.hf_key_to_param(delta.target)
    except (KeyError, ValueError):
        return None
    if mapped is None:
        return None
    param, outer = mapped[0], _normalize_rows(mapped[1])
    rows = delta.rows
    if outer is not None:
        rows = (outer[0], outer[1]) if rows is None else (outer[0] + rows[0], outer[0] + rows[1])
        if rows[1] > outer[1]:
            return None
    return param, rows


@dataclass
class LoraMatch:
    """How one LoRA matched a model: ``matched`` of ``total`` deltas were applied."""

    lora: str
    strength: float
    matched: int
    total: int
    missing: List[str] = field(default_factory=list)


def _plan(model: nn.Module, params: Mapping[str, torch.Tensor], loras, part: str,
          module_filters: Sequence[str], strict: bool):
    if part not in ("stage_c", "text"):
        raise ValueError(f"part must be 'stage_c' or 'text', not {part!r}")
    if part == "text" and not hasattr(model, "hf_key_to_param"):
        raise LoraError("the text encoder given has no hf_key_to_param(); pass the project's CLIP-G text encoder")
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    plan: List[Tuple[str, Rows, WeightDelta, float]] = []
    report: List[LoraMatch] = []
    for lora, strength in loras:
        strength = float(strength)
        deltas = stage_c_deltas(lora, shapes, module_filters) if part == "stage_c" else list(lora.text)
        missing, misfit, bound = [], [], []
        for delta in deltas:
            if part == "stage_c":
                target, rows = delta.target, delta.rows
            else:
                mapped = _text_target(model, delta)
                if mapped is None:
                    missing.append(delta.target)
                    continue
                target, rows = mapped
            if target not in shapes:
                missing.append(target)
                continue
            placed = delta if rows == delta.rows else _with_rows(delta, rows)
            if not placed.fits(shapes[target]):
                misfit.append((placed, shapes[target]))
                continue
            bound.append((target, rows, placed))
        total = len(deltas)
        expected = _describe_model(shapes, part)
        what = "Stage C" if part == "stage_c" else "text-encoder"
        if total and not bound:
            hint = _describe_lora_widths(deltas) if part == "stage_c" else ""
            if missing:
                example = f"{missing[0]} (the model has no such weight)"
            else:
                example = f"{misfit[0][0].describe()} (the model has {list(misfit[0][1])})"
            raise LoraError(
                f"{lora.name} ({lora.format} format): 0 of {total} {what} modules match {expected}. {hint}"
                f"First mismatch: {example}"
            )
        if misfit:
            hint = _describe_lora_widths(deltas) if part == "stage_c" else ""
            delta, shape = misfit[0]
            raise LoraError(
                f"{lora.name} ({lora.format} format): {len(misfit)} of {total} {what} modules have shapes that do "
                f"not fit {expected}. {hint}First mismatch: {delta.describe()} but the model has {list(shape)}."
            )
        if missing and strict:
            raise LoraError(
                f"{lora.name} ({lora.format} format): {len(bound)} of {total} {what} modules match {expected}; "
                f"{len(missing)} name weights it does not have (e.g. {missing[0]}). The LoRA was made for another "
                "model size; pass strict=False to apply the matching part anyway."
            )
        report.append(LoraMatch(lora.name, strength, len(bound), total, missing))
        if strength == 0.0:
            continue
        for target, rows, delta in bound:
            plan.append((target, rows, delta, strength * delta.scale))
    return plan, report


def _with_rows(delta: WeightDelta, rows: Rows) -> WeightDelta:
    return WeightDelta(delta.target, delta.source, delta.scale, delta.up, delta.down, delta.diff, rows, delta.broadcast)


def _compute(params: Mapping[str, torch.Tensor], plan) -> Dict[str, torch.Tensor]:
    grouped: Dict[str, List[Tuple[Rows, WeightDelta, float]]] = {}
    for target, rows, delta, coef in plan:
        grouped.setdefault(target, []).append((rows, delta, coef))
    out: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for target, items in grouped.items():
            base = params[target].detach()
            compute_dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
            weight = base.to(dtype=compute_dtype, copy=True)
            for rows, delta, coef in items:
                view = weight if rows is None else weight[rows[0]:rows[1]]
                view += delta.tensor(view.shape, compute_dtype, weight.device) * coef
            out[target] = weight.to(base.dtype)
    return out


LoraStack = Sequence[Tuple[LoraFile, float]]


def patched_tensors(model: nn.Module, loras: LoraStack, part: str = "stage_c", *,
                    module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS,
                    strict: bool = True) -> Dict[str, torch.Tensor]:
    """New tensors for the parameters the LoRAs change; the model itself is left untouched.

    ``part`` is "stage_c" (``model`` is a StageC) or "text" (``model`` is the CLIP-G text encoder,
    which maps Hugging Face keys through ``hf_key_to_param``). LoRAs are added in list order.
    """
    params = dict(model.named_parameters())
    plan, _ = _plan(model, params, loras, part, module_filters, strict)
    return _compute(params, plan)


class LoraPatch:
    """LoRA weights swapped into a model; :meth:`unpatch` puts the original tensors back.

    The original tensor objects are kept, not copied, and never written to, so unpatching
    restores bit-identical weights. Use as a context manager or call ``unpatch()``.
    """

    def __init__(self, model: nn.Module, report: List[LoraMatch]):
        self.model = model
        self.report = report
        self._originals: Dict[str, torch.Tensor] = {}
        self._installed: Dict[str, int] = {}
        self._words: List[str] = []
        self.active = False

    @property
    def patched(self) -> List[str]:
        return list(self._originals)

    def _install(self, params: Mapping[str, nn.Parameter], new: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in new.items():
            param = params[name]
            self._originals[name] = param.data
            param.data = tensor
            self._installed[name] = tensor.data_ptr()
        self.active = True

    def unpatch(self) -> None:
        if not self.active:
            return
        params = dict(self.model.named_parameters())
        for name in self._originals:
            if params[name].data_ptr() != self._installed[name]:
                raise LoraError(f"{name} was replaced after this LoRA patch was applied (by another patch on top, "
                                "or by moving the model to another device or dtype); unpatch the most recent "
                                "patch first, and move a model only while it is unpatched")
        for name, original in self._originals.items():
            params[name].data = original
        if self._words:
            self.model.remove_token_embeddings(self._words)
        self._originals.clear()
        self._installed.clear()
        self._words = []
        self.active = False

    def __enter__(self) -> "LoraPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()


def apply_loras(model: nn.Module, loras: LoraStack, part: str = "stage_c", *,
                module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS, strict: bool = True,
                register_tokens: bool = True) -> LoraPatch:
    """Patch ``model`` in place with a stack of (LoRA, strength); returns the undo handle.

    Strength 0 leaves a LoRA out (its weights stay bit-identical). For ``part="text"`` the
    learned tokens are registered with ``model.add_token_embeddings(words, vectors)`` when the
    encoder can also remove them again (``remove_token_embeddings``).
    Raises :class:`LoraError` before touching anything when a LoRA does not fit the model.
    """
    params = dict(model.named_parameters())
    plan, report = _plan(model, params, loras, part, module_filters, strict)
    new = _compute(params, plan)
    patch = LoraPatch(model, report)
    patch._install(params, new)
    if part == "text" and register_tokens:
        embeddings = [e for lora, strength in loras if float(strength) != 0.0 for e in lora.embeddings]
        if embeddings and hasattr(model, "add_token_embeddings") and hasattr(model, "remove_token_embeddings"):
            rows: Dict[str, torch.Tensor] = {}  # one vector per word; a later LoRA's wins
            for e in embeddings:
                rows.update(zip(e.words, e.vectors))
            words = list(rows)
            model.add_token_embeddings(words, torch.stack([rows[w] for w in words]))
            patch._words = words
    return patch


# ----------------------------------------------------------------------------------------------
# Writing tiny LoRAs (tests, ``python -m wuerstchen tiny-models``)


def _stage_c_shapes(stage_c) -> Dict[str, Tuple[int, ...]]:
    if isinstance(stage_c, nn.Module):
        return {n: tuple(p.shape) for n, p in stage_c.named_parameters()}
    from .models.stage_c import StageC

    with torch.device("meta"):
        model = StageC(**stage_c)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _tiny_stage_c_targets(shapes: Mapping[str, Tuple[int, ...]]) -> List[ModuleTarget]:
    """Every attention q/k/v/out, plus one of each other kind of layer (linear and 1x1 conv)."""
    targets: List[ModuleTarget] = []
    for name in official_lora_modules(shapes, (".attn",)):
        if name.endswith(".in_proj_weight"):
            attn = name[: -len(".in_proj_weight")]
            for q in range(3):
                targets.append(ModuleTarget("stage_c", f"{attn}.in_proj", name, f"{attn}.in_proj_bias", q))
        else:
            module = name[: -len(".weight")]
            targets.append(ModuleTarget("stage_c", module, name, f"{module}.bias"))
    wanted = [r"\.kv_mapper\.1$", r"\.channelwise\.0$", r"\.channelwise\.4$", r"\.\d+\.mapper$",
              r"\.\d+\.mapper_[a-z0-9]+$", r"^embedding\.1$", r"^clip_txt_mapper$"]
    modules = [n[: -len(".weight")] for n in official_lora_modules(shapes, ("",)) if n.endswith(".weight")]
    for pattern in wanted:
        for module in modules:
            if re.search(pattern, module):
                targets.append(ModuleTarget("stage_c", module, f"{module}.weight", f"{module}.bias"))
                break
    return targets


def _tiny_text_targets(text_config: Mapping[str, int]) -> List[Tuple[ModuleTarget, int, int]]:
    width = int(text_config["hidden_size"])
    mlp = int(text_config.get("intermediate_size", 4 * width))
    proj = int(text_config.get("projection_dim", width))
    out = []
    for layer in range(int(text_config["num_hidden_layers"])):
        base = f"text_model.encoder.layers.{layer}"
        for sub, o, i in (("self_attn.q_proj", width, width), ("self_attn.k_proj", width, width),
                          ("self_attn.v_proj", width, width), ("self_attn.out_proj", width, width),
                          ("mlp.fc1", mlp, width), ("mlp.fc2", width, mlp)):
            module = f"{base}.{sub}"
            out.append((ModuleTarget("text", module, f"{module}.weight", f"{module}.bias"), o, i))
    out.append((ModuleTarget("text", "text_projection", "text_projection.weight", "text_projection.bias"), proj, width))
    return out


def write_tiny_lora(path: Union[str, os.PathLike, None], fmt: str, stage_c_config, rank: int = 2, seed: int = 0,
                    text_config: Optional[Mapping[str, int]] = None) -> Dict[str, torch.Tensor]:
    """Write a small random LoRA for ``stage_c_config`` (a StageC config dict or module) in ``fmt``.

    ``fmt`` is one of :data:`FORMATS`. The official format covers what the official trainer
    targets (every attention ``in_proj`` and ``out_proj``); the others cover q/k/v/out of every
    attention block plus one kv_mapper, ResBlock linear, TimestepBlock mapper, 1x1 conv and the
    text mapper. With ``text_config`` (Hugging Face CLIPTextConfig names: hidden_size,
    intermediate_size, num_hidden_layers, projection_dim) text-encoder LoRAs and learned tokens
    are added too. Returns the tensors; writes them as safetensors when ``path`` is given.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {FORMATS}")
    shapes = _stage_c_shapes(stage_c_config)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    out: Dict[str, torch.Tensor] = {}
    if fmt == "official":
        for i, name in enumerate(official_lora_modules(shapes, OFFICIAL_MODULE_FILTERS)):
            shape = shapes[name]
            out[f"weights.{i}.lora_down"] = randn(rank, shape[1])
            out[f"weights.{i}.lora_up"] = randn(shape[0], rank)
        if text_config is not None:
            width = int(text_config["hidden_size"])
            vocab = int(text_config.get("vocab_size", CLIP_VOCAB_SIZE))
            out[OFFICIAL_EMBEDDINGS] = randn(2, width)
            out[OFFICIAL_INDICES] = torch.tensor([min(320, vocab - 1), CLIP_VOCAB_SIZE], dtype=torch.int64)
        _save(out, path, fmt)
        return out

    # kohya writes alpha (scale alpha/rank), OneTrainer too; peft files usually carry none.
    alpha = {"kohya": rank / 2, "onetrainer": 1.0, "diffusers": None}[fmt]
    down_key, up_key = (("lora_A.weight", "lora_B.weight") if fmt == "diffusers"
                        else ("lora_down.weight", "lora_up.weight"))
    entries: List[Tuple[ModuleTarget, int, Tuple[int, ...]]] = []
    for target in _tiny_stage_c_targets(shapes):
        shape = shapes[target.weight]
        out_f = shape[0] // 3 if target.qkv is not None else shape[0]
        entries.append((target, out_f, tuple(shape[1:])))
    if text_config is not None:
        entries += [(t, o, (i,)) for t, o, i in _tiny_text_targets(text_config)]
    for target, out_f, inner in entries:
        key = format_module_name(fmt, target)
        conv = len(inner) > 1
        out[f"{key}.{down_key}"] = randn(rank, *inner) if conv else randn(rank, inner[0])
        out[f"{key}.{up_key}"] = randn(out_f, rank, *([1] * (len(inner) - 1))) if conv else randn(out_f, rank)
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    if text_config is not None and fmt == "onetrainer":
        out["bundle_emb.tinytoken.clip_g"] = randn(2, int(text_config["hidden_size"]))
    _save(out, path, fmt)
    return out


def _save(tensors: Mapping[str, torch.Tensor], path, fmt: str) -> None:
    if path is None:
        return
    from .weights_io import save_safetensors

    save_safetensors(tensors, path, metadata={"wuerstchen_tiny_lora_format": fmt})


def check_lora(model: nn.Module, lora: LoraFile, part: str = "stage_c", *,
               module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS) -> LoraMatch:
    """Raise :class:`LoraError` now if ``lora`` does not fit ``model``; nothing is computed or patched."""
    params = dict(model.named_parameters())
    _, report = _plan(model, params, [(lora, 1.0)], part, module_filters, True)
    return report[0]
