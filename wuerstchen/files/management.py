"""The model manager: the one place that loads models, caches them and moves them between devices.

Why one layer: Stage C (3.6B), Stage B (1.5B), the CLIP towers and the VQGAN do not fit a
consumer GPU together. The manager keeps loaded models cached on the offload device (CPU RAM),
puts a model on the compute device only while it runs, and first evicts the others, so peak GPU
memory is about the largest stage rather than the sum; a stage larger than the room it gets runs
with its blocks streamed (:mod:`wuerstchen.sampling.streaming`). A host application (ComfyUI) plugs in its
device choice, memory freeing, interruption and its own memory manager through
:class:`ManagerHooks`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import kinds
from .checkpoints import LoadedModel, inspect, load_parts
from ..inputs.limits import physical_memory
from ..models.ops import is_fp8
from ..sampling.streaming import Placement, Transfers, module_bytes
from ..storage.weights_io import WeightSource

#: Room left for activations when the weight budget comes from the free memory of a CUDA device.
ACTIVATION_RESERVE = 2 << 30


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
        """Ask the host to make ``nbytes`` available on ``device`` before the manager places
        models itself (hosts with a memory manager place them through :meth:`placer` instead)."""
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

    def placer(self, manager: "ModelManager") -> "Placer":
        """Who decides what stays on the compute device: the manager's own policy, or the host's
        memory manager (ComfyUI's), which then sees, counts and evicts our networks like its own."""
        return LocalPlacer(manager)


class Placer:
    """Puts the networks a run needs on the compute device (:meth:`acquire`) and decides what
    happens to them after it (:meth:`release`). Each network is a :class:`Placement`."""

    def acquire(self, placements: Sequence[Placement], device: torch.device) -> None:
        raise NotImplementedError

    def release(self, placements: Sequence[Placement]) -> None:
        """The run that needed ``placements`` is over (they may stay on the device)."""

    def forget(self, placement: Placement) -> None:
        """The cache dropped this network: take it off the device and out of any bookkeeping."""
        placement.unload()

    def offload_all(self) -> None:
        raise NotImplementedError


class LocalPlacer(Placer):
    """The manager's own policy (plain Python, the CLI): placed networks stay on the device in LRU
    order within ``memory_budget`` (None: only the running set stays), until ``keep_resident``
    says otherwise. The room a run gets is the budget (or, on CUDA without one, the free memory
    less :data:`ACTIVATION_RESERVE`); a network that does not fit streams its blocks."""

    def __init__(self, manager: "ModelManager"):
        self.manager = manager
        self.placed: "OrderedDict[int, Placement]" = OrderedDict()

    def acquire(self, placements, device):
        if not self.manager.transfers(device).moves:
            return
        keep = {id(p) for p in placements}
        needed = sum(p.total_bytes - p.loaded_bytes for p in placements)
        self._evict(needed, keep, device)
        if needed:
            self.manager.hooks.free_memory(needed, device)
        budget = self._room(placements, keep, device)
        if budget is None or sum(p.total_bytes for p in placements) <= budget:
            for p in placements:
                p.load(device)
        else:
            fixed = [p for p in placements if not p.streamable]
            room = budget - sum(p.total_bytes for p in fixed)
            for p in fixed:
                p.load(device)
            for p in sorted((p for p in placements if p.streamable), key=lambda p: -p.total_bytes):
                room -= p.load(device, max(room, 0))
        for p in placements:
            self.placed[id(p)] = p
            self.placed.move_to_end(id(p))

    def _room(self, placements, keep, device) -> Optional[int]:
        if self.manager.memory_budget is not None:
            others = sum(p.loaded_bytes for i, p in self.placed.items() if i not in keep)
            return max(self.manager.memory_budget - others, 0)
        if device.type == "cuda" and torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info(device)
            return max(free + sum(p.loaded_bytes for p in placements) - ACTIVATION_RESERVE, 0)
        return None

    def _evict(self, needed: int, keep: set, device: torch.device) -> None:
        budget = self.manager.memory_budget
        placed_bytes = sum(p.loaded_bytes for p in self.placed.values())
        for pid in list(self.placed):
            if pid in keep or self.manager.is_running(self.placed[pid].module):
                continue
            if budget is not None and placed_bytes + needed <= budget:
                break
            placement = self.placed.pop(pid)
            placed_bytes -= placement.loaded_bytes
            placement.unload()
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def release(self, placements):
        if self.manager.hooks.keep_resident():
            return
        for p in placements:
            self.placed.pop(id(p), None)
            p.unload()

    def forget(self, placement):
        self.placed.pop(id(placement), None)
        placement.unload()

    def offload_all(self):
        for placement in self.placed.values():
            placement.unload()
        self.placed.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# The weight dtypes a user can choose, by the names the CLI and the loader nodes show. New choices go
# at the end: saved ComfyUI workflows store the choice by name and keep working.
WEIGHT_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


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
    ``memory_budget`` (bytes) caps the weights the manager keeps on the compute device at once; a
    running set larger than that streams the blocks of its Stage B/C (peak: the budget plus one
    block, plus activations). None means "one running set at a time": everything else is
    offloaded before a model runs, and on CUDA a stage streams only if it exceeds the free memory.
    Inside a host with its own memory manager (ComfyUI) that manager decides instead (see
    :meth:`ManagerHooks.placer`).
    ``dtype`` is the preferred weight dtype, or None to choose per device (bf16 where supported on
    an accelerator, float32 on CPU, float16 with the overflow guard otherwise). An fp8 dtype
    stores the matrix weights of the kinds that support it in fp8, computing in the per-device
    choice; other kinds load in that choice.
    ``transfers(device, offload)`` makes the :class:`~wuerstchen.sampling.streaming.Transfers` that move
    weights (tests pass a :class:`~wuerstchen.sampling.streaming.SimulatedDevice`).
    """

    def __init__(self, hooks: Optional[ManagerHooks] = None, memory_budget: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None,
                 cache_budget: Optional[int] | str = "auto",
                 transfers: Optional[Callable[[torch.device, torch.device], Transfers]] = None):
        self.hooks = hooks or ManagerHooks()
        self.memory_budget = memory_budget
        self.cache_budget = default_cache_budget() if cache_budget == "auto" else cache_budget
        self.preferred_dtype = dtype
        self._device_override = torch.device(device) if device is not None else None
        self._cache: "OrderedDict[FileKey, _CacheEntry]" = OrderedDict()
        self._placements: Dict[int, Placement] = {}  # id(module) -> where its weights are
        self._running: Dict[int, int] = {}  # id(module) -> how many runs use it now
        self._make_transfers = transfers or Transfers
        self._transfers: Dict[torch.device, Transfers] = {}
        self._placer = self.hooks.placer(self)
        self._lock = threading.RLock()

    # -- devices and dtypes ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device_override or self.hooks.compute_device()

    def weight_dtype(self) -> torch.dtype:
        """The dtype weights are loaded in when the caller names none."""
        if self.preferred_dtype is not None:
            return self.preferred_dtype
        return self.compute_dtype()

    def compute_dtype(self) -> torch.dtype:
        """The dtype networks compute in: the preferred dtype, unless that is a storage-only fp8
        dtype; then (and without a preference) bf16 on accelerators that support it, float16
        (with the overflow guard) on others, float32 on CPU."""
        if self.preferred_dtype is not None and not is_fp8(self.preferred_dtype):
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
        compute = self.compute_dtype() if is_fp8(target) else target
        spelled = str(target) if compute == target else f"{target}/{compute}"
        key = FileKey(str(path.resolve()), st.st_size, st.st_mtime_ns, spelled)
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
                parts = load_parts(path, kinds=missing or kinds, dtype=target, device=self.hooks.offload_device(),
                                   compute_dtype=compute)
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
        dtypes = src.dtypes()
        return sum(math.prod(shape) * (dtype if dtypes[key].is_floating_point else dtypes[key]).itemsize
                   for key, shape in src.shapes().items())

    def _make_room(self, incoming: int, keep: FileKey) -> None:
        """Drop least recently used cache entries (not running) until ``incoming`` more bytes fit."""
        if self.cache_budget is None:
            return
        used = sum(e.nbytes() for e in self._cache.values())
        running = set(self._running)
        for key in list(self._cache):
            if used + incoming <= self.cache_budget:
                break
            if key == keep or any(id(m.module) in running for m in self._cache[key].models.values()):
                continue
            used -= self._cache[key].nbytes()
            self._drop(key)

    def _prepare(self, model: LoadedModel) -> None:
        if kinds.get(model.kind).fp16_guard and hasattr(model.module, "fp16_guard"):
            model.module.fp16_guard = (model.compute_dtype or model.dtype) == torch.float16

    def _drop(self, key: FileKey) -> None:
        for model in self._cache.pop(key).models.values():
            placement = self._placements.pop(id(model.module), None)
            if placement is not None:
                self._placer.forget(placement)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._cache):
                self._drop(key)

    def cached(self) -> List[LoadedModel]:
        return [m for entry in self._cache.values() for m in entry.models.values()]

    # -- placement -----------------------------------------------------------------------------
    def transfers(self, device: torch.device) -> Transfers:
        """How weights move between the offload device and ``device``."""
        device = torch.device(device)
        if device not in self._transfers:
            self._transfers[device] = self._make_transfers(device, self.hooks.offload_device())
        return self._transfers[device]

    def placement(self, model: LoadedModel) -> Placement:
        """Where ``model``'s weights are (one record per cached network)."""
        with self._lock:
            placement = self._placements.get(id(model.module))
            if placement is None or placement.module is not model.module:
                placement = Placement(model.module, self.hooks.offload_device(), self.transfers)
                self._placements[id(model.module)] = placement
            return placement

    def is_running(self, module: nn.Module) -> bool:
        return id(module) in self._running

    @contextlib.contextmanager
    def running(self, *models: LoadedModel) -> Iterator[torch.device]:
        """Put ``models`` on the compute device for the duration of the block (whole, or with
        their blocks streamed when they do not fit the room they get)."""
        device = self.device
        with self._lock:
            placements = [self.placement(m) for m in models]
            self._placer.acquire(placements, device)
            for p in placements:
                self._running[id(p.module)] = self._running.get(id(p.module), 0) + 1
        try:
            yield device
        finally:
            with self._lock:
                done = []
                for p in placements:
                    left = self._running.pop(id(p.module)) - 1
                    if left:
                        self._running[id(p.module)] = left
                    elif p not in done:
                        done.append(p)
                self._placer.release(done)

    def offload_all(self) -> None:
        with self._lock:
            self._placer.offload_all()

    def resident(self) -> List[LoadedModel]:
        """The cached networks that have weights on the compute device now."""
        return [m for m in self.cached() if (p := self._placements.get(id(m.module))) is not None
                and p.device is not None and p.module is m.module]
