"""The trained LoRA in the official trainer's format, with what made it in the safetensors metadata.

Keys as the official ``lora`` ModuleDict saves them: ``weights.N.lora_down`` / ``weights.N.lora_up``
in the official module order and, with learned tokens, ``embeddings.embeddings`` [n, width] +
``embeddings.indices`` [n]. One difference (README): the official file stores only the learned
change of a *new* word's row, leaving its starting mean to be rebuilt from the config; here a new
word's row is stored whole (start + change), which is what every loader that reads these files,
ours included, takes as the word's vector. Rows of existing tokens are changes, as officially.
The metadata names the new words (``train_tokens``: [[index, word], ...], as the official info.json).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..lora import LoraFile, parse_lora
from ..lora.formats import OFFICIAL_EMBEDDINGS, OFFICIAL_INDICES
from ..lora.parse import TEXT_TOKEN_EMBEDDING
from ..storage.weights_io import save_safetensors

TRAINER_NAME = "wuerstchen.train (official Stage C LoRA recipe)"


def lora_tensors(trainer, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """The trained tensors of ``trainer`` (a :class:`~.trainer.LoraTrainer`) under the official keys."""
    out: Dict[str, torch.Tensor] = {}
    for i, factor in enumerate(trainer.lora.weights):
        out[f"weights.{i}.lora_down"] = factor.lora_down.detach().to("cpu", dtype).contiguous()
        out[f"weights.{i}.lora_up"] = factor.lora_up.detach().to("cpu", dtype).contiguous()
    tokens = trainer.tokens
    if tokens is not None and len(tokens):
        rows = []
        for k, index in enumerate(tokens.indices):
            change = tokens.embeddings[k].detach().float().cpu()
            rows.append(tokens.start[k].float().cpu() + change if index in tokens.words else change)
        out[OFFICIAL_EMBEDDINGS] = torch.stack(rows).to(dtype)
        out[OFFICIAL_INDICES] = torch.tensor(tokens.indices, dtype=torch.int64)
    return out


def lora_metadata(trainer, base_model: str = "", dataset_size: Optional[int] = None) -> Dict[str, str]:
    cfg = trainer.config
    tokens = trainer.tokens
    return {
        "format": "wuerstchen_official_lora",
        "trainer": TRAINER_NAME,
        "base_model": base_model,
        "rank": str(cfg.rank),
        "steps": str(trainer.step),
        "dataset_size": str(len(trainer.data) if dataset_size is None else dataset_size),
        "module_filters": json.dumps(list(cfg.module_filters)),
        "train_tokens": json.dumps([[i, w] for i, w in (tokens.words.items() if tokens else [])]),
        "recipe": cfg.to_json(),
    }


def token_words(metadata: Mapping[str, str]) -> Dict[int, str]:
    """The new words a file's ``train_tokens`` metadata names, by index (empty when it has none)."""
    try:
        return {int(i): str(w) for i, w in json.loads(metadata.get("train_tokens", "[]"))}
    except (ValueError, TypeError):
        return {}


def trained_lora(trainer, name: str = "trained LoRA", base_model: str = "") -> LoraFile:
    """The trained LoRA as our loader's :class:`~wuerstchen.lora.LoraFile` (no file needed)."""
    meta = lora_metadata(trainer, base_model)
    return parse_lora(lora_tensors(trainer), name=name, metadata=meta, token_words=token_words(meta))


def save_lora(trainer, path: os.PathLike | str, base_model: str = "",
              dtype: torch.dtype = torch.float32) -> Tuple[str, Dict[str, str]]:
    """Write the LoRA as safetensors at ``path`` (atomically); returns (path, metadata)."""
    meta = lora_metadata(trainer, base_model)
    tmp = f"{os.fspath(path)}.tmp"
    save_safetensors(lora_tensors(trainer, dtype), tmp, metadata=meta)
    os.replace(tmp, path)
    return os.fspath(path), meta


def save_lora_file(lora: LoraFile, path: os.PathLike | str) -> str:
    """Write an in-memory trained LoRA (from :func:`trained_lora`) back to the official keys."""
    tensors: Dict[str, torch.Tensor] = {}
    for e in lora.stage_c_indexed:
        tensors[f"weights.{e.index}.lora_down"] = e.down.contiguous()
        tensors[f"weights.{e.index}.lora_up"] = e.up.contiguous()
    rows, indices = [], []
    words = {w: i for i, w in token_words(lora.metadata).items()}
    for emb in lora.embeddings:
        rows.append(emb.vectors.reshape(-1)), indices.append(words.get(emb.word, -1))
    for d in lora.text:
        if d.target == TEXT_TOKEN_EMBEDDING and d.rows is not None:
            rows.append(d.diff.reshape(-1)), indices.append(d.rows[0])
    if rows:
        if -1 in indices:
            raise ValueError(f"{lora.name}: a learned word has no index in its metadata")
        tensors[OFFICIAL_EMBEDDINGS] = torch.stack(rows).float()
        tensors[OFFICIAL_INDICES] = torch.tensor(indices, dtype=torch.int64)
    tmp = f"{os.fspath(path)}.tmp"
    save_safetensors(tensors, tmp, metadata=dict(lora.metadata))
    os.replace(tmp, path)
    return os.fspath(path)
