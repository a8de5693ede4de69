"""Reading LoRA files: every key becomes a change to a named weight, a learned token, or a reason.

Parsing needs no model: module names are recognised by their shape (see :mod:`.formats`), and
whether each one exists in the loaded model, with a fitting shape, is decided when the LoRA is
applied (:mod:`.apply`). Everything a file could break later is checked here, once: incomplete
or non-multiplying factors, non-finite values or alpha, learned tokens that cannot become words.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from .deltas import WeightDelta
from .formats import (BUNDLE_EMBEDDING_KEY, CLIP_VOCAB_SIZE, LOHA_ROLES, LOKR_ROLES, OFFICIAL_EMBEDDINGS,
                      OFFICIAL_INDICES, OFFICIAL_WEIGHT_KEY, UNSUPPORTED_ROLES, ModuleTarget,
                      describe_foreign_lora, resolve_module, split_key)

log = logging.getLogger("wuerstchen.lora")

FORMATS = ("official", "kohya", "onetrainer", "diffusers", "comfyui")
TEXT_TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"


class LoraError(ValueError):
    """A LoRA that cannot be used with the loaded model; the message says why and what it is."""


@dataclass(frozen=True, eq=False)
class TokenEmbedding:
    """A learned token for the text encoder: ``vectors`` [n, width] stand for ``word``.

    ``output_vectors`` is OneTrainer's optional output embedding (``clip_g_out``; not used).
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


@dataclass(frozen=True, eq=False)
class IndexedLora:
    """An official-trainer entry ``weights.N``: its module is known only once a model is given."""

    index: int
    up: torch.Tensor
    down: torch.Tensor


@dataclass(eq=False)
class LoraFile:
    """A parsed LoRA file.

    ``unused`` lists the keys that no model will get, each with the reason (not a Stage C or
    CLIP-G name, an adapter kind we do not compute, …); which of the rest fit the loaded model
    is decided when it is applied.
    """

    name: str
    format: str
    stage_c: List[WeightDelta]
    text: List[WeightDelta]
    embeddings: List[TokenEmbedding]
    num_keys: int
    unused: List[Tuple[str, str]] = field(default_factory=list)
    stage_c_indexed: List[IndexedLora] = field(default_factory=list)
    metadata: Dict[str, str] = field(default_factory=dict)
    kinds: Dict[str, int] = field(default_factory=dict)

    @property
    def unrecognized(self) -> List[str]:
        """Keys that will not be applied to any model (see ``unused`` for why)."""
        return [key for key, _ in self.unused]

    @property
    def counts(self) -> Dict[str, int]:
        return {
            "keys": self.num_keys,
            "stage_c_modules": len(self.stage_c) + len(self.stage_c_indexed),
            "text_modules": len(self.text),
            "embeddings": len(self.embeddings),
            "unrecognized_keys": len(self.unused),
        }

    def summary(self) -> str:
        c = self.counts
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        text = (f"{self.name}: {self.format} format, {c['stage_c_modules']} Stage C modules, "
                f"{c['text_modules']} text-encoder modules, {c['embeddings']} embeddings")
        if kinds:
            text += f" ({kinds})"
        if self.unused:
            key, why = self.unused[0]
            text += f"; {len(self.unused)} keys not used (e.g. {key}: {why})"
        return text


# ----------------------------------------------------------------------------------------------
# Reading a file


def load_lora(path: Union[str, os.PathLike], *, token_words: Optional[Mapping[int, str]] = None) -> LoraFile:
    """Read a LoRA file (.safetensors, or a plain tensor .pt/.ckpt read with weights_only).

    ``token_words`` names the official trainer's new tokens by their index (its ``info.json``
    lists them as ``train_tokens``); unnamed ones become ``<lora_token_INDEX>``. The trainer
    saves only what it learned on top of a new token's starting vector (zeros, or the mean of
    the rows its config's regex picked), so such a token's vector is that learned part.
    Keys that cannot be used are reported through the ``wuerstchen.lora`` logger.
    """
    from ..storage.weights_io import WeightFileError, WeightSource

    path = Path(path)
    try:
        source = WeightSource(path)
        tensors = source.read()
    except WeightFileError as exc:
        raise LoraError(str(exc)) from None
    lora = parse_lora(tensors, name=path.name, metadata=dict(source.metadata), token_words=token_words)
    if lora.unused:
        key, why = lora.unused[0]
        log.warning("%s: %d of %d keys are not used (e.g. %s: %s)", lora.name, len(lora.unused), lora.num_keys,
                    key, why)
    return lora


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
    except (TypeError, ValueError, RecursionError):
        return {}
    if not isinstance(meta, dict):
        return {}
    found: Dict[str, Dict[str, float]] = {}
    for key, value in meta.items():
        prefix, _, field_name = key.rpartition(".")
        if field_name in ("lora_alpha", "r") and isinstance(value, (int, float)) and not isinstance(value, bool):
            found.setdefault(prefix, {})[field_name] = float(value)
    return {prefix: v["lora_alpha"] / v["r"] for prefix, v in found.items()
            if "lora_alpha" in v and v.get("r") and math.isfinite(v["lora_alpha"] / v["r"])}


def _check_finite(name: str, key: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise LoraError(f"{name}: {key} holds NaN or infinite values; the file is corrupt (re-download or "
                        "re-export it)")


def _alpha(name: str, module: str, roles: Mapping[str, torch.Tensor]) -> Optional[float]:
    if "alpha" not in roles:
        return None
    alpha = roles["alpha"]
    if alpha.numel() != 1:
        raise LoraError(f"{name}: {module}.alpha must be one number, it has shape {list(alpha.shape)}")
    value = float(alpha.reshape(()).item())
    if not math.isfinite(value):
        raise LoraError(f"{name}: {module}.alpha is {value}; alpha must be a finite number")
    return value


def _need(name: str, module: str, roles: Mapping[str, torch.Tensor], *wanted: str) -> None:
    missing = [w for w in wanted if w not in roles]
    if missing:
        what = f"{missing[0]} matrix" if len(missing) == 1 else f"{', '.join(missing)} matrices"
        raise LoraError(f"LoRA module {module} has no {what}; the file {name} is incomplete")


def _module_deltas(name: str, module: str, roles: Dict[str, torch.Tensor], target: ModuleTarget,
                   default_scale: float) -> List[WeightDelta]:
    """The changes one module's tensors make (weight, and bias when a ``diff_b`` is given)."""
    alpha = _alpha(name, module, roles)

    def rows_for(out: int):
        return None if target.qkv is None else (target.qkv * out, (target.qkv + 1) * out)

    def delta(kind, factors, scale):
        out = int(next(iter(factors.values())).shape[0])
        if kind == "loha":
            out = int(factors["hada_w1_a"].shape[1 if "hada_t1" in factors else 0])
        elif kind == "lokr":
            out = _lokr_out(factors)
        return WeightDelta(target.weight, module, scale, kind, factors, rows=rows_for(out),
                           dora_scale=roles.get("dora_scale"))

    deltas: List[WeightDelta] = []
    loha = {r: roles[r] for r in LOHA_ROLES if r in roles}
    lokr = {r: roles[r] for r in LOKR_ROLES if r in roles}
    mixed = [kind for kind, present in (("LoRA", any(r in roles for r in ("up", "down", "mid"))), ("LoHa", loha),
                                        ("LoKr", lokr)) if present]
    if len(mixed) > 1:
        raise LoraError(f"LoRA module {module} mixes {' and '.join(mixed)} tensors; the file {name} is broken")
    if "diff" in roles:  # a full diff replaces any adapter on the same weight (as in ComfyUI)
        deltas.append(delta("diff", {"diff": roles["diff"]}, 1.0))
    elif loha:
        _need(name, module, loha, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if ("hada_t1" in loha) != ("hada_t2" in loha):
            raise LoraError(f"LoRA module {module} has only one of hada_t1 / hada_t2; the file {name} is incomplete")
        rank = int(loha["hada_w1_b"].shape[0])
        deltas.append(delta("loha", loha, 1.0 if alpha is None else alpha / rank))
    elif lokr:
        for side in (1, 2):
            if f"lokr_w{side}" not in lokr:
                _need(name, module, lokr, f"lokr_w{side}_a", f"lokr_w{side}_b")
        if "lokr_t1" in lokr:
            raise LoraError(f"LoRA module {module} has a lokr_t1 Tucker core, which no LoKr implementation "
                            f"reads (only lokr_t2); {name} cannot be applied as its trainer meant")
        rank = None
        if "lokr_w1" not in lokr:
            rank = int(lokr["lokr_w1_b"].shape[0])
        if "lokr_w2" not in lokr:
            rank = int(lokr["lokr_w2_b"].shape[0])
        deltas.append(delta("lokr", lokr, 1.0 if alpha is None or rank is None else alpha / rank))
    elif "up" in roles or "down" in roles or "mid" in roles:
        _need(name, module, roles, "up", "down")
        up, down, mid = roles["up"], roles["down"], roles.get("mid")
        rank = int(down.shape[0]) if down.dim() else 0
        if up.dim() < 2 or down.dim() < 2 or rank == 0:
            raise LoraError(f"LoRA module {module}: up {list(up.shape)} and down {list(down.shape)} are not "
                            "matrices of rank >= 1")
        if mid is not None:
            if mid.dim() < 3 or mid.shape[0] != up.shape[1] or mid.shape[1] != rank:
                raise LoraError(f"LoRA module {module}: lora_mid {list(mid.shape)} does not join up "
                                f"{list(up.shape)} and down {list(down.shape)}")
        elif up.shape[1] != rank or math.prod(up.shape[2:]) != 1:
            raise LoraError(f"LoRA module {module}: up {list(up.shape)} and down {list(down.shape)} "
                            "do not multiply (their rank dimensions differ)")
        factors = {"up": up, "down": down}
        if mid is not None:
            factors["mid"] = mid
        deltas.append(delta("lora", factors, default_scale if alpha is None else alpha / rank))
    elif "dora_scale" in roles:
        raise LoraError(f"LoRA module {module} has a dora_scale but no LoRA/LoHa/LoKr factors; the file {name} "
                        "is incomplete")
    if "diff_b" in roles:
        if not target.bias:
            raise LoraError(f"LoRA module {module} has a diff_b but {target.module} has no bias")
        diff = roles["diff_b"]
        deltas.append(WeightDelta(target.bias, module + ".diff_b", 1.0, "diff", {"diff": diff},
                                  rows=rows_for(int(diff.shape[0])) if diff.dim() else None))
    return deltas


def _lokr_out(f: Mapping[str, torch.Tensor]) -> int:
    def side(n):
        whole = f.get(f"lokr_w{n}")
        if whole is not None:
            return int(whole.shape[0])
        a = f[f"lokr_w{n}_a"]
        return int(a.shape[1] if f"lokr_t{n}" in f else a.shape[0])
    return side(1) * side(2)


def parse_lora(tensors: Mapping[str, torch.Tensor], *, name: str = "LoRA",
               metadata: Optional[Mapping[str, str]] = None,
               token_words: Optional[Mapping[int, str]] = None) -> LoraFile:
    """Parse a LoRA state dict (see :func:`load_lora`); the format is detected from its keys."""
    metadata = dict(metadata or {})
    if token_words is None:  # files we train name their new words in the metadata (save.py)
        token_words = _metadata_token_words(metadata)
    keys = list(tensors)
    if not keys:
        raise LoraError(f"{name}: the file holds no tensors")
    for key in keys:
        _check_finite(name, key, tensors[key])

    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    group_keys: Dict[str, List[str]] = {}
    peft_modules = set()  # modules written with lora_A / lora_B (peft) names
    official: Dict[int, Dict[str, torch.Tensor]] = {}
    bundles: Dict[str, Dict[str, torch.Tensor]] = {}
    unused: List[Tuple[str, str]] = []
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
            unused.append((key, "not a LoRA tensor name"))
            continue
        module, role, scheme = split
        if scheme == "peft":
            peft_modules.add(module)
        groups.setdefault(module, {})[role] = tensor
        group_keys.setdefault(module, []).append(key)

    peft_scales = _peft_alpha_scales(metadata)
    stage_c: List[WeightDelta] = []
    text: List[WeightDelta] = []
    namings: Dict[str, int] = {}
    kinds: Dict[str, int] = {}
    unsupported: Dict[str, str] = {}
    recognised: List[str] = []  # keys naming Stage C / CLIP-G modules (for the family check)
    for module, roles in groups.items():
        resolved = resolve_module(module)
        if resolved is None:
            unused.extend((k, "not a Stable Cascade Stage C or CLIP-G module") for k in group_keys[module])
            continue
        target, naming = resolved
        recognised.extend(group_keys[module])
        odd = sorted({UNSUPPORTED_ROLES[r] for r in roles if r in UNSUPPORTED_ROLES})
        if odd:
            unsupported.setdefault(odd[0], group_keys[module][0])
            unused.extend((k, f"{odd[0]} is not supported") for k in group_keys[module])
            continue
        if set(roles) <= {"alpha"}:
            unused.extend((k, "an alpha without factors") for k in group_keys[module])
            continue
        if naming in ("kohya", "onetrainer", "comfyui"):
            fmt = naming
        else:  # OneTrainer's OMI files are dotted but keep lora_down / lora_up
            fmt = "onetrainer" if naming == "omi" and module not in peft_modules else "diffusers"
        namings[fmt] = namings.get(fmt, 0) + 1
        component = module.split(".", 1)[0] if "." in module else ""
        default_scale = peft_scales.get(component, peft_scales.get("", 1.0))
        deltas = _module_deltas(name, module, roles, target, default_scale)
        for d in deltas:
            kind = d.kind + ("+dora" if d.dora_scale is not None else "")
            kinds[kind] = kinds.get(kind, 0) + 1
        (stage_c if target.part == "stage_c" else text).extend(deltas)

    indexed = _official_entries(name, official)
    if indexed:
        namings["official"] = namings.get("official", 0) + len(indexed)
        kinds["lora"] = kinds.get("lora", 0) + len(indexed)
    embeddings, token_deltas = _embeddings(name, tensors, bundles, token_words, unused)
    text.extend(token_deltas)
    if embeddings or token_deltas:
        namings.setdefault("official" if OFFICIAL_EMBEDDINGS in tensors else "onetrainer", 1)

    if not (stage_c or text or indexed or embeddings):
        if unsupported:
            kind, example = next(iter(unsupported.items()))
            raise LoraError(f"{name}: uses {kind} (e.g. key {example}), which is not supported; LoRA, LoCon, LoHa, "
                            "LoKr, DoRA (dora_scale) and full diffs are")
        foreign = describe_foreign_lora(keys)
        if foreign:
            raise LoraError(f"{name}: this is {foreign}, not a Stable Cascade Stage C LoRA. "
                            f"None of its {len(keys)} keys can be used with Stage C.")
        raise LoraError(
            f"{name}: not a Stage C LoRA — none of its {len(keys)} keys (e.g. {keys[0]}) name a Stage C or CLIP-G "
            "module. Expected kohya (lora_unet_…, lora_te_…), OneTrainer (lora_prior_unet_…, lora_prior_te_…), "
            "diffusers (…attention.to_q.lora_A.weight), ComfyUI (diffusion_model.…, text_encoders.clip_g.…) or "
            "the official trainer's weights.N.lora_down/lora_up. It is probably a LoRA for another model."
        )
    foreign = describe_foreign_lora(recognised) if recognised else None
    if foreign:  # Stage C-shaped names that another family uses (Stage B levels, v2 prior blocks)
        raise LoraError(f"{name}: this is {foreign}, not a Stable Cascade Stage C LoRA.")
    fmt = max(namings, key=lambda k: namings[k])
    return LoraFile(name, fmt, stage_c, text, embeddings, len(keys), unused, indexed, metadata, kinds)


def _metadata_token_words(metadata: Mapping[str, str]) -> Optional[Dict[int, str]]:
    """``train_tokens`` metadata ([[index, word], ...], as the official info.json lists them), if any."""
    try:
        return {int(i): str(w) for i, w in json.loads(metadata["train_tokens"])} or None
    except (KeyError, ValueError, TypeError):
        return None


def _official_entries(name: str, official: Mapping[int, Mapping[str, torch.Tensor]]) -> List[IndexedLora]:
    indexed: List[IndexedLora] = []
    for index in sorted(official):
        pair = official[index]
        if set(pair) != {"down", "up"}:
            raise LoraError(f"{name}: official-format entry weights.{index} lacks lora_"
                            f"{'up' if 'down' in pair else 'down'}; the file is incomplete")
        up, down = pair["up"], pair["down"]
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
            raise LoraError(f"{name}: weights.{index}: lora_up {list(up.shape)} and lora_down "
                            f"{list(down.shape)} do not multiply")
        indexed.append(IndexedLora(index, up, down))
    if indexed and [e.index for e in indexed] != list(range(len(indexed))):
        raise LoraError(f"{name}: official-format indices are not 0..{len(indexed) - 1}; entries are missing")
    return indexed


def _embeddings(name: str, tensors: Mapping[str, torch.Tensor], bundles, token_words,
                unused: List[Tuple[str, str]]) -> Tuple[List[TokenEmbedding], List[WeightDelta]]:
    """Learned tokens (new words) and learned changes to existing vocabulary rows.

    Refuses now what the text encoder could not register later: a word it cannot hold (``!`` or
    ``<|…|>`` inside, outer spaces), vectors that are not [n, width], two widths in one file.
    """
    from ..text.tokenizer import CLIPTokenizer

    embeddings: List[TokenEmbedding] = []
    deltas: List[WeightDelta] = []
    if OFFICIAL_EMBEDDINGS in tensors:
        vectors = tensors[OFFICIAL_EMBEDDINGS]
        indices = tensors.get(OFFICIAL_INDICES)
        if vectors.dim() != 2 or indices is None or indices.numel() != vectors.shape[0]:
            raise LoraError(f"{name}: embeddings.embeddings has shape {list(vectors.shape)} but embeddings.indices "
                            "is missing or of another length")
        if indices.is_floating_point():
            raise LoraError(f"{name}: embeddings.indices must hold integers")
        words = dict(token_words or {})
        for row, index in enumerate(int(i) for i in indices.reshape(-1).tolist()):
            vector = vectors[row:row + 1]
            if 0 <= index < CLIP_VOCAB_SIZE:
                # The trainer learned an additive change to an existing token's embedding row.
                deltas.append(WeightDelta(TEXT_TOKEN_EMBEDDING, f"embeddings[{index}]", 1.0, "diff",
                                          {"diff": vector}, rows=(index, index + 1)))
            elif index >= CLIP_VOCAB_SIZE:
                word = words.get(index, f"<lora_token_{index}>")
                embeddings.append(TokenEmbedding(word, vector, f"embeddings[{index}]"))
            else:
                raise LoraError(f"{name}: embeddings.indices holds {index}, not a token id")
    for bundle_name, parts in bundles.items():
        if "clip_g" not in parts:
            unused.extend((f"bundle_emb.{bundle_name}.{p}", "an output embedding without its input embedding")
                          for p in parts)
            continue
        vectors = parts["clip_g"]
        if vectors.dim() == 0:
            raise LoraError(f"{name}: bundle_emb.{bundle_name}.clip_g is a single number, not embedding vectors")
        embeddings.append(TokenEmbedding(bundle_name, vectors.reshape(-1, vectors.shape[-1]),
                                         f"bundle_emb.{bundle_name}", parts.get("clip_g_out")))
    widths = sorted({int(e.vectors.shape[-1]) for e in embeddings} | {int(d.diff.shape[-1]) for d in deltas})
    if len(widths) > 1:
        raise LoraError(f"{name}: its learned tokens have different widths {widths}; one text encoder has one "
                        "width, so the file is broken")
    seen: Dict[str, str] = {}
    tokenizer = CLIPTokenizer()  # Stable Cascade's: the words it can hold (no vocabulary is read)
    for e in embeddings:
        for word in e.words:
            try:
                key = tokenizer.check_added_word(word)
            except ValueError as exc:
                raise LoraError(f"{name}: learned token {e.source} cannot be used: {exc}") from None
            if key in seen and seen[key] != e.source:
                raise LoraError(f"{name}: learned tokens {seen[key]} and {e.source} both define the word {word!r}")
            seen[key] = e.source
    return embeddings, deltas
