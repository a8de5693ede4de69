"""The whole cascade on tiny random checkpoints in the official layouts, plus the CLI."""

import math
import os

import pytest
import torch

from wuerstchen.pipeline import stages as pipeline
from wuerstchen.pipeline.cascade import Cascade, CascadeFiles, MissingWeightsError, scan_models
from wuerstchen.files.management import ModelManager
from wuerstchen.pipeline.stages import StageBSettings, StageCSettings
from wuerstchen.sampling.samplers import SAMPLERS
from wuerstchen.files.tiny import write_tiny_models

FAST_C = StageCSettings(steps=3)
FAST_B = StageBSettings(steps=2)


@pytest.fixture(scope="module")
def cascade(tiny_dir):
    return Cascade(CascadeFiles.from_dir(tiny_dir), ModelManager(device="cpu"), root=str(tiny_dir))


def test_sizes_follow_the_official_formulas():
    assert pipeline.stage_c_latent_size(1024, 1024) == (24, 24)
    assert pipeline.stage_c_latent_size(1024, 1536) == (24, math.ceil(1536 / 42.67))
    assert pipeline.stage_b_latent_size(1024, 1024) == (256, 256)
    assert pipeline.output_size_from_stage_c(24, 24) == (1024, 1024)
    assert pipeline.output_size_from_stage_c(24, 36) == (1024, 1536)
    with pytest.raises(ValueError, match="too small"):
        pipeline.check_size(32, 1024)


def test_scan_finds_every_part_by_content(tiny_dir):
    found = scan_models(tiny_dir)
    for kind in ("stage_c", "stage_b", "stage_a", "effnet", "previewer", "clip_text", "clip_vision", "controlnet"):
        assert kind in found, kind
    # the single-file ComfyUI checkpoints are found as combined parts too
    combined = [p.name for p, det in found["stage_c"] if det.prefix]
    assert "stable_cascade_stage_c.safetensors" in combined


def test_text_to_image_runs_and_seeds_reproduce(cascade):
    a = cascade.generate("a photo of a cat", width=128, height=96, seed=3, stage_c=FAST_C, stage_b=FAST_B)
    b = cascade.generate("a photo of a cat", width=128, height=96, seed=3, stage_c=FAST_C, stage_b=FAST_B)
    c = cascade.generate("a photo of a cat", width=128, height=96, seed=4, stage_c=FAST_C, stage_b=FAST_B)
    assert a.shape == (1, 3, 96, 128)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batch_and_negative_prompt(cascade):
    out = cascade.generate("a cat", "blurry", width=64, height=64, batch=2, seed=1, stage_c=FAST_C, stage_b=FAST_B)
    assert out.shape == (2, 3, 64, 64)
    assert not torch.equal(out[0], out[1])  # each image gets its own noise


def test_img2img_and_variation(cascade):
    image = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    i2i = cascade.generate("a cat", width=96, height=96, seed=2, image=image, image_mode="img2img",
                           stage_c=StageCSettings(steps=4, denoise=0.5), stage_b=FAST_B)
    var = cascade.generate("a cat", width=96, height=96, seed=2, image=image, image_mode="variation",
                           stage_c=FAST_C, stage_b=FAST_B)
    plain = cascade.generate("a cat", width=96, height=96, seed=2, stage_c=FAST_C, stage_b=FAST_B)
    assert i2i.shape == var.shape == (1, 3, 96, 96)
    assert not torch.equal(var, plain)  # the image tokens change Stage C's conditioning


def test_img2img_keeps_the_input_at_low_denoise(cascade):
    """At tiny denoise the Stage C result is close to the encoded image; at full denoise it is not."""
    eff = cascade.model("effnet")
    sc = cascade.model("stage_c")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    latent = pipeline.encode_semantic(eff.module, image, (2, 2))
    cond = cascade.encode_prompts(["a cat"])
    uncond = cascade.encode_prompts([""])
    low = pipeline.sample_stage_c(sc.module, cond, uncond, init_latent=latent, seed=0,
                                  settings=StageCSettings(steps=20, denoise=0.05))
    assert low.shape == latent.shape
    full = pipeline.sample_stage_c(sc.module, cond, uncond, shape=tuple(latent.shape), seed=0,
                                   settings=StageCSettings(steps=2))
    assert (low - latent).abs().max() < (full - latent).abs().max()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_both_stages(cascade, sampler):
    sc, sb = cascade.model("stage_c"), cascade.model("stage_b")
    cond, uncond = cascade.encode_prompts(["a cat"]), cascade.encode_prompts([""])
    lc = pipeline.sample_stage_c(sc.module, cond, uncond, shape=(1, 16, 2, 3), seed=0,
                                 settings=StageCSettings(steps=3, sampler=sampler))
    lb = pipeline.sample_stage_b(sb.module, lc, cond.clip_text_pooled, uncond.clip_text_pooled, size=(64, 96),
                                 seed=0, settings=StageBSettings(steps=2, sampler=sampler))
    assert torch.isfinite(lc).all() and torch.isfinite(lb).all()
    assert lb.shape == (1, 4, 16, 24)


def test_tiled_decode_matches_shape_and_untiled_when_one_tile(cascade):
    sa = cascade.model("stage_a")
    latent = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(0))
    whole = pipeline.decode_stage_a(sa.module, latent)
    one_tile = pipeline.decode_stage_a(sa.module, latent, tile=64)
    tiled = pipeline.decode_stage_a(sa.module, latent, tile=16, overlap=4)
    assert torch.equal(whole, one_tile)
    assert tiled.shape == whole.shape == (1, 3, 160, 96)
    # away from tile seams (receptive field is small) the tiled result equals the whole decode
    assert torch.allclose(tiled[..., :32, :32], whole[..., :32, :32], atol=1e-5)


def test_missing_weights_message_names_files_and_sources(tmp_path):
    files = CascadeFiles.from_dir(tmp_path)
    with pytest.raises(MissingWeightsError) as err:
        Cascade(files, root=str(tmp_path)).generate("x", width=64, height=64)
    msg = str(err.value)
    for needle in ("stage_c_bf16.safetensors", "stage_b_bf16.safetensors", "stage_a.safetensors",
                   "text_encoder/model.safetensors", "huggingface.co/stabilityai/stable-cascade", str(tmp_path)):
        assert needle in msg


def test_manager_caches_and_guards_fp16(tiny_dir):
    mgr = ModelManager(device="cpu", dtype=torch.float16)
    path = tiny_dir / "stage_c.safetensors"
    a = mgr.load(path, ["stage_c"])
    assert mgr.load(path, ["stage_c"]) is a
    assert a.dtype == torch.float16 and a.module.fp16_guard is True
    b = ModelManager(device="cpu", dtype=torch.float32).load(path, ["stage_c"])
    assert b.module.fp16_guard is False
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    assert mgr.load(path, ["stage_c"]) is not a  # a changed file is loaded again


def test_manager_offloads_the_previous_stage(tiny_dir, monkeypatch):
    """On an accelerator only the running stage stays on it (peak memory = the largest stage)."""
    placed = {}

    def fake_to(self, device, *args, **kwargs):
        placed[id(self)] = torch.device(device)
        return self

    mgr = ModelManager(device="cuda")
    c = mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"], torch.float32)
    b = mgr.load(tiny_dir / "stage_b.safetensors", ["stage_b"], torch.float32)
    monkeypatch.setattr(type(c.module), "to", fake_to)
    monkeypatch.setattr(type(b.module), "to", fake_to)
    freed = []
    monkeypatch.setattr(mgr.hooks, "free_memory", lambda n, d: freed.append(n))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with mgr.running(c):
        assert placed[id(c.module)].type == "cuda"
    with mgr.running(b):
        assert placed[id(b.module)].type == "cuda"
        assert placed[id(c.module)].type == "cpu"
    assert [m.kind for m in mgr.resident()] == ["stage_b"]
    assert freed and freed[0] > 0


def test_manager_offloads_right_after_running_in_low_vram_mode(tiny_dir, monkeypatch):
    placed = {}
    mgr = ModelManager(device="cuda")
    monkeypatch.setattr(mgr.hooks, "keep_resident", lambda: False)
    monkeypatch.setattr(mgr.hooks, "free_memory", lambda n, d: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    c = mgr.load(tiny_dir / "stage_c_lite.safetensors", ["stage_c"], torch.float32)
    monkeypatch.setattr(type(c.module), "to", lambda self, d, *a, **k: placed.__setitem__(id(self), torch.device(d)) or self)
    with mgr.running(c):
        assert placed[id(c.module)].type == "cuda"
    assert placed[id(c.module)].type == "cpu" and mgr.resident() == []


def test_interrupt_hook_stops_generation_within_a_step(tiny_dir):
    from wuerstchen.files.management import ManagerHooks
    from wuerstchen.sampling.samplers import SamplingInterrupted

    class StopAfterTwo(ManagerHooks):
        calls = 0

        def compute_device(self):
            return torch.device("cpu")

        def check_interrupt(self):
            StopAfterTwo.calls += 1
            if StopAfterTwo.calls >= 2:
                raise SamplingInterrupted("cancelled")

    cascade = Cascade(CascadeFiles.from_dir(tiny_dir), ModelManager(hooks=StopAfterTwo()), root=str(tiny_dir))
    with pytest.raises(SamplingInterrupted):
        cascade.generate("a cat", width=64, height=64, stage_c=StageCSettings(steps=10), stage_b=FAST_B)
    assert StopAfterTwo.calls == 2
