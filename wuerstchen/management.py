"""The model manager: the one place that loads models, caches them and moves them between devices.

Why one layer: Stage C (3.6B), Stage B (1.5B), the CLIP towers and the VQGAN do not fit a
consumer GPU together. The manager keeps loaded models cached on the offload device (CPU RAM),
puts a model on the compute device only while it runs, and first evicts the others, so peak GPU
memory is about the largest stage rather than the sum. A host application (ComfyUI) plugs in its
device choice, memory freeing and interruption through :class:`ManagerHooks`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoints import LoadedModel, load_parts

# Kinds whose activations overflow float16 (Stage C is the known black-image case).
FP16_GUARDED_KINDS = ("stage_c", "stage_b")


class ManagerHooks:
    """Integration points; the defaults are for plain Python and the CLI."""

    def compute_device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

    def offload_device(self) -> torch.device:
        return torch.device("cpu")

    def free_memory(self, nbytes: int, device: torch.device) -> None:
        """Ask the host to make ``nbytes`` available on ``device`` (ComfyUI unloads its models)."""
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def check_interrupt(self) -> None:
        """Raise if the user asked to stop (ComfyUI's Cancel button)."""

    def supports_bf16(self, device: torch.device) -> bool:
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device.type == "cpu"

    def keep_resident(self) -> bool:
        """Leave a model on the compute device after it ran (fast re-runs), or offload it at once
        (low-VRAM setups, where other programs' models need the room)."""
        return True


def module_bytes(module: nn.Module) -> int:
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += t.numel() * t.element_size()
    return total


def module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@dataclass(frozen=True)
class CacheKey:
    path: str
    size: int
    mtime_ns: int
    dtype: Optional[str]
    kinds: Tuple[str, ...]


class ModelManager:
    """Loads (cached by path, size, mtime and dtype), places and offloads models.

    ``memory_budget`` (bytes) caps what the manager keeps on the compute device at once; None
    means "one running set at a time": everything else is offloaded before a model runs.
    ``dtype`` is the preferred compute dtype, or None to choose per device (bf16 where
    supported on an accelerator, float32 on CPU, float16 with the overflow guard otherwise).
    """

    def __init__(self, hooks: Optional[ManagerHooks] = None, memory_budget: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None):
        self.hooks = hooks or ManagerHooks()
        self.memory_budget = memory_budget
        self.preferred_dtype = dtype
        self._device_override = torch.device(device) if device is not None else None
        self._cache: "OrderedDict[CacheKey, Dict[str, LoadedModel]]" = OrderedDict()
        self._resident: "OrderedDict[int, LoadedModel]" = OrderedDict()  # id(module) -> model on compute device
        self._lock = threading.RLock()

    # -- devices and dtypes ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device_override or self.hooks.compute_device()

    def compute_dtype(self, kind: str, file_dtype: Optional[torch.dtype] = None) -> torch.dtype:
        """dtype a model of ``kind`` runs in on the current device."""
        if self.preferred_dtype is not None:
            return self.preferred_dtype
        device = self.device
        if device.type == "cpu":
            return torch.float32
        if self.hooks.supports_bf16(device):
            return torch.bfloat16
        return torch.float16

    # -- loading -------------------------------------------------------------------------------
    def load(self, path: os.PathLike | str, kinds: Sequence[str], dtype: Optional[torch.dtype] = None) -> LoadedModel:
        parts = self.load_parts(path, kinds, dtype)
        for k in kinds:
            if k in parts:
                return parts[k]
        return next(iter(parts.values()))

    def load_parts(self, path: os.PathLike | str, kinds: Optional[Sequence[str]] = None,
                   dtype: Optional[torch.dtype] = None) -> Dict[str, LoadedModel]:
        path = Path(path)
        st = path.stat()
        kinds_t = tuple(kinds) if kinds else ()
        key = CacheKey(str(path.resolve()), st.st_size, st.st_mtime_ns, str(dtype) if dtype else None, kinds_t)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            # A changed file (same path, new mtime/size) replaces the stale entries; the same file
            # in another dtype is a separate, still valid entry.
            for stale in [k for k in self._cache if k.path == key.path and k.kinds == kinds_t
                          and (k.size, k.mtime_ns) != (key.size, key.mtime_ns)]:
                self._drop(stale)
            target = dtype if dtype is not None else self._load_dtype(kinds_t)
            parts = load_parts(path, kinds=kinds or None, dtype=target, device=self.hooks.offload_device())
            for model in parts.values():
                self._prepare(model)
            self._cache[key] = parts
            return parts

    def _load_dtype(self, kinds: Tuple[str, ...]) -> Optional[torch.dtype]:
        if self.preferred_dtype is not None:
            return self.preferred_dtype
        kind = kinds[0] if kinds else "stage_c"
        return self.compute_dtype(kind)

    def _prepare(self, model: LoadedModel) -> None:
        if model.kind in FP16_GUARDED_KINDS and hasattr(model.module, "fp16_guard"):
            model.module.fp16_guard = model.dtype == torch.float16

    def _drop(self, key: CacheKey) -> None:
        for model in self._cache.pop(key).values():
            self._resident.pop(id(model.module), None)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._resident.clear()

    def cached(self) -> List[LoadedModel]:
        return [m for parts in self._cache.values() for m in parts.values()]

    # -- placement -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, *models: LoadedModel) -> Iterator[torch.device]:
        """Put ``models`` on the compute device for the duration of the block."""
        device = self.device
        with self._lock:
            needed = sum(module_bytes(m.module) for m in models if module_device(m.module) != device)
            keep = {id(m.module) for m in models}
            self._evict_for(needed, keep, device)
            if needed:
                self.hooks.free_memory(needed, device)
            for m in models:
                if module_device(m.module) != device:
                    m.module.to(device)
                self._resident[id(m.module)] = m
                self._resident.move_to_end(id(m.module))
        try:
            yield device
        finally:
            if device.type != "cpu" and not self.hooks.keep_resident():
                with self._lock:
                    for m in models:
                        self._resident.pop(id(m.module), None)
                        m.module.to(self.hooks.offload_device())

    def _evict_for(self, needed: int, keep: set, device: torch.device) -> None:
        if device.type == "cpu":
            return
        resident_bytes = sum(module_bytes(m.module) for m in self._resident.values())
        for mid in list(self._resident):
            if mid in keep:
                continue
            over_budget = self.memory_budget is not None and resident_bytes + needed > self.memory_budget
            if self.memory_budget is not None and not over_budget:
                break
            model = self._resident.pop(mid)
            resident_bytes -= module_bytes(model.module)
            model.module.to(self.hooks.offload_device())
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def offload_all(self) -> None:
        with self._lock:
            for model in list(self._resident.values()):
                model.module.to(self.hooks.offload_device())
            self._resident.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def resident(self) -> List[LoadedModel]:
        return list(self._resident.values())
