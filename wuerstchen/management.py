"""The model manager: the one place that loads models, caches them and moves them between devices.

Why one layer: Stage C (3.6B), Stage B (1.5B), the CLIP towers and the VQGAN do not fit a
consumer GPU together. The manager keeps loaded models cached on the offload device (CPU RAM),
puts a model on the compute device only while it runs, and first evicts the others, so peak GPU
memory is about the largest stage rather than the sum. A host application (ComfyUI) plugs in its
device choice, memory freeing and interruption through :class:`ManagerHooks`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import kinds
from .checkpoints import LoadedModel, inspect, load_parts
from .weights_io import WeightSource

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


def physical_memory() -> Optional[int]:
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def default_cache_budget() -> Optional[int]:
    """How much RAM the model cache may fill by default: 3/4 of the machine's."""
    total = physical_memory()
    return None if total is None else total * 3 // 4


@dataclass(frozen=True)
class FileKey:
    """One file's contents (path, size, modification time) read in one dtype (None = the file's)."""

    path: str
    size: int
    mtime_ns: int
    dtype: Optional[str]


@dataclass
class _CacheEntry:
    present: Tuple[str, ...]  # the kinds of network the file holds
    models: Dict[str, LoadedModel] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(module_bytes(m.module) for m in self.models.values())


class ModelManager:
    """Loads (cached by file and dtype), places and offloads models.

    One file read in one dtype is one module per network, whichever loader asked for it (a Stage C
    loader and a single-file checkpoint loader on the same file share the Stage C module). The
    cache on the offload device is bounded by ``cache_budget`` bytes ("auto": 3/4 of the RAM; None:
    unbounded): loading past it first drops the least recently used files that are not running.
    ``memory_budget`` (bytes) caps what the manager keeps on the compute device at once; None
    means "one running set at a time": everything else is offloaded before a model runs.
    ``dtype`` is the preferred weight dtype, or None to choose per device (bf16 where supported on
    an accelerator, float32 on CPU, float16 with the overflow guard otherwise).
    """

    def __init__(self, hooks: Optional[ManagerHooks] = None, memory_budget: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None,
                 cache_budget: Optional[int] | str = "auto"):
        self.hooks = hooks or ManagerHooks()
        self.memory_budget = memory_budget
        self.cache_budget = default_cache_budget() if cache_budget == "auto" else cache_budget
        self.preferred_dtype = dtype
        self._device_override = torch.device(device) if device is not None else None
        self._cache: "OrderedDict[FileKey, _CacheEntry]" = OrderedDict()
        self._resident: "OrderedDict[int, LoadedModel]" = OrderedDict()  # id(module) -> model on compute device
        self._lock = threading.RLock()

    # -- devices and dtypes ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device_override or self.hooks.compute_device()

    def weight_dtype(self) -> torch.dtype:
        """The dtype weights are loaded in when the caller names none."""
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
        """The networks of ``kinds`` (all if None) that the file holds, loaded once per file and dtype."""
        path = Path(path)
        st = path.stat()
        target = dtype if dtype is not None else self.weight_dtype()
        key = FileKey(str(path.resolve()), st.st_size, st.st_mtime_ns, str(target))
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                # A changed file (same path, new size/mtime) makes its entries stale.
                for stale in [k for k in self._cache if k.path == key.path and (k.size, k.mtime_ns) != (key.size, key.mtime_ns)]:
                    self._drop(stale)
                entry = _CacheEntry(tuple(d.kind for d in inspect(path)))
            wanted = [k for k in entry.present if kinds is None or k in kinds]
            missing = [k for k in wanted if k not in entry.models]
            if missing or not wanted:  # nothing wanted: load_parts raises the "expected X, found Y" error
                self._make_room(self._estimate_bytes(path, target), keep=key)
                parts = load_parts(path, kinds=missing or kinds, dtype=target, device=self.hooks.offload_device())
                for model in parts.values():
                    self._prepare(model)
                entry.models.update(parts)
            self._cache[key] = entry
            self._cache.move_to_end(key)
            return {k: entry.models[k] for k in wanted}

    @staticmethod
    def _estimate_bytes(path: Path, dtype: torch.dtype) -> int:
        """Bytes the file's floating tensors take in ``dtype`` (others as stored)."""
        src = WeightSource(path)
        size = torch.empty((), dtype=dtype).element_size()
        total = 0
        for key, shape in src.shapes().items():
            stored = src.dtypes()[key]
            total += math.prod(shape) * (size if stored.is_floating_point else torch.empty((), dtype=stored).element_size())
        return total

    def _make_room(self, incoming: int, keep: FileKey) -> None:
        """Drop least recently used cache entries (not running) until ``incoming`` more bytes fit."""
        if self.cache_budget is None:
            return
        used = sum(e.nbytes() for e in self._cache.values())
        running = {id(m.module) for m in self._resident.values()}
        for key in list(self._cache):
            if used + incoming <= self.cache_budget:
                break
            if key == keep or any(id(m.module) in running for m in self._cache[key].models.values()):
                continue
            used -= self._cache[key].nbytes()
            self._drop(key)

    def _prepare(self, model: LoadedModel) -> None:
        if kinds.get(model.kind).fp16_guard and hasattr(model.module, "fp16_guard"):
            model.module.fp16_guard = model.dtype == torch.float16

    def _drop(self, key: FileKey) -> None:
        for model in self._cache.pop(key).models.values():
            self._resident.pop(id(model.module), None)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._resident.clear()

    def cached(self) -> List[LoadedModel]:
        return [m for entry in self._cache.values() for m in entry.models.values()]

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
