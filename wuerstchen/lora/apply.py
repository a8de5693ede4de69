"""Patching a model with a stack of LoRAs, all or nothing, and undoing it exactly.

Order of work: bind every LoRA to the model and check everything (:func:`.match.plan`), compute
every new tensor aside (float32 math, or float64 for float64 weights), and only then swap the new
tensors into the parameters and register the learned tokens. If any step fails, what was already
swapped or registered is put back before the error propagates. The original tensor objects are
kept, never written to, so unpatching restores bit-identical weights, and words that a patch
replaced get their previous vectors back.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .deltas import Rows, WeightDelta, dora_merge
from .formats import OFFICIAL_MODULE_FILTERS
from .match import LoraMatch, describe_match, plan
from .parse import LoraError, LoraFile

log = logging.getLogger("wuerstchen.lora")

LoraStack = Sequence[Tuple[LoraFile, float]]


def _stored_dtype(params: Mapping[str, torch.Tensor], base: torch.Tensor) -> torch.dtype:
    """The dtype a patched weight is kept in: the weight's own, except for an fp8-stored weight,
    which keeps the model's compute dtype (rounding the patched weight back to 8 bits would wipe
    out most of a LoRA's change; the layers upcast fp8 weights to that dtype anyway)."""
    from ..models.ops import is_fp8

    if not is_fp8(base.dtype):
        return base.dtype
    return next((p.dtype for p in params.values() if p.is_floating_point() and not is_fp8(p.dtype)),
                torch.float32)


def _compute(params: Mapping[str, torch.Tensor], steps) -> Dict[str, torch.Tensor]:
    grouped: Dict[str, List[Tuple[Rows, WeightDelta, float]]] = {}
    for target, rows, delta, strength in steps:
        grouped.setdefault(target, []).append((rows, delta, strength))
    out: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for target, items in grouped.items():
            base = params[target].detach()
            compute_dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
            weight = base.to(dtype=compute_dtype, copy=True)
            for rows, delta, strength in items:
                view = weight if rows is None else weight[rows[0]:rows[1]]
                try:
                    change = delta.tensor(view.shape, compute_dtype, weight.device)
                    if delta.dora_scale is not None:
                        view.copy_(dora_merge(view, change * delta.scale, delta.dora_scale, strength))
                    else:
                        view += change * (strength * delta.scale)
                except RuntimeError as exc:  # fits() should have caught it; say which module
                    raise LoraError(f"{delta.source}: cannot be applied to {target} {list(view.shape)}: "
                                    f"{str(exc).splitlines()[0]}") from None
            out[target] = weight.to(_stored_dtype(params, base))
    return out


def patched_tensors(model: nn.Module, loras: LoraStack, part: str = "stage_c", *,
                    module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS,
                    strict: bool = False) -> Dict[str, torch.Tensor]:
    """New tensors for the parameters the LoRAs change; the model itself is left untouched.

    ``part`` is "stage_c" (``model`` is a StageC) or "text" (``model`` is the CLIP-G text encoder,
    which maps Hugging Face keys through ``hf_key_to_param``). LoRAs are added in list order.
    """
    params = dict(model.named_parameters())
    steps, _ = plan(model, params, loras, part, module_filters, strict)
    return _compute(params, steps)


class LoraPatch:
    """LoRA weights swapped into a model; :meth:`unpatch` puts the original tensors back.

    The original tensor objects are kept, not copied, and never written to, so unpatching
    restores bit-identical weights. Learned tokens are removed again, and a word that existed
    before gets its previous vector back. Use as a context manager or call ``unpatch()``.
    """

    def __init__(self, model: nn.Module, report: List[LoraMatch]):
        self.model = model
        self.report = report
        self._originals: Dict[str, torch.Tensor] = {}
        self._installed: Dict[str, int] = {}
        self._new_words: List[str] = []
        self._replaced_words: Dict[str, torch.Tensor] = {}
        self.active = False

    @property
    def patched(self) -> List[str]:
        return list(self._originals)

    def _install(self, params: Mapping[str, nn.Parameter], new: Mapping[str, torch.Tensor]) -> None:
        self.active = True
        for name, tensor in new.items():
            param = params[name]
            self._originals[name] = param.data
            param.data = tensor
            self._installed[name] = tensor.data_ptr()

    def _register(self, words: List[str], vectors: torch.Tensor) -> None:
        """Add learned tokens; the encoder's ``add_token_embeddings`` changes nothing when it fails."""
        self.active = True
        from ..text.tokenizer import normalize_text

        before = self.model.added_token_vectors()
        keys = [normalize_text(w) for w in words]
        self.model.add_token_embeddings(words, vectors)
        self._new_words = [w for w, k in zip(words, keys) if k not in before]
        self._replaced_words = {k: before[k] for k in keys if k in before}

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
        if self._new_words:
            self.model.remove_token_embeddings(self._new_words)
        if self._replaced_words:
            words = list(self._replaced_words)
            self.model.add_token_embeddings(words, torch.stack([self._replaced_words[w] for w in words]))
        self._originals.clear()
        self._installed.clear()
        self._new_words, self._replaced_words = [], {}
        self.active = False

    def __enter__(self) -> "LoraPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()


def _learned_tokens(loras: LoraStack) -> Tuple[List[str], Optional[torch.Tensor]]:
    rows: Dict[str, torch.Tensor] = {}  # one vector per word; a later LoRA's wins
    for lora, strength in loras:
        if float(strength) != 0.0:
            for e in lora.embeddings:
                rows.update(zip(e.words, e.vectors))
    words = list(rows)
    return words, (torch.stack([rows[w] for w in words]) if words else None)


def apply_loras(model: nn.Module, loras: LoraStack, part: str = "stage_c", *,
                module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS, strict: bool = False,
                register_tokens: bool = True) -> LoraPatch:
    """Patch ``model`` in place with a stack of (LoRA, strength); returns the undo handle.

    Changes to weights the model does not have are left out and reported through the
    ``wuerstchen.lora`` logger (``strict=True`` refuses them instead). A LoRA of which nothing
    fits, or whose shapes do not fit the model, raises :class:`LoraError` before anything is
    touched. Strength 0 leaves a LoRA out (its weights stay bit-identical). For ``part="text"``
    the learned tokens are registered with the encoder's ``add_token_embeddings``. All or nothing:
    on any failure the model and its tokenizer are left exactly as they were.
    """
    params = dict(model.named_parameters())
    steps, report = plan(model, params, loras, part, module_filters, strict)
    new = _compute(params, steps)
    words, vectors = _learned_tokens(loras) if part == "text" and register_tokens else ([], None)
    if words and not all(hasattr(model, m) for m in ("add_token_embeddings", "remove_token_embeddings",
                                                     "added_token_vectors")):
        log.warning("%s: the text encoder cannot hold learned tokens; %d left out", model.__class__.__name__,
                    len(words))
        words = []
    patch = LoraPatch(model, report)
    try:
        patch._install(params, new)
        if words:
            patch._register(words, vectors)
    except Exception as exc:
        patch.unpatch()
        if isinstance(exc, ValueError) and not isinstance(exc, LoraError):
            names = ", ".join(lora.name for lora, _ in loras)
            raise LoraError(f"{names}: its learned tokens cannot be registered: {exc}") from None
        raise
    for (lora, _), match in zip(loras, report):
        if match.missing:
            log.warning("%s", describe_match(lora, [match]))
    return patch


def check_lora(model: nn.Module, lora: LoraFile, part: str = "stage_c", *,
               module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS, strict: bool = False) -> LoraMatch:
    """Raise :class:`LoraError` now if ``lora`` does not fit ``model``; nothing is computed or patched."""
    params = dict(model.named_parameters())
    _, report = plan(model, params, [(lora, 1.0)], part, module_filters, strict)
    return report[0]
