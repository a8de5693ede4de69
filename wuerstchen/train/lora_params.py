"""The trainable parts: LoRA factors on the Stage C weights the filters select, and learned tokens.

As the official trainer (``modules/lora.py``, ``apply_lora`` / ``apply_retoken``): every module whose
name contains one of ``module_filters`` and owns a ``weight`` (else an ``in_proj_weight``) gets
``W + (up @ down) / rank`` with ``down`` zeros and ``up`` ~ N(0, 1); the entries are numbered in
the official order (:func:`wuerstchen.lora.official_lora_modules`). The factors are float32 master
copies whatever the model's dtype; the change is cast to the weight's dtype when it is added.

Learned tokens (the official ``train_tokens``): ``('[name]', regex)`` adds the new word ``[name]``
whose vector starts as the mean of the vocabulary rows whose token matches ``regex`` (zeros when
none does); ``('regex', None)`` trains the existing tokens matching ``regex``. Either way a zero-
initialised change is learned on top of the starting row. Words go to a private tokenizer and the
rows reach the text encoder as inline embeddings, so the shared encoder is never modified.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..lora import OFFICIAL_MODULE_FILTERS, official_lora_modules
from ..text.tokenizer import VOCAB_SIZE, CLIPTokenizer

log = logging.getLogger("wuerstchen.train")


class LoraFactor(nn.Module):
    """One official LoRA entry, used as a parametrization: ``W -> W + (up @ down) / rank``."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: Optional[torch.Generator] = None,
                 device=None):
        super().__init__()
        self.lora_down = nn.Parameter(torch.zeros(rank, in_features, device=device))
        self.lora_up = nn.Parameter(torch.randn(out_features, rank, generator=generator).to(device))
        self.scale = 1.0 / rank

    def delta(self, shape: Sequence[int]) -> torch.Tensor:
        change = (self.lora_up @ self.lora_down) * self.scale
        return change.view(*shape[:2], *([1] * (len(shape) - 2)))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original + self.delta(original.shape).to(original.dtype)


def _owner(model: nn.Module, param_name: str) -> Tuple[nn.Module, str]:
    module_name, _, attr = param_name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


class StageCLora(nn.Module):
    """The LoRA factors for ``model`` (built once, attached only inside :meth:`attached`)."""

    def __init__(self, model: nn.Module, rank: int = 4, module_filters: Sequence[str] = OFFICIAL_MODULE_FILTERS,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank = int(rank)
        self.module_filters = tuple(module_filters)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.targets: List[str] = official_lora_modules(list(shapes), self.module_filters)
        if not self.targets:
            raise ValueError(f"module filters {list(self.module_filters)} select no Stage C weights")
        device = next(model.parameters()).device
        self.weights = nn.ModuleList(LoraFactor(shapes[t][0], shapes[t][1], self.rank, generator, device)
                                     for t in self.targets)

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        """``model`` computes with the LoRA inside the block; afterwards it holds its own Parameter
        objects again, untouched (also after an exception)."""
        done = []
        try:
            for target, factor in zip(self.targets, self.weights):
                module, attr = _owner(model, target)
                parametrize.register_parametrization(module, attr, factor)
                done.append((module, attr))
            yield
        finally:
            for module, attr in reversed(done):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)


@dataclass(frozen=True)
class TokenSpec:
    """One ``train_tokens`` entry: a new word in [] or <> (with the regex its start is the mean of),
    or a regex of existing tokens (``init`` None)."""

    token: str
    init: Optional[str] = None

    @property
    def is_new(self) -> bool:
        t = self.token
        return (t.startswith("[") and t.endswith("]")) or (t.startswith("<") and t.endswith(">"))

    @classmethod
    def parse(cls, text: str) -> "TokenSpec":
        """``'[name]:^dog</w>'`` -> new word [name] starting as the mean of the rows matching ^dog</w>;
        ``'^snail'`` -> the existing tokens matching ^snail."""
        token, init = text, None
        if text.startswith(("[", "<")):
            close = "]" if text.startswith("[") else ">"
            end = text.find(close)
            if end < 0:
                raise ValueError(f"token {text!r}: a new word is written [name] or <name>, optionally followed "
                                 "by :REGEX (its starting vector is the mean of the tokens REGEX matches)")
            token, rest = text[:end + 1], text[end + 1:]
            if rest and not rest.startswith(":"):
                raise ValueError(f"token {text!r}: expected ':' after {token}")
            init = rest[1:] or None
        for pattern in (p for p in (token if not cls(token).is_new else None, init) if p):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"token {text!r}: {pattern!r} is not a regular expression ({exc})") from None
        return cls(token, init or None)


class LearnedTokens(nn.Module):
    """Learned rows for the text encoder: ``indices`` (49408 + k for new words), their starting rows,
    the learned change ``embeddings`` (the official ReToken), and a tokenizer that knows the words."""

    def __init__(self, specs: Sequence[TokenSpec], token_embedding: torch.Tensor):
        super().__init__()
        self.tokenizer = CLIPTokenizer()
        vocab = self.tokenizer.vocabulary.token_ids
        weight = token_embedding.detach().float().cpu()
        indices: List[int] = []
        starts: Dict[int, torch.Tensor] = {}
        self.words: Dict[int, str] = {}
        for spec in specs:
            if spec.is_new:
                index = self.tokenizer.add_tokens([spec.token])[0]
                rows = [i for t, i in vocab.items() if spec.init and re.search(spec.init, t)]
                if spec.init and not rows:
                    log.warning("no tokens match %r; %s starts as zeros", spec.init, spec.token)
                starts[index] = weight[rows].mean(0) if rows else torch.zeros(weight.shape[1])
                self.words[index] = spec.token
                chosen = [index]
            else:
                chosen = [i for t, i in vocab.items() if re.search(spec.token, t)]
                if not chosen:
                    raise ValueError(f"token regex {spec.token!r} matches no token of the CLIP vocabulary")
                for i in chosen:
                    starts[i] = weight[i]
            indices += chosen
        indices = sorted(set(indices), key=indices.index)  # duplicates removed, first order kept
        self.indices = indices
        self.register_buffer("start", torch.stack([starts[i] for i in indices]) if indices
                             else torch.zeros(0, weight.shape[1]))
        self.embeddings = nn.Parameter(torch.zeros(len(indices), weight.shape[1]))

    def __len__(self) -> int:
        return len(self.indices)

    def rows(self) -> torch.Tensor:
        return self.start + self.embeddings

    def encode(self, text_encoder: nn.Module, captions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stage C's (clip_text, clip_text_pooled) of ``captions`` with the learned rows in place
        (official tokenization: truncated to 77 tokens, with the attention mask)."""
        ids, mask = self.tokenizer(list(captions))
        position = {index: k for k, index in enumerate(self.indices)}
        inline = ids.clone()
        for index, k in position.items():
            inline[ids == index] = -1 - k
        if int(inline.max()) >= VOCAB_SIZE:
            raise RuntimeError("a learned word has no row")  # cannot happen: every added word is listed
        param = text_encoder.token_embedding.weight
        rows = self.rows().to(param.device, param.dtype)
        out = text_encoder(inline.to(param.device), mask.to(param.device), inline_embeddings=rows)
        return out.clip_text, out.clip_text_pooled


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """The modules' own parameters need no gradient inside the block; their flags are restored after."""
    flags = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def normal_tensors(*modules: nn.Module) -> Iterator[None]:
    """Autograd cannot save inference-mode tensors (what models loaded under ``torch.inference_mode``,
    as ComfyUI runs its nodes, hold): inside the block such parameters and buffers are replaced by
    normal copies, and the module's own objects are put back after. Nothing is copied otherwise."""
    swapped = []
    try:
        with torch.inference_mode(False):
            for m in modules:
                if m is None:
                    continue
                for owner in m.modules():
                    for store in (owner._parameters, owner._buffers):
                        for name, t in list(store.items()):
                            if t is not None and t.is_inference():
                                copy = t.clone()
                                store[name] = nn.Parameter(copy, t.requires_grad) if isinstance(t, nn.Parameter) \
                                    else copy
                                swapped.append((store, name, t))
        yield
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Gradient checkpointing of each block of a Stage C (``block_schedule``): a block's activations
    are recomputed in the backward pass instead of kept. The instance ``forward`` is restored after."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(dict.fromkeys(model.block_schedule())) if enabled else []
    try:
        for block in blocks:
            original = block.forward

            def forward(*args, _original=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            block.forward = forward
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
