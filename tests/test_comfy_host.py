"""The in-ComfyUI code path of nodes/host.py, with small stand-ins for ComfyUI's modules.

CI has no ComfyUI, so these stand-ins mimic the few functions the pack calls (folder_paths,
comfy.model_management, comfy.model_patcher.ModelPatcher, comfy.utils.ProgressBar) closely enough
to check the wiring: our model folder is registered before the first listing, files resolve
through folder_paths, the manager takes ComfyUI's devices, the Cancel check runs at every
progress tick, and our networks live in ComfyUI's list of loaded models: counted, evicted when
its models need room, unloaded by "unload models", partly loaded (blocks streamed) when the room
is short. The stand-in memory manager follows ComfyUI 0.3.x's load_models_gpu / free_memory /
LoadedModel logic in miniature, on a device of ``mm.capacity`` bytes.
"""

import importlib
import os
import sys
import types

import pytest
import torch

from wuerstchen.files.tiny import write_tiny_models


class _Interrupted(Exception):
    pass


def _fake_comfy(models_dir, events):
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(models_dir)
    folder_paths.folder_names_and_paths = {
        "diffusion_models": ([str(models_dir / "unet")], {".safetensors"}),
        "vae": ([str(models_dir / "vae")], {".safetensors"}),
        "text_encoders": ([str(models_dir / "clip")], {".safetensors"}),
        "clip_vision": ([str(models_dir / "clip_vision")], {".safetensors"}),
        "controlnet": ([str(models_dir / "controlnet")], {".safetensors"}),
        "loras": ([str(models_dir / "loras")], {".safetensors"}),
        "checkpoints": ([str(models_dir / "checkpoints")], {".safetensors"}),
        "vae_approx": ([str(models_dir / "vae_approx")], {".safetensors"}),
    }

    def add_model_folder_path(name, path, is_default=False):
        events.append(("add_folder", name))
        folder_paths.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)

    def get_folder_paths(name):
        return list(folder_paths.folder_names_and_paths[name][0])

    def get_filename_list(name):
        out = []
        for d in get_folder_paths(name):
            for root, _dirs, files in os.walk(d):
                out += [os.path.relpath(os.path.join(root, f), d) for f in files]
        return sorted(out)

    folder_paths.add_model_folder_path = add_model_folder_path
    folder_paths.get_folder_paths = get_folder_paths
    folder_paths.get_filename_list = get_filename_list

    mm = types.ModuleType("comfy.model_management")
    _fake_memory_manager(mm, events)

    class VRAMState:
        DISABLED, NO_VRAM, LOW_VRAM, NORMAL_VRAM = range(4)

    mm.VRAMState = VRAMState
    mm.vram_state = VRAMState.DISABLED
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.should_use_bf16 = lambda device=None: False
    mm.interrupt = False

    def throw():
        events.append(("check",))
        if mm.interrupt:
            raise _Interrupted()

    mm.throw_exception_if_processing_interrupted = throw

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            events.append(("progress", value, total, preview is not None))

    utils.ProgressBar = ProgressBar
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = _ModelPatcher
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils, comfy.model_patcher = mm, utils, patcher
    return {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
            "comfy.model_patcher": patcher}


class _ModelPatcher:
    """ComfyUI's ModelPatcher, reduced to what its memory manager uses; for a model of its own it
    loads and unloads the whole module."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.parent = None
        self.loaded = 0
        self.model_size()

    def model_size(self):
        return self.size

    def loaded_size(self):
        return self.loaded

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def model_patches_models(self):
        return []

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        before, self.loaded = self.loaded, self.size
        return self.loaded - before

    def partially_unload(self, device_to, memory_to_free=0):
        return 0

    def detach(self, unpatch_all=True):
        if unpatch_all:
            self.loaded = 0
        return self.model


def _fake_memory_manager(mm, events):
    """load_models_gpu, free_memory, unload_all_models and the loaded-model list, as in ComfyUI."""
    mm.capacity = 1 << 40
    mm.current_loaded_models = []

    class LoadedModel:
        def __init__(self, model):
            self.model, self.device = model, model.load_device

        def model_unload(self, memory_to_free=None):
            if memory_to_free is not None and memory_to_free < self.model.loaded_size():
                if self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
                    return False
            self.model.detach(True)
            return True

    def free_bytes(device):
        return mm.capacity - sum(m.model.loaded_size() for m in mm.current_loaded_models)

    def free_memory(memory_required, device, keep_loaded=()):
        events.append(("free", memory_required))
        unloaded = []
        for entry in list(mm.current_loaded_models)[::-1]:
            if entry in keep_loaded or free_bytes(device) > memory_required:
                continue
            if entry.model_unload(memory_required - free_bytes(device)):
                unloaded.append(entry)
        for entry in unloaded:
            mm.current_loaded_models.remove(entry)
        return unloaded

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        events.append(("load", [type(m.model).__name__ for m in models]))
        entries = []
        for model in models:
            found = [e for e in mm.current_loaded_models if e.model is model]
            entries.append(found[0] if found else LoadedModel(model))
        for entry in entries:
            for other in [e for e in mm.current_loaded_models if entry.model.is_clone(e.model)]:
                mm.current_loaded_models.remove(other)
                other.model.detach(unpatch_all=False)
        needed = sum(e.model.model_size() - e.model.loaded_size() for e in entries)
        free_memory(needed, None)
        for entry in entries:
            room = free_bytes(None) + entry.model.loaded_size()
            budget = 0 if room >= entry.model.model_size() else max(room - entry.model.loaded_size(), 1)
            entry.model.partially_load(entry.device, budget or 1e32)
            mm.current_loaded_models.insert(0, entry)

    mm.free_memory = free_memory
    mm.load_models_gpu = load_models_gpu
    mm.unload_all_models = lambda: free_memory(1e30, None)
    mm.loaded_models = lambda: [e.model for e in mm.current_loaded_models]


@pytest.fixture
def in_comfy(tmp_path, monkeypatch):
    models = tmp_path / "models"
    write_tiny_models(models / "wuerstchen")
    events = []
    for name, module in _fake_comfy(models, events).items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
        monkeypatch.delitem(sys.modules, name)
    nodes = importlib.import_module("nodes")
    yield nodes, events, sys.modules["comfy.model_management"]
    for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
        sys.modules.pop(name)


def test_own_folder_is_registered_before_the_first_listing(in_comfy):
    nodes, events, _mm = in_comfy
    assert nodes.host.IN_COMFYUI
    names = nodes.NODE_CLASS_MAPPINGS["WuerstchenStageCLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert ("add_folder", "wuerstchen") in events
    assert "stage_c_bf16.safetensors" in names and "stage_b.safetensors" not in names


def test_nodes_run_with_comfy_devices_progress_and_cancel(in_comfy):
    nodes, events, mm = in_comfy
    M = nodes.NODE_CLASS_MAPPINGS
    sc, = M["WuerstchenStageCLoader"]().load("stage_c.safetensors")
    clip, = M["WuerstchenCLIPTextLoader"]().load("text_encoder/model.safetensors")
    pv, = M["WuerstchenPreviewerLoader"]().load("previewer.safetensors")
    pos, = M["WuerstchenTextEncode"]().encode(clip, "a cat")
    neg, = M["WuerstchenTextEncode"]().encode(clip, "")
    lc, _ = M["WuerstchenEmptyLatent"]().generate(256, 256, 42.67, 1)
    events.clear()
    out, = M["WuerstchenStageCSampler"]().sample(sc, pos, neg, lc, 0, 3, 4.0, 2.0, "ddpm", 1.0, 0.7, previewer=pv)
    ticks = [e for e in events if e[0] == "progress"]
    assert [t[1] for t in ticks] == [1, 2, 3] and all(t[2] == 3 for t in ticks)
    assert all(t[3] for t in ticks)  # a live preview image with every tick
    assert sum(e[0] == "check" for e in events) >= 3
    mm.interrupt = True
    with pytest.raises(_Interrupted):
        M["WuerstchenStageCSampler"]().sample(sc, pos, neg, lc, 0, 5, 4.0, 2.0, "ddpm", 1.0, 0.7)
    assert out["samples"].shape == (1, 16, 6, 6)


# ------------------------------------------------------------------------------------------------
# Our networks in ComfyUI's memory manager


def _managed(nodes, mm):
    """A fresh pack manager answering to ComfyUI, on a stand-in device that counts its bytes."""
    from wuerstchen.files.management import ModelManager
    from wuerstchen.sampling.streaming import SimulatedDevice

    sim = SimulatedDevice()
    mgr = ModelManager(hooks=nodes.host.ComfyHooks(), transfers=lambda device, offload: sim)
    nodes.host.configure(manager=mgr)
    return mgr, sim


def _stage_c_run(M, sc, clip=None, conds=None):
    if conds is None:
        conds = [M["WuerstchenTextEncode"]().encode(clip, text)[0] for text in ("a cat", "")]
    lc, _ = M["WuerstchenEmptyLatent"]().generate(256, 256, 42.67, 1)
    out, = M["WuerstchenStageCSampler"]().sample(sc, *conds, lc, 0, 2, 4.0, 2.0, "ddpm", 1.0, 0.7)
    return out["samples"]


def _listed(mm):
    return {type(p.model).__name__: p for p in mm.loaded_models()}


def test_our_networks_are_loaded_models_of_comfyui_and_unload_models_frees_them(in_comfy):
    from wuerstchen.sampling.streaming import module_bytes

    nodes, events, mm = in_comfy
    mgr, sim = _managed(nodes, mm)
    M = nodes.NODE_CLASS_MAPPINGS
    sc, = M["WuerstchenStageCLoader"]().load("stage_c.safetensors")
    clip, = M["WuerstchenCLIPTextLoader"]().load("text_encoder/model.safetensors")
    first = _stage_c_run(M, sc, clip)
    listed = _listed(mm)
    assert {"StageC", type(clip.module).__name__} <= set(listed)
    stage_c = listed["StageC"]
    assert stage_c.model is sc.module and stage_c.model_size() == stage_c.loaded_size() == module_bytes(sc.module)
    assert sim.live == sum(p.loaded_size() for p in mm.loaded_models())
    mm.unload_all_models()  # what POST /free {"unload_models": true} runs
    assert mm.current_loaded_models == [] and mgr.resident() == [] and sim.live == 0
    again = _stage_c_run(M, sc, clip)
    assert torch.equal(again, first) and "StageC" in _listed(mm)


def test_comfyui_takes_room_from_our_idle_stage_and_gives_it_back(in_comfy):
    nodes, events, mm = in_comfy
    mgr, sim = _managed(nodes, mm)
    M = nodes.NODE_CLASS_MAPPINGS
    sc, = M["WuerstchenStageCLoader"]().load("stage_c.safetensors")
    clip, = M["WuerstchenCLIPTextLoader"]().load("text_encoder/model.safetensors")
    first = _stage_c_run(M, sc, clip)
    placement = mgr.placement(sc.model)
    mm.capacity = sum(p.loaded_size() for p in mm.loaded_models())  # a full device
    size = mgr.placement(clip.model).total_bytes + 2 * placement.largest_block  # more than the idle CLIP
    theirs = sys.modules["comfy.model_patcher"].ModelPatcher(torch.nn.Linear(1, 1), "cpu", "cpu", size=size)
    mm.load_models_gpu([theirs])  # e.g. an upscaler
    assert theirs.loaded_size() == theirs.size
    assert sum(p.loaded_size() for p in mm.loaded_models()) <= mm.capacity
    assert mgr.placement(clip.model).loaded_bytes == 0
    assert 0 < placement.loaded_bytes < placement.total_bytes and placement.streamed  # partly unloaded
    assert sim.live == placement.loaded_bytes
    again = _stage_c_run(M, sc, clip)  # ours need it back: their idle model goes
    assert torch.equal(again, first) and theirs.loaded_size() == 0


def test_a_stage_larger_than_the_room_streams_with_exact_loras(in_comfy):
    nodes, events, mm = in_comfy
    mgr, sim = _managed(nodes, mm)
    M = nodes.NODE_CLASS_MAPPINGS
    sc, = M["WuerstchenStageCLoader"]().load("stage_c.safetensors")
    clip, = M["WuerstchenCLIPTextLoader"]().load("text_encoder/model.safetensors")
    with_lora, _ = M["WuerstchenLoraLoader"]().load(sc, "wuerstchen_tiny_lora.safetensors", 0.8, 0.0)
    weights = {n: p.detach().clone() for n, p in sc.module.named_parameters()}
    conds = [M["WuerstchenTextEncode"]().encode(clip, text)[0] for text in ("a cat", "")]
    expected = _stage_c_run(M, with_lora, conds=conds)
    plain = _stage_c_run(M, sc, conds=conds)
    mm.unload_all_models()
    placement = mgr.placement(sc.model)
    mm.capacity = placement.trunk_bytes + sum(placement.block_bytes) // 3
    sim.reset_peak()
    got = _stage_c_run(M, with_lora, conds=conds)
    assert placement.streamed and torch.equal(got, expected) and not torch.equal(got, plain)
    assert sim.peak <= mm.capacity + placement.largest_block
    assert all(torch.equal(weights[n], p) for n, p in sc.module.named_parameters())  # LoRA undone exactly


def test_a_running_network_is_not_unloaded_under_it(in_comfy):
    nodes, events, mm = in_comfy
    mgr, sim = _managed(nodes, mm)
    sc, = nodes.NODE_CLASS_MAPPINGS["WuerstchenStageCLoader"]().load("stage_c.safetensors")
    with mgr.running(sc.model):
        mm.unload_all_models()
        assert mgr.placement(sc.model).loaded_bytes == sim.live > 0
    with mgr.running(sc.model):
        assert "StageC" in _listed(mm)
    mm.unload_all_models()
    assert sim.live == 0
