"""Placing a network on the compute device whole or in part, streaming the blocks that do not fit.

Why: Stage C 3.6B is 7.2 GB in bf16, and a 6-12 GB card that also holds other models cannot keep
it whole. A :class:`Placement` keeps the network's trunk (everything outside its blocks: the
conditioning mappers, embedding, heads) and as many blocks as a byte budget allows on the device;
every other block is *streamed*: its weights are copied to the device just before the block runs
and dropped right after, while the copy of the next streamed block is already under way (from
pinned host memory on a side stream on CUDA), so transfers overlap compute. At most two streamed
blocks are on the device at once and the resident part is planned to leave room for one of them,
so weight memory peaks at budget + one block. Results are bit-identical to the resident run: the
same tensors take part, only where they live changes.

The blocks and their call order come from the network itself (its ``block_schedule()``); a
network without one is always placed whole. :class:`Transfers` moves tensors between the offload
and the compute device; :class:`SimulatedDevice` is a stand-in compute device in CPU memory that
counts the bytes it holds (tests, CPU runs of the benchmarks).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

log = logging.getLogger(__name__)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += t.numel() * t.element_size()
    return total


@dataclass
class Fetch:
    """Device copies of one block's tensors; ``event`` marks when they are complete (CUDA)."""

    tensors: List[torch.Tensor]
    event: Optional[object] = None


class Transfers:
    """Moves tensors between the offload device (host RAM) and a compute device.

    On CUDA, streamed weights are read from pinned host memory and copied on a side stream, so
    the copy of the next block runs while the current block computes; the compute stream waits
    for a copy only when it needs the block.
    """

    def __init__(self, device: torch.device | str, offload: torch.device | str):
        self.device = torch.device(device)
        self.offload = torch.device(offload)
        self._side = None
        self._finished = None  # CUDA event: the compute stream is done with the last released block

    @property
    def moves(self) -> bool:
        """False when compute and offload device are the same memory (CPU): nothing to place."""
        return self.device != self.offload

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def to_offload(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.offload)

    def load_module(self, module: nn.Module) -> None:
        """Move a whole module to the device."""
        module.to(self.device)

    def unload_module(self, module: nn.Module) -> None:
        """Move a whole module back to the offload device."""
        module.to(self.offload)

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """The host tensor a streamed weight is copied from: pinned on CUDA (asynchronous copies)."""
        if self.device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            try:
                return t.pin_memory()
            except RuntimeError:  # no page-locked memory left: copies from it are merely synchronous
                return t
        return t

    def fetch(self, tensors: Sequence[torch.Tensor]) -> Fetch:
        """Start copying ``tensors`` to the device (asynchronously where the device allows)."""
        if self.device.type != "cuda":
            return Fetch([t.to(self.device) for t in tensors])
        if self._finished is not None:  # see done()
            self._finished.synchronize()
            self._finished = None
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._side):
            copies = [t.to(self.device, non_blocking=True) for t in tensors]
            event = torch.cuda.Event()
            event.record(self._side)
        return Fetch(copies, event)

    def ready(self, fetch: Fetch) -> None:
        """Make the compute stream wait for ``fetch``; its memory is reused only after the compute
        stream's work on it is done (record_stream)."""
        if fetch.event is None:
            return
        main = torch.cuda.current_stream(self.device)
        main.wait_event(fetch.event)
        for t in fetch.tensors:
            t.record_stream(main)

    def done(self, fetch: Fetch) -> None:
        """The compute stream has queued its last use of ``fetch``. The next fetch first waits until
        the device has run that far, so the copy can reuse the released memory: the host queues
        work far ahead of the device, and without this wait every block would be queued for copy,
        and held, at once."""
        if fetch.event is None:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._finished = event


class SimulatedDevice(Transfers):
    """A stand-in compute device in CPU memory that counts the bytes it holds.

    Every tensor put "on the device" is a fresh copy whose storage is watched: the count drops
    when the storage is freed, not when the code says it released it, so a schedule that keeps a
    reference to a block it should have dropped shows up in :attr:`live` and :attr:`peak`.
    """

    moves = True

    def __init__(self):
        super().__init__("cpu", "cpu")
        self.live = 0
        self.peak = 0

    def _hold(self, t: torch.Tensor) -> torch.Tensor:
        copy = t.clone()
        storage = copy.untyped_storage()
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, n)
        return copy

    def _freed(self, n: int) -> None:
        self.live -= n

    def reset_peak(self) -> None:
        self.peak = self.live

    def to_device(self, t):
        return self._hold(t)

    def to_offload(self, t):
        return t.clone()

    def host_copy(self, t):
        return t

    def load_module(self, module):
        for slot in _slots(module, set()):
            slot.set(self._hold(slot.get()))

    def unload_module(self, module):
        for slot in _slots(module, set()):
            slot.set(slot.get().clone())

    def fetch(self, tensors):
        return Fetch([self._hold(t) for t in tensors])


@dataclass(frozen=True)
class _Slot:
    """One parameter or buffer of a module, by owner and name (so it can be swapped)."""

    owner: nn.Module
    name: str
    is_param: bool

    def get(self) -> torch.Tensor:
        t = self.owner._parameters[self.name] if self.is_param else self.owner._buffers[self.name]
        return t.data if self.is_param else t

    def set(self, value: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = value
        else:
            self.owner._buffers[self.name] = value


def _slots(root: nn.Module, skip: Set[int]) -> List[_Slot]:
    """Every parameter and buffer under ``root``, not descending into modules whose id is in ``skip``."""
    out, stack, seen = [], [root], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out += [_Slot(m, n, True) for n, p in m._parameters.items() if p is not None]
        out += [_Slot(m, n, False) for n, b in m._buffers.items() if b is not None]
        stack += [c for c in m._modules.values() if c is not None and id(c) not in skip]
    return out


@dataclass
class _Active:
    """A streamed block whose weights are on the device (prefetched, or swapped into the block)."""

    fetch: Fetch
    hosts: Optional[List[torch.Tensor]] = None  # the host tensors while swapped in


@dataclass(eq=False, repr=False)
class Placement:
    """Where one network's weights are: on the offload device, or placed on a compute device whole
    or with some blocks streamed. One per cached network (see the model manager).

    ``transfers_for(device)`` gives the :class:`Transfers` for a compute device.
    """

    module: nn.Module
    offload: torch.device
    transfers_for: Callable[[torch.device], Transfers]
    device: Optional[torch.device] = field(default=None, init=False)  # where it is placed; None: offload only
    streamed: Set[int] = field(default_factory=set, init=False)  # indices into blocks

    def __post_init__(self):
        schedule = getattr(self.module, "block_schedule", None)
        self.schedule: List[nn.Module] = list(schedule()) if callable(schedule) else []
        index: Dict[int, int] = {}
        self.blocks: List[nn.Module] = []
        for block in self.schedule:
            if id(block) not in index:
                index[id(block)] = len(self.blocks)
                self.blocks.append(block)
        self._order = [index[id(b)] for b in self.schedule]
        self._block_slots = [_slots(b, set()) for b in self.blocks]
        self._trunk_slots = _slots(self.module, set(index))
        self.block_bytes = [module_bytes(b) for b in self.blocks]
        self.total_bytes = module_bytes(self.module)
        self.trunk_bytes = self.total_bytes - sum(self.block_bytes)
        self.transfers: Optional[Transfers] = None
        self._hooks: list = []
        self._active: Dict[int, _Active] = {}
        self._pos = -1

    def __repr__(self) -> str:
        where = "offload" if self.device is None else str(self.device)
        return (f"Placement({type(self.module).__name__} on {where}: {self.loaded_bytes} of {self.total_bytes} "
                f"bytes, {len(self.streamed)} of {len(self.blocks)} blocks streamed)")

    # -- what is where -------------------------------------------------------------------------
    @property
    def streamable(self) -> bool:
        return bool(self.blocks)

    @property
    def loaded_bytes(self) -> int:
        """Bytes kept on the compute device (streamed blocks only pass through)."""
        if self.device is None:
            return 0
        return self.total_bytes - sum(self.block_bytes[i] for i in self.streamed)

    @property
    def largest_block(self) -> int:
        return max(self.block_bytes, default=0)

    def plan(self, budget: Optional[int]) -> Set[int]:
        """The blocks to stream so that the resident part plus one block in flight fits ``budget``
        (None: no limit). The trunk always stays; blocks are kept in call order while they fit."""
        if budget is None or budget >= self.total_bytes or not self.blocks:
            return set()
        room = budget - self.trunk_bytes - self.largest_block
        streamed = set()
        for i, size in enumerate(self.block_bytes):
            if size <= room:
                room -= size
            else:
                streamed.add(i)
        return streamed

    # -- placing -------------------------------------------------------------------------------
    def load(self, device: torch.device | str, budget: Optional[int] = None) -> int:
        """Place on ``device`` within ``budget`` bytes (None: whole); returns the bytes placed."""
        device = torch.device(device)
        if self.device is not None and self.device != device:
            self.unload()
        streamed = self.plan(budget)
        if self.device is not None and streamed == self.streamed:
            return self.loaded_bytes
        self._remove_hooks()
        transfers = self.transfers_for(device)
        if self.device is None:
            if not streamed:
                transfers.load_module(self.module)
            else:
                for slot in self._trunk_slots:
                    slot.set(transfers.to_device(slot.get()))
                for i in range(len(self.blocks)):
                    self._move_block(i, transfers, to_device=i not in streamed)
        else:
            for i in self.streamed - streamed:
                self._move_block(i, transfers, to_device=True)
            for i in streamed - self.streamed:
                self._move_block(i, transfers, to_device=False)
        self.device, self.transfers, self.streamed = device, transfers, streamed
        if streamed:
            self._install_hooks()
            log.info("%s: %d of %d blocks stream to %s (%.0f of %.0f MB resident, budget %.0f MB)",
                     type(self.module).__name__, len(streamed), len(self.blocks), device,
                     self.loaded_bytes / 2**20, self.total_bytes / 2**20, budget / 2**20)
        return self.loaded_bytes

    def unload(self, nbytes: Optional[int] = None) -> int:
        """Free at least ``nbytes`` on the device by streaming more blocks, or nothing if the blocks
        do not hold that much (returns 0); None: move everything back to the offload device.
        Returns the bytes freed."""
        if self.device is None:
            return 0
        before = self.loaded_bytes
        if nbytes is not None:
            streamed, freed = set(self.streamed), 0
            for i in reversed(range(len(self.blocks))):
                if freed >= nbytes:
                    break
                if i not in streamed:
                    streamed.add(i)
                    freed += self.block_bytes[i]
            if freed < nbytes:
                return 0
            self._remove_hooks()
            for i in streamed - self.streamed:
                self._move_block(i, self.transfers, to_device=False)
            self.streamed = streamed
            self._install_hooks()
            return before - self.loaded_bytes
        self._remove_hooks()
        self.transfers.unload_module(self.module)
        self.device, self.transfers, self.streamed = None, None, set()
        return before

    def _move_block(self, i: int, transfers: Transfers, to_device: bool) -> None:
        move = transfers.to_device if to_device else (lambda t: transfers.host_copy(transfers.to_offload(t)))
        for slot in self._block_slots[i]:
            slot.set(move(slot.get()))

    # -- streaming during a forward ------------------------------------------------------------
    def _install_hooks(self) -> None:
        m = self.module
        self._hooks = [m.register_forward_pre_hook(self._forward_starts),
                       m.register_forward_hook(self._forward_ends, always_call=True)]
        for i in sorted(self.streamed):
            block = self.blocks[i]
            self._hooks.append(block.register_forward_pre_hook(lambda mod, args, i=i: self._block_starts(i)))
            self._hooks.append(block.register_forward_hook(lambda mod, args, out, i=i: self._block_ends(i),
                                                           always_call=True))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._release_all()

    def _forward_starts(self, module, args) -> None:
        self._release_all()
        self._pos = -1
        self._prefetch_after(-1, current=None)

    def _forward_ends(self, module, args, output) -> None:
        self._release_all()
        self._pos = -1

    def _block_starts(self, i: int) -> None:
        self._pos = self._find(i, self._pos + 1)
        active = self._active.get(i)
        if active is None:
            active = self._active[i] = _Active(self.transfers.fetch([s.get() for s in self._block_slots[i]]))
        if active.hosts is None:
            self.transfers.ready(active.fetch)
            active.hosts = [s.get() for s in self._block_slots[i]]
            for slot, t in zip(self._block_slots[i], active.fetch.tensors):
                slot.set(t)
        self._prefetch_after(self._pos, current=i)

    def _block_ends(self, i: int) -> None:
        following = self._order[self._pos + 1] if 0 <= self._pos < len(self._order) - 1 else None
        if following != i:  # a block that runs again right away keeps its weights
            self._release(i)

    def _find(self, i: int, start: int) -> int:
        """Position of block ``i``'s call in the schedule, at ``start`` or later (else anywhere)."""
        for pos in range(max(start, 0), len(self._order)):
            if self._order[pos] == i:
                return pos
        return self._order.index(i)

    def _prefetch_after(self, pos: int, current: Optional[int]) -> None:
        """Start the copy of the next streamed block after ``pos``, dropping any other prefetch."""
        target = next((j for j in self._order[pos + 1:] if j in self.streamed and j != current), None)
        for j in [j for j in self._active if j not in (current, target)]:
            self._release(j)
        if target is not None and target not in self._active:
            self._active[target] = _Active(self.transfers.fetch([s.get() for s in self._block_slots[target]]))

    def _release(self, i: int) -> None:
        active = self._active.pop(i, None)
        if active is not None and active.hosts is not None:
            for slot, host in zip(self._block_slots[i], active.hosts):
                slot.set(host)
            self.transfers.done(active.fetch)

    def _release_all(self) -> None:
        for i in list(self._active):
            self._release(i)
