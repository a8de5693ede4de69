"""Block streaming: the schedule keeps weight memory within budget + one block, leaks no block,
and gives results bit-identical to the resident run (also through the manager, with LoRAs).

The compute device is a stand-in in CPU memory (streaming.SimulatedDevice) that counts the bytes
of every tensor put on it until its storage is really freed, so a schedule that kept a reference
to a block it should have dropped shows up in the count.
"""

import pytest
import torch

from conftest import load_parity
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.files import tiny
from wuerstchen.lora import apply_loras, load_lora
from wuerstchen.files.tiny import write_tiny_lora
from wuerstchen.files.management import ModelManager
from wuerstchen.models.stage_c import StageC
from wuerstchen.sampling.streaming import Placement, SimulatedDevice, Transfers


def _parity_model(name):
    meta, weights, io = load_parity(name)
    model = StageC(**meta["config"])
    model.load_state_dict(weights, strict=True)
    model = model.float().eval().requires_grad_(False)
    call = meta["calls"][0]
    kwargs = {a["name"]: io[a["key"]] for a in call["args"] if "key" in a}
    return model, kwargs


def _budget_streaming_half(placement):
    return placement.trunk_bytes + sum(placement.block_bytes) // 2


class _Watch:
    """Checks the stand-in device's bytes right after each block's streaming hook has run."""

    def __init__(self, placement, sim, limit):
        self.sim, self.limit, self.seen, self.calls = sim, limit, [], 0
        self.handles = [b.register_forward_pre_hook(self._check) for b in placement.blocks]

    def _check(self, module, args):
        self.calls += 1
        self.seen.append(self.sim.live)
        assert self.sim.live <= self.limit, f"{self.sim.live} bytes on the device, limit {self.limit}"

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("name", ["stage_c", "stage_c_switch"])  # the second repeats its levels' blocks
def test_streamed_forward_is_identical_within_budget_and_leaks_nothing(name):
    model, kwargs = _parity_model(name)
    with torch.no_grad():
        expected = model(**kwargs)
    sim = SimulatedDevice()
    placement = Placement(model, torch.device("cpu"), lambda device: sim)
    budget = _budget_streaming_half(placement)
    placed = placement.load("cpu", budget)
    assert placement.streamed and placed == placement.loaded_bytes < placement.total_bytes
    assert sim.live == placed <= budget - placement.largest_block  # room left for one block in flight
    watch = _Watch(placement, sim, budget + placement.largest_block)
    with torch.no_grad():
        got = model(**kwargs)
        again = model(**kwargs)
    watch.remove()
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert watch.calls == 2 * len(placement.schedule)
    assert max(watch.seen) > placed  # blocks did pass through the device
    assert sim.peak <= budget + placement.largest_block
    assert sim.live == placed  # every streamed block was freed after the forward
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert placement.unload() == placed and sim.live == 0


def test_the_watch_catches_a_schedule_that_keeps_a_block():
    """The checks above are not vacuous: a schedule that keeps streamed copies alive fails them."""
    model, kwargs = _parity_model("stage_c")
    sim = SimulatedDevice()
    placement = Placement(model, torch.device("cpu"), lambda device: sim)
    placement.load("cpu", _budget_streaming_half(placement))
    kept = []
    release = placement._release
    placement._release = lambda i: (kept.append(placement._active.get(i)), release(i))
    with torch.no_grad():
        model(**kwargs)
    assert sim.live > placement.loaded_bytes
    assert sim.peak > _budget_streaming_half(placement) + placement.largest_block


def test_an_interrupted_forward_puts_every_host_weight_back():
    model, kwargs = _parity_model("stage_c")
    before = {n: p.data for n, p in model.named_parameters()}
    sim = SimulatedDevice()
    placement = Placement(model, torch.device("cpu"), lambda device: sim)
    placement.load("cpu", _budget_streaming_half(placement))
    hosts = {n: p.data_ptr() for n, p in model.named_parameters()}
    third = placement.blocks[sorted(placement.streamed)[1]]

    class Cancelled(Exception):  # as ComfyUI's InterruptProcessingException
        pass

    def cancel(module, args):
        raise Cancelled

    handle = third.register_forward_pre_hook(cancel)
    with pytest.raises(Cancelled), torch.no_grad():
        model(**kwargs)
    handle.remove()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == hosts
    assert sim.live == placement.loaded_bytes
    placement.unload()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_partial_unload_streams_more_blocks_then_reloads():
    """ComfyUI's partially_unload / partially_load: free some bytes by streaming, get them back."""
    model, kwargs = _parity_model("stage_c")
    with torch.no_grad():
        expected = model(**kwargs)
    sim = SimulatedDevice()
    placement = Placement(model, torch.device("cpu"), lambda device: sim)
    assert placement.load("cpu") == placement.total_bytes == sim.live and not placement.streamed
    want = placement.largest_block + 1
    freed = placement.unload(want)
    assert freed >= want and sim.live == placement.loaded_bytes == placement.total_bytes - freed
    with torch.no_grad():
        assert torch.equal(model(**kwargs), expected)
    assert placement.load("cpu") == placement.total_bytes and not placement.streamed
    with torch.no_grad():
        assert torch.equal(model(**kwargs), expected)
    # More than the blocks hold: nothing changes (the caller unloads it whole instead).
    assert placement.unload(placement.total_bytes) == 0 and sim.live == placement.total_bytes
    assert placement.unload() == placement.total_bytes and placement.device is None and sim.live == 0


def test_plain_transfers_stream_too():
    """The default Transfers (here CPU to CPU, as ComfyUI on CPU uses them) run the same schedule."""
    model, kwargs = _parity_model("stage_c")
    with torch.no_grad():
        expected = model(**kwargs)
    placement = Placement(model, torch.device("cpu"), lambda device: Transfers(device, "cpu"))
    placement.load("cpu", _budget_streaming_half(placement))
    assert placement.streamed
    with torch.no_grad():
        assert torch.equal(model(**kwargs), expected)
    assert placement.unload() > 0 and not placement._hooks


def test_a_network_without_blocks_is_placed_whole():
    sim = SimulatedDevice()
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    placement = Placement(net, torch.device("cpu"), lambda device: sim)
    assert not placement.streamable
    assert placement.load("cpu", budget=1) == placement.total_bytes == sim.live


# ----------------------------------------------------------------------------------------------
# Through the model manager


def _sample(mgr, model, cond, uncond):
    with mgr.running(model), torch.no_grad():
        return pipeline.sample_stage_c(model.module, cond, uncond, shape=(1, 16, 6, 6), seed=3,
                                       settings=pipeline.StageCSettings(steps=2))


def _conditioning(dim):
    g = torch.Generator().manual_seed(0)
    cond = pipeline.Conditioning(torch.randn(1, 5, dim, generator=g), torch.randn(1, 1, dim, generator=g))
    uncond = pipeline.Conditioning(torch.zeros(1, 5, dim), torch.zeros(1, 1, dim))
    return cond, uncond


def test_manager_streams_a_stage_larger_than_its_memory_budget(tiny_dir):
    plain = ModelManager(device="cpu", dtype=torch.float32)
    ref_model = plain.load(tiny_dir / "stage_c.safetensors", ["stage_c"])
    cond, uncond = _conditioning(ref_model.config["c_clip_text"])
    expected = _sample(plain, ref_model, cond, uncond)

    sim = SimulatedDevice()
    probe = Placement(ref_model.module, torch.device("cpu"), lambda d: sim)
    budget = probe.trunk_bytes + sum(probe.block_bytes) // 3
    mgr = ModelManager(device="cpu", dtype=torch.float32, memory_budget=budget, transfers=lambda d, o: sim)
    sc = mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"])
    got = _sample(mgr, sc, cond, uncond)
    placement = mgr.placement(sc)
    assert placement.streamed and torch.equal(got, expected)
    assert sim.peak <= budget + placement.largest_block
    assert [m.kind for m in mgr.resident()] == ["stage_c"] and sim.live == placement.loaded_bytes
    # The next stage needs the room: Stage C leaves the device first.
    sb = mgr.load(tiny_dir / "stage_b.safetensors", ["stage_b"])
    with mgr.running(sb):
        assert placement.device is None and mgr.placement(sb).device is not None
        assert sim.live == mgr.placement(sb).loaded_bytes <= budget
    mgr.offload_all()
    assert sim.live == 0 and mgr.resident() == []


def test_a_lora_on_a_streamed_stage_is_exact_and_unpatches_cleanly(tiny_dir, tmp_path):
    plain = ModelManager(device="cpu", dtype=torch.float32)
    ref_model = plain.load(tiny_dir / "stage_c.safetensors", ["stage_c"])
    cond, uncond = _conditioning(ref_model.config["c_clip_text"])
    write_tiny_lora(tmp_path / "l.safetensors", "kohya", ref_model.module, seed=5)
    lora = load_lora(tmp_path / "l.safetensors")
    with apply_loras(ref_model.module, [(lora, 0.8)]):
        expected = _sample(plain, ref_model, cond, uncond)

    sim = SimulatedDevice()
    mgr = ModelManager(device="cpu", dtype=torch.float32, memory_budget=1, transfers=lambda d, o: sim)
    sc = mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"])
    original = {n: p.detach().clone() for n, p in sc.module.named_parameters()}
    with mgr.running(sc), torch.no_grad():
        assert len(mgr.placement(sc).streamed) == len(mgr.placement(sc).blocks)  # budget below one block
        with apply_loras(sc.module, [(lora, 0.8)]) as patch:
            assert patch.patched
            got = pipeline.sample_stage_c(sc.module, cond, uncond, shape=(1, 16, 6, 6), seed=3,
                                          settings=pipeline.StageCSettings(steps=2))
    assert torch.equal(got, expected)
    mgr.offload_all()
    assert all(torch.equal(original[n], p) for n, p in sc.module.named_parameters())


def test_cli_vram_budget_and_fp8_reach_the_manager(tiny_dir, tmp_path, monkeypatch):
    from wuerstchen import cli
    from wuerstchen.files import management

    made = []

    class Recording(management.ModelManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(management, "ModelManager", Recording)
    out = tmp_path / "img.png"
    rc = cli.main(["generate", "--prompt", "a cat", "--models", str(tiny_dir), "--out", str(out), "--width", "64",
                   "--height", "64", "--c-steps", "1", "--b-steps", "1", "--vram-budget", "0.5",
                   "--dtype", "fp8_e4m3fn"])
    assert rc == 0 and out.exists()
    (mgr,) = made
    assert mgr.memory_budget == 1 << 29 and mgr.preferred_dtype == torch.float8_e4m3fn
    assert {m.kind: m.dtype for m in mgr.cached()}["stage_c"] == torch.float8_e4m3fn
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "x", "--models", str(tiny_dir), "--out", str(out), "--vram-budget", "-1"])


def test_a_nested_run_never_evicts_the_outer_running_stage(tiny_dir):
    sim = SimulatedDevice()
    mgr = ModelManager(device="cpu", dtype=torch.float32, transfers=lambda d, o: sim)  # one running set at a time
    sc = mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"])
    sb = mgr.load(tiny_dir / "stage_b.safetensors", ["stage_b"])
    with mgr.running(sc):
        with mgr.running(sb):
            assert mgr.placement(sc).device is not None and mgr.placement(sb).device is not None
    with mgr.running(sb):  # sc is idle now: it goes
        assert mgr.placement(sc).device is None
    assert sim.live == mgr.placement(sb).loaded_bytes


def test_the_schedule_lets_the_device_finish_a_block_before_copying_the_one_after_next():
    """On CUDA the host runs ahead of the device; Transfers.fetch waits for the block released last
    (Transfers.done), which bounds what is queued. Here: every used block is made ready before it
    runs and marked done after, and when a copy starts at most one used block is not yet done."""
    model, kwargs = _parity_model("stage_c_switch")
    calls = []

    class Recording(SimulatedDevice):
        def fetch(self, tensors):
            fetch = super().fetch(tensors)
            fetch.serial = len(calls)
            calls.append(("fetch", fetch.serial))
            return fetch

        def ready(self, fetch):
            calls.append(("ready", fetch.serial))

        def done(self, fetch):
            calls.append(("done", fetch.serial))

    sim = Recording()
    placement = Placement(model, torch.device("cpu"), lambda device: sim)
    placement.load("cpu", _budget_streaming_half(placement))
    with torch.no_grad():
        model(**kwargs)
        model(**kwargs)
    readied, finished = [], []
    for what, fid in calls:
        if what == "fetch":
            assert len(set(readied) - set(finished)) <= 1
        (readied if what == "ready" else finished if what == "done" else []).append(fid)
    assert sorted(readied) == sorted(finished) and len(set(readied)) == len(readied)
    assert len(readied) >= 2 * len(placement.streamed)  # each streamed block, in each of the two forwards


@pytest.mark.parametrize("name", ["v2_prior", "v2_decoder"])
def test_wuerstchen_v2_networks_stream_their_blocks_bit_identically(name):
    """The v2 prior and decoder list their blocks in call order (their own schedule, not Stable Cascade's)."""
    from conftest import load_v2
    from wuerstchen.models import WuerstchenDiffNeXt, WuerstchenPrior

    meta, weights, io = load_v2(name)
    model = {"v2_prior": WuerstchenPrior, "v2_decoder": WuerstchenDiffNeXt}[name](**meta["config"])
    model.load_state_dict(weights, strict=True)
    model = model.eval().requires_grad_(False)
    call = meta["calls"][0]
    kwargs = {a["name"]: io[a["key"]] for a in call["args"] if "key" in a}
    with torch.no_grad():
        expected = model(**kwargs)
    sim = SimulatedDevice()
    placement = Placement(model, torch.device("cpu"), lambda device: sim)
    calls = [0]
    handles = [b.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)) for b in placement.blocks]
    assert len(placement.schedule) == len(set(map(id, placement.schedule)))  # each block once
    budget = _budget_streaming_half(placement)
    placement.load("cpu", budget)
    assert placement.streamed
    with torch.no_grad():
        got = model(**kwargs)
    for h in handles:
        h.remove()
    assert torch.equal(got, expected) and calls[0] == len(placement.schedule)
    assert placement.unload() > 0 and sim.live == 0
