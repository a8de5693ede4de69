"""Textual-inversion embeddings: finding ``embedding:NAME`` in a folder and reading its vectors.

A prompt names an embedding as ComfyUI users write it (``embedding:NAME``, ``embedding:NAME:1.2``,
``(embedding:NAME:1.2)``); the text encoder asks a *resolver* for NAME's vectors. Inside ComfyUI
the resolver looks in ComfyUI's ``embeddings`` folders, on the command line in a folder given by
the user, from Python anything that maps a name to a tensor.

Files: ``.safetensors``, or ``.pt`` / ``.bin`` read with ``torch.load(weights_only=True)``. The
vectors are the ``clip_g`` tensor (SDXL-style files carry ``clip_l`` and ``clip_g``; a OneTrainer
file's ``bundle_emb.*.clip_g`` are joined), else the single tensor under ``string_to_param``
(Automatic1111's layout), else the file's only tensor.
A name is looked up as given, then with each of those suffixes, and only inside the folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
TEXT_ENCODER_KEY = "clip_g"  # the part of a multi-encoder embedding that Stable Cascade's CLIP-G takes

Resolver = Callable[[str], torch.Tensor]
EmbeddingSource = Union[None, Resolver, Mapping[str, Union[torch.Tensor, str, os.PathLike]], str, os.PathLike,
                        Sequence[Union[str, os.PathLike]]]


class EmbeddingError(ValueError):
    """An ``embedding:NAME`` that cannot be used; the message names it and says why."""


def _flatten(obj, prefix: str = "", out: Optional[Dict[str, torch.Tensor]] = None, depth: int = 0):
    out = {} if out is None else out
    if depth > 8:
        return out
    if isinstance(obj, torch.Tensor):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}.{i}" if prefix else str(i), out, depth + 1)
    return out


def read_embedding_file(path: Union[str, os.PathLike], name: Optional[str] = None) -> torch.Tensor:
    """The vectors [n, width] of an embedding file (see the module docstring for the layouts)."""
    path = Path(path)
    label = f"embedding:{name}" if name else path.name
    if path.suffix.lower() in (".safetensors", ".sft"):
        from ..storage.weights_io import WeightFileError, WeightSource

        try:
            tensors = WeightSource(path).read()
        except WeightFileError as exc:
            raise EmbeddingError(f"{label}: {exc}") from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or unsafe files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EmbeddingError(f"{label}: {path.name} cannot be read safely as a tensor file ({first}); "
                                 "only plain tensor files are accepted") from None
        tensors = _flatten(obj)
    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    picked = [v for k, v in floats.items() if k == TEXT_ENCODER_KEY or k.endswith("." + TEXT_ENCODER_KEY)]
    bundled = [v for k, v in floats.items() if k.startswith("bundle_emb.") and k.endswith("." + TEXT_ENCODER_KEY)]
    if len(picked) > 1 and len(bundled) == len(picked):  # a OneTrainer LoRA's tokens, in file order (as ComfyUI)
        picked = [torch.cat([v.reshape(-1, v.shape[-1]) for v in bundled])]
    if not picked:
        picked = [v for k, v in floats.items() if k.startswith("string_to_param.")]
    if not picked and len(floats) == 1:
        picked = list(floats.values())
    if len(picked) != 1:
        shown = ", ".join(f"{k} {list(v.shape)}" for k, v in list(floats.items())[:6])
        raise EmbeddingError(f"{label}: {path.name} holds no single set of vectors for CLIP-G (expected a "
                             f"'{TEXT_ENCODER_KEY}' tensor or one tensor; found {shown or 'no float tensors'})")
    vectors = picked[0]
    if vectors.dim() == 0:
        raise EmbeddingError(f"{label}: {path.name} holds a single number, not embedding vectors")
    return vectors.reshape(-1, vectors.shape[-1]).float()


class EmbeddingFolders:
    """Resolver over folders: ``embedding:NAME`` is NAME or NAME + a known suffix inside one of them."""

    def __init__(self, folders: Iterable[Union[str, os.PathLike]]):
        self.folders: List[Path] = [Path(f) for f in folders]

    def find(self, name: str) -> Optional[Path]:
        for folder in self.folders:
            root = os.path.abspath(folder)
            candidate = os.path.abspath(os.path.join(root, name))
            try:
                inside = os.path.commonpath((root, candidate)) == root and candidate != root
            except ValueError:  # another drive
                inside = False
            if not inside:
                continue  # "../x" or an absolute path: never outside the folder
            for path in [candidate] + [candidate + s for s in EMBEDDING_SUFFIXES]:
                if os.path.isfile(path):
                    return Path(path)
        return None

    def names(self) -> List[str]:
        """Every embedding name the folders offer (for messages)."""
        out = []
        for folder in self.folders:
            if folder.is_dir():
                for path in sorted(folder.rglob("*")):
                    if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file():
                        out.append(path.relative_to(folder).with_suffix("").as_posix())
        return out

    def __call__(self, name: str) -> torch.Tensor:
        path = self.find(name)
        if path is None:
            known = self.names()
            hint = f"; available: {', '.join(known[:8])}{' …' if len(known) > 8 else ''}" if known else \
                " (the folder holds no embeddings)"
            where = ", ".join(str(f) for f in self.folders) or "no embeddings folder"
            raise EmbeddingError(f"embedding:{name}: no such file in {where} (looked for {name} with "
                                 f"{'/'.join(EMBEDDING_SUFFIXES)}){hint}")
        return read_embedding_file(path, name)


def _from_mapping(table: Mapping) -> Resolver:
    def resolve(name: str) -> torch.Tensor:
        if name not in table:
            raise EmbeddingError(f"embedding:{name}: unknown embedding (known: {', '.join(sorted(table)) or 'none'})")
        value = table[name]
        return value if isinstance(value, torch.Tensor) else read_embedding_file(value, name)
    return resolve


def embedding_resolver(source: EmbeddingSource) -> Optional[Resolver]:
    """A resolver name -> vectors from a folder, folders, a mapping or a callable (None stays None)."""
    if source is None or callable(source):
        return source
    if isinstance(source, Mapping):
        return _from_mapping(source)
    if isinstance(source, (str, os.PathLike)):
        return EmbeddingFolders([source])
    if isinstance(source, Sequence):
        return EmbeddingFolders(source)
    raise TypeError(f"embeddings must be a folder, folders, a mapping or a callable, not {type(source).__name__}")
