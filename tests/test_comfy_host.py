"""The in-ComfyUI code path of nodes/host.py, with small stand-ins for ComfyUI's modules.

CI has no ComfyUI, so these stand-ins mimic the few functions the pack calls (folder_paths,
comfy.model_management, comfy.utils.ProgressBar) closely enough to check the wiring: our model
folder is registered before the first listing, files resolve through folder_paths, the manager
takes ComfyUI's devices and memory freeing, and the Cancel check runs at every progress tick.
"""

import importlib
import os
import sys
import types

import pytest
import torch

from wuerstchen.tiny import write_tiny_models


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

    class VRAMState:
        DISABLED, NO_VRAM, LOW_VRAM, NORMAL_VRAM = range(4)

    mm.VRAMState = VRAMState
    mm.vram_state = VRAMState.DISABLED
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.free_memory = lambda n, device: events.append(("free", n))
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
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils
    return {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils}


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
