"""Matching a parsed LoRA to a loaded model: which changes land on which parameters, and why not.

Names that the model does not have are left out and reported; a change whose name exists but
whose shape does not fit means the LoRA was made for another model, and the whole LoRA is
refused with a message that says which model it looks made for. What the official models look
like (widths, attention counts) is read by building each official config of
:mod:`wuerstchen.models.configs` on the meta device, and titles come from :mod:`wuerstchen.files.kinds`; nothing
is restated here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .deltas import Rows, WeightDelta
from .formats import OFFICIAL_MODULE_FILTERS, official_lora_modules
from .parse import LoraError, LoraFile

PARTS = ("stage_c", "text")


@dataclass
class LoraMatch:
    """How one LoRA matched a model: ``matched`` of ``total`` changes apply.

    ``missing`` names the parameters the model does not have (left out).
    """

    lora: str
    strength: float
    matched: int
    total: int
    missing: List[str] = field(default_factory=list)
    tokens: int = 0


# ----------------------------------------------------------------------------------------------
# What the official models look like


@lru_cache(maxsize=None)
def _official_shapes(kind: str, variant: str) -> Dict[str, Tuple[int, ...]]:
    from ..models import configs

    if kind == "stage_c":
        from ..models.stage_c import StageC as cls
        config = configs.STAGE_C[variant]
    else:
        from ..models.stage_b import StageB as cls
        config = configs.STAGE_B[variant]
    with torch.device("meta"):
        model = cls(**config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _attention_width(shapes: Mapping[str, Sequence[int]]) -> Optional[int]:
    for name, shape in shapes.items():
        if name.endswith(".attention.attn.out_proj.weight"):
            return int(shape[0])
    return None


def _attention_blocks(shapes: Mapping[str, Sequence[int]]) -> int:
    return sum(1 for n in shapes if n.endswith(".attention.attn.in_proj_weight"))


def official_titles(kind: str = "stage_c") -> Dict[int, str]:
    """Attention width -> title of each official ``kind`` ("stage_c" / "stage_b") variant."""
    from ..models.configs import STAGE_B, STAGE_C, VARIANT_TITLES

    variants = STAGE_C if kind == "stage_c" else STAGE_B
    return {_attention_width(_official_shapes(kind, v)): VARIANT_TITLES[kind][v] for v in variants}


def stage_b_widths() -> List[int]:
    """Every channel width of the official Stage B variants (to recognise a Stage B LoRA)."""
    from ..models.configs import STAGE_B

    return sorted({w for cfg in STAGE_B.values() for w in cfg["c_hidden"]})


def describe_model(shapes: Mapping[str, Sequence[int]], part: str) -> str:
    if part == "text":
        return "the CLIP-G text encoder"
    width = _attention_width(shapes)
    n_attn = _attention_blocks(shapes)
    title = "a Stage C"
    for variant_title, (w, n) in _official_stage_c_signatures().items():
        if (w, n) == (width, n_attn):
            title = variant_title
    return f"{title} (attention width {width}, {n_attn} attention blocks)"


def _official_stage_c_signatures() -> Dict[str, Tuple[int, int]]:
    from ..models.configs import STAGE_C, VARIANT_TITLES

    return {VARIANT_TITLES["stage_c"][v]: (_attention_width(_official_shapes("stage_c", v)),
                                         _attention_blocks(_official_shapes("stage_c", v)))
            for v in STAGE_C}


def describe_lora_widths(deltas: Sequence[WeightDelta]) -> str:
    """A hint naming the model a misfitting LoRA was made for, from the widths it changes."""
    widths = set()
    for d in deltas:
        out = d.natural_shape()[0]
        if d.target.endswith(".in_proj_weight") and d.rows is None:
            widths.add(out // 3)  # a change to the whole fused q/k/v projection
        elif ".attention.attn." in d.target or d.target.endswith(("channelwise.4.weight", "depthwise.weight")):
            widths.add(out)
    if not widths:
        return ""
    width = max(widths)
    titles = official_titles("stage_c")
    if width in titles:
        return f"It looks like a LoRA for {titles[width]} (width {width}). "
    if width in stage_b_widths():
        return f"Its widths ({sorted(widths)}) are those of Stage B: this is a Stage B LoRA. "
    return f"It was made for a model of width {width}. "


def _official_weight_counts() -> Dict[int, str]:
    """Number of official-format weights per official Stage C variant -> its title."""
    from ..models.configs import STAGE_C, VARIANT_TITLES

    return {len(official_lora_modules(_official_shapes("stage_c", v))): VARIANT_TITLES["stage_c"][v] for v in STAGE_C}


# ----------------------------------------------------------------------------------------------
# Binding


def stage_c_deltas(lora: LoraFile, param_names: Union[Iterable[str], Mapping[str, Sequence[int]]],
                   module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS) -> List[WeightDelta]:
    """The Stage C changes of ``lora``, with official ``weights.N`` entries bound to parameters.

    Binding needs the model: N counts the modules selected by the trainer's ``module_filters``
    (``('.attn',)`` in the official config) in its traversal order. ``param_names`` (in model
    order) may be a name -> shape mapping, which makes the error messages name the model.
    """
    deltas = list(lora.stage_c)
    if lora.stage_c_indexed:
        targets = official_lora_modules(param_names, module_filters)
        if len(targets) != len(lora.stage_c_indexed):
            n = len(lora.stage_c_indexed)
            model = f", {describe_model(param_names, 'stage_c')}" if isinstance(param_names, Mapping) else ""
            guess = ""
            if tuple(module_filters) == OFFICIAL_MODULE_FILTERS:
                title = _official_weight_counts().get(n)
                if title:
                    guess = f" {n} weights is what {title} has (2 per attention block)."
            raise LoraError(
                f"{lora.name}: official-format LoRA with {n} weights, but module_filters "
                f"{list(module_filters)} select {len(targets)} weights in the loaded model{model}.{guess} "
                "It was trained for another Stage C size or with other module_filters."
            )
        for entry, target in zip(lora.stage_c_indexed, targets):
            # The official LoRA class uses alpha=1, so its scale is 1/rank.
            deltas.append(WeightDelta(target, f"weights.{entry.index}", 1.0 / int(entry.down.shape[0]), "lora",
                                      {"up": entry.up, "down": entry.down}, broadcast=True))
    return deltas


def _normalize_rows(spec) -> Rows:
    if spec is None:
        return None
    if isinstance(spec, slice):
        return (int(spec.start or 0), int(spec.stop))
    start, stop = spec
    return (int(start), int(stop))


def text_target(model: nn.Module, delta: WeightDelta) -> Optional[Tuple[str, Rows]]:
    """Our text encoder's parameter (and rows) for a change to a Hugging Face CLIP key."""
    try:
        mapped = model.hf_key_to_param(delta.target)
    except (KeyError, ValueError):
        return None
    if mapped is None:
        return None
    param, outer = mapped[0], _normalize_rows(mapped[1])
    rows = delta.rows
    if outer is not None:
        rows = outer if rows is None else (outer[0] + rows[0], outer[0] + rows[1])
        if rows[1] > outer[1]:
            return None
    return param, rows


def check_strength(lora: str, strength) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise LoraError(f"{lora}: strength {strength!r} is not a number") from None
    if not math.isfinite(value):
        raise LoraError(f"{lora}: strength {value} is not a finite number; use a value such as 1.0")
    return value


def token_width(model: nn.Module) -> Optional[int]:
    weight = getattr(getattr(model, "token_embedding", None), "weight", None)
    return None if weight is None else int(weight.shape[-1])


def check_tokens(model: nn.Module, lora: LoraFile) -> None:
    """Refuse learned tokens the text encoder cannot hold (checked before anything is changed)."""
    width = token_width(model)
    for e in lora.embeddings:
        if width is not None and int(e.vectors.shape[-1]) != width:
            raise LoraError(f"{lora.name}: learned token {e.word!r} ({e.source}) has vectors {int(e.vectors.shape[-1])} "
                            f"wide but the text encoder's embeddings are {width} wide; the LoRA was made for another "
                            "text encoder")


Plan = List[Tuple[str, Rows, WeightDelta, float]]


def plan(model: nn.Module, params: Mapping[str, torch.Tensor], loras, part: str,
         module_filters: Sequence[str], strict: bool) -> Tuple[Plan, List[LoraMatch]]:
    """Bind every LoRA of the stack to ``params``; raise :class:`LoraError` before anything changes."""
    if part not in PARTS:
        raise ValueError(f"part must be 'stage_c' or 'text', not {part!r}")
    if part == "text" and not hasattr(model, "hf_key_to_param"):
        raise LoraError("the text encoder given has no hf_key_to_param(); pass the project's CLIP-G text encoder")
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    steps: Plan = []
    report: List[LoraMatch] = []
    for lora, strength in loras:
        strength = check_strength(lora.name, strength)
        deltas = stage_c_deltas(lora, shapes, module_filters) if part == "stage_c" else list(lora.text)
        if part == "text":
            check_tokens(model, lora)
        missing, misfit, bound = [], [], []
        for delta in deltas:
            if part == "stage_c":
                target, rows = delta.target, delta.rows
            else:
                mapped = text_target(model, delta)
                if mapped is None:
                    missing.append(delta.target)
                    continue
                target, rows = mapped
            if target not in shapes:
                missing.append(target)
                continue
            placed = delta if rows == delta.rows else delta.replace(rows=rows)
            if not placed.fits(shapes[target]):
                misfit.append((placed, shapes[target]))
                continue
            bound.append((target, rows, placed))
        total = len(deltas)
        expected = describe_model(shapes, part)
        what = "Stage C" if part == "stage_c" else "text-encoder"
        hint = describe_lora_widths(deltas) if part == "stage_c" else ""
        if total and not bound:
            if missing:
                example = f"{missing[0]} (the model has no such weight)"
            else:
                example = f"{misfit[0][0].describe()} (the model has {list(misfit[0][1])})"
            raise LoraError(f"{lora.name} ({lora.format} format): 0 of {total} {what} modules match {expected}. "
                            f"{hint}First mismatch: {example}")
        if misfit:
            delta, shape = misfit[0]
            raise LoraError(
                f"{lora.name} ({lora.format} format): {len(misfit)} of {total} {what} modules have shapes that do "
                f"not fit {expected}. {hint}First mismatch: {delta.describe()} but the model has {list(shape)}."
            )
        if missing and strict:
            raise LoraError(
                f"{lora.name} ({lora.format} format): {len(bound)} of {total} {what} modules match {expected}; "
                f"{len(missing)} name weights it does not have (e.g. {missing[0]})."
            )
        tokens = sum(len(e.words) for e in lora.embeddings) if part == "text" else 0
        report.append(LoraMatch(lora.name, strength, len(bound), total, missing, tokens))
        if strength == 0.0:
            continue
        for target, rows, delta in bound:
            steps.append((target, rows, delta, strength))
    return steps, report


def describe_match(lora: LoraFile, matches: Sequence[LoraMatch]) -> str:
    """One line: what of ``lora`` applies to the model(s) matched, and what does not and why.

    e.g. "x.safetensors: applied 704 of 711 modules; 7 keys not for this model, e.g. …".
    """
    applied = sum(m.matched for m in matches)
    total = sum(m.total for m in matches)
    missing = [name for m in matches for name in m.missing]
    text = f"{lora.name}: applied {applied} of {total} modules"
    tokens = sum(m.tokens for m in matches)
    if tokens:
        text += f" and {tokens} learned token{'s' if tokens > 1 else ''}"
    notes = []
    if missing:
        notes.append(f"{len(missing)} for weights this model does not have, e.g. {missing[0]}")
    if lora.unused:
        key, why = lora.unused[0]
        notes.append(f"{len(lora.unused)} keys not for this model, e.g. {key} ({why})")
    return text + ("; " + "; ".join(notes) if notes else "")

