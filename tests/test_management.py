"""The model manager's cache: one module per file and dtype, whoever asks, bounded by a RAM budget."""

import pytest
import torch

from wuerstchen.files import tiny
from wuerstchen.files.checkpoints import CheckpointError
from wuerstchen.files.management import ModelManager, module_bytes


def test_one_file_one_dtype_is_one_module_whatever_kinds_are_asked(tiny_dir):
    mgr = ModelManager(cache_budget=None)
    bundle = tiny_dir / "stable_cascade_stage_c.safetensors"
    alone = mgr.load(bundle, ["stage_c"], torch.float32)
    every = mgr.load_parts(bundle, None, torch.float32)
    assert every["stage_c"] is alone
    assert set(every) == {"stage_c", "effnet", "previewer", "clip_text", "clip_vision"}
    assert mgr.load_parts(bundle, ["previewer", "stage_b"], torch.float32) == {"previewer": every["previewer"]}
    assert len(mgr.cached()) == 5


def test_asking_a_file_for_a_kind_it_lacks_names_what_it_holds(tiny_dir):
    mgr = ModelManager(cache_budget=None)
    mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"], torch.float32)
    with pytest.raises(CheckpointError, match="expected Stage B.*looks like Stage C"):
        mgr.load(tiny_dir / "stage_c.safetensors", ["stage_b"], torch.float32)
    assert [m.kind for m in mgr.cached()] == ["stage_c"]


def test_cache_budget_drops_the_least_recently_used_file(tiny_dir):
    probe = ModelManager(cache_budget=None)
    sizes = {name: module_bytes(probe.load(tiny_dir / name, ["stage_c"], torch.float32).module)
             for name in ("stage_c.safetensors", "stage_c_lite.safetensors")}
    budget = sizes["stage_c.safetensors"] + sizes["stage_c_lite.safetensors"] + 1
    mgr = ModelManager(cache_budget=budget)
    full = mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"], torch.float32)
    lite = mgr.load(tiny_dir / "stage_c_lite.safetensors", ["stage_c"], torch.float32)
    assert mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"], torch.float32) is full  # full is now the newest
    # A third model (the same file in bfloat16 counts as another copy) pushes out the oldest: lite.
    mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"], torch.bfloat16)
    kept = {(m.path.name, m.dtype) for m in mgr.cached()}
    assert ("stage_c_lite.safetensors", torch.float32) not in kept
    assert ("stage_c.safetensors", torch.float32) in kept and ("stage_c.safetensors", torch.bfloat16) in kept
    assert sum(module_bytes(m.module) for m in mgr.cached()) <= budget
    assert mgr.load(tiny_dir / "stage_c_lite.safetensors", ["stage_c"], torch.float32) is not lite  # read again


def test_cache_budget_never_drops_a_running_model(tiny_dir):
    mgr = ModelManager(cache_budget=1, device="cpu")
    running = mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"], torch.float32)
    with mgr.running(running):
        mgr.load(tiny_dir / "stage_b.safetensors", ["stage_b"], torch.float32)
        assert running in mgr.cached()
    mgr.load(tiny_dir / "stage_c_lite.safetensors", ["stage_c"], torch.float32)
    assert running not in mgr.cached()  # once it has run, it may go


def test_a_changed_file_replaces_its_stale_entry(tiny_dir, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((tiny_dir / "previewer.safetensors").read_bytes())
    mgr = ModelManager(cache_budget=None)
    first = mgr.load(path, ["previewer"], torch.float32)
    path.write_bytes((tiny_dir / "stage_a.safetensors").read_bytes())
    assert mgr.load(path, ["stage_a"], torch.float32).kind == "stage_a"
    assert first not in mgr.cached()
