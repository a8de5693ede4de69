"""Our networks inside ComfyUI's memory manager: one ModelPatcher per cached network.

ComfyUI keeps a list of loaded models (``comfy.model_management``): it counts their size when it
decides what fits, unloads idle ones (whole, or partly) when its own models need the room, and
empties the list on "unload models" (``POST /free``) and after an out-of-memory error. Each of
our networks joins that list as a :class:`NetworkPatcher` whose loading and unloading go to the
network's :class:`~wuerstchen.sampling.streaming.Placement`: the room ComfyUI grants a model that does not
fit becomes the room of its resident blocks (the others stream), and "free this many bytes"
streams more blocks. ComfyUI never patches our weights (our LoRAs are applied at run time by our
own code), so these patchers carry no patches. Imported only inside ComfyUI.
"""

from __future__ import annotations

from typing import Callable, Dict

import comfy.model_management as comfy_mm
from comfy.model_patcher import ModelPatcher
from torch import nn

from wuerstchen.files.management import ModelManager, Placer
from wuerstchen.sampling.streaming import Placement

#: What ComfyUI asks for when a model may load whole.
_WHOLE = 1e30


class NetworkPatcher(ModelPatcher):
    """A ModelPatcher whose weights are placed by our :class:`Placement`.

    ComfyUI's figure for a partial load is the weights' budget: the resident part leaves room in
    it for one streamed block, so the weights peak at that figure plus one block (the second block
    in flight), which the memory ComfyUI keeps free for inference absorbs. A network that is
    running is never unloaded under it (``is_running``).
    """

    def __init__(self, placement: Placement, load_device, is_running: Callable[[nn.Module], bool]):
        self.placement = placement
        self._is_running = is_running
        super().__init__(placement.module, load_device, placement.offload, size=placement.total_bytes)

    def clone(self):
        return self  # one patcher per network: a second one would be a second owner of its weights

    def model_size(self):
        return self.placement.total_bytes

    def loaded_size(self):
        return self.placement.loaded_bytes

    def current_loaded_device(self):
        return self.placement.device or self.offload_device

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        before = self.placement.loaded_bytes
        room = before + extra_memory
        budget = None if room >= self.placement.total_bytes else int(room)
        self.placement.load(device_to, budget)
        return self.placement.loaded_bytes - before

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        if device_to is not None:
            self.partially_load(device_to, _WHOLE if full_load or not lowvram_model_memory else lowvram_model_memory)

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        if load_weights and device_to is not None:
            self.load(device_to, lowvram_model_memory)
        return self.model

    def partially_unload(self, device_to, memory_to_free=0):
        if self._is_running(self.model):
            return 0
        return self.placement.unload(int(memory_to_free))

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights and device_to is not None and not self._is_running(self.model):
            self.placement.unload()

    def detach(self, unpatch_all=True):
        if unpatch_all and not self._is_running(self.model):
            self.placement.unload()
        return self.model


class ComfyPlacer(Placer):
    """Placement by ComfyUI: ``load_models_gpu`` puts our networks on the device next to (and in
    competition with) its own; they stay there until ComfyUI needs the room or is told to free it."""

    def __init__(self, manager: ModelManager):
        self.manager = manager
        self._patchers: Dict[int, NetworkPatcher] = {}  # id(placement) -> its patcher (ComfyUI holds weak refs)

    def patcher(self, placement: Placement, device) -> NetworkPatcher:
        patcher = self._patchers.get(id(placement))
        if patcher is None or patcher.placement is not placement or patcher.load_device != device:
            patcher = self._patchers[id(placement)] = NetworkPatcher(placement, device, self.manager.is_running)
        return patcher

    def acquire(self, placements, device):
        comfy_mm.load_models_gpu([self.patcher(p, device) for p in placements])

    def forget(self, placement):
        patcher = self._patchers.pop(id(placement), None)
        if patcher is not None:
            _unlist(patcher)
        placement.unload()

    def offload_all(self):
        for patcher in self._patchers.values():
            _unlist(patcher)
            patcher.placement.unload()


def _unlist(patcher: NetworkPatcher) -> None:
    """Take ``patcher`` out of ComfyUI's loaded models (as ComfyUI does when it unloads one)."""
    loaded = getattr(comfy_mm, "current_loaded_models", [])
    for entry in [e for e in loaded if e.model is patcher]:
        entry.model_unload()
        loaded.remove(entry)
