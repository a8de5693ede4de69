"""Würstchen v2 schedule and sampler against the hub (DDPMWuerstchenScheduler) and original (Diffuzz) trajectories."""

import pytest
import torch

from conftest import load_v2, load_v2_file, recorded_seed
from wuerstchen.models import WuerstchenDiffNeXt, WuerstchenPrior
from wuerstchen.sampling.samplers import noise_to_v2, sample_v2
from wuerstchen.sampling.schedule_v2 import (ORIGINAL_PRIOR_SEGMENTS, alpha_cumprod, check_timesteps, default_prior_timesteps,
                                    segmented_timesteps, uniform_timesteps)

VECTORS = ["v2_sampling_prior", "v2_sampling_decoder", "v2_sampling_decoder_cfg", "v2_sampling_prior_diffuzz"]


def rel_err(ours, ref):
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def guidance(meta):
    call = meta.get("call", {})
    return meta.get("cfg", call.get("prior_guidance_scale", call.get("guidance_scale")))


def conditioning(io):
    cond = {k[len("cond."):]: v for k, v in io.items() if k.startswith("cond.")}
    uncond = {k[len("uncond."):]: v for k, v in io.items() if k.startswith("uncond.")}
    if not cond:  # the unguided decoder run stores its inputs at the top level
        cond = {"effnet": io["effnet"], "clip": io["clip"]}
    return cond, uncond or None


def model_for(meta):
    model_meta, _, _ = load_v2(meta["model_json"][: -len(".json")])
    cls = WuerstchenPrior if model_meta["module"] == "WuerstchenPrior" else WuerstchenDiffNeXt
    model = cls(**model_meta["config"])
    model.load_state_dict(load_v2_file(meta["model_weights"].split()[0]), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Schedule


def test_grids_are_the_recorded_ones():
    prior, _, _ = load_v2("v2_sampling_prior")
    assert prior["call"]["prior_timesteps"] == "DEFAULT_STAGE_C_TIMESTEPS"
    diffuzz, _, _ = load_v2("v2_sampling_prior_diffuzz")
    segments = [(s["t_start"], s["t_end"], s["timesteps"]) for s in diffuzz["segments"]]
    expected = {
        "v2_sampling_prior": (default_prior_timesteps(), 29),
        "v2_sampling_prior_diffuzz": (segmented_timesteps(segments), sum(s[2] for s in segments)),
    }
    for name in ("v2_sampling_decoder", "v2_sampling_decoder_cfg"):
        steps = load_v2(name)[0]["call"]["num_inference_steps"]
        expected[name] = (uniform_timesteps(steps), steps)
    for name, (grid, steps) in expected.items():
        meta, _, _ = load_v2(name)
        assert grid.dtype == torch.float32 and grid.numel() == steps + 1 == meta["num_steps"] + 1
        assert torch.equal(grid, torch.tensor(meta["timesteps"], dtype=torch.float32)), name
    # the 29-step hub grid and the original 30-step one really differ (quirk 6)
    assert default_prior_timesteps().numel() != segmented_timesteps().numel()
    assert torch.equal(check_timesteps(12), uniform_timesteps(12))


@pytest.mark.parametrize("name", VECTORS)
def test_alpha_cumprod_matches_per_step(name):
    meta, _, _ = load_v2(name)
    grid = torch.tensor(meta["timesteps"], dtype=torch.float32)
    abar = alpha_cumprod(grid)
    assert abar[0].item() == pytest.approx(1e-4) and abar[-1].item() == pytest.approx(0.9999)
    for row in meta["per_step"]:
        i = row["step"]
        # float32 cos near pi/2 (t close to 1) loses a few digits against the float64 table
        assert abar[i].item() == pytest.approx(row["alpha_cumprod"], rel=2e-5)
        assert abar[i + 1].item() == pytest.approx(row["alpha_cumprod_next"], rel=2e-5)
        assert row["noise_added"] == (row["t_next"] != 0)


@pytest.mark.parametrize("bad, match", [([1.0], "at least 2"), ([0.0, 1.0], "decreasing"),
                                        ([1.5, 0.0], r"\[0, 1\]"), ([[1.0, 0.0]], "1-D")])
def test_bad_grids_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        check_timesteps(bad)


# ---------------------------------------------------------------------------------------------
# Replay (teacher-forced) and end to end


class Recorded:
    """A stand-in model that returns step i's recorded outputs (and checks what it was given)."""

    def __init__(self, io, step):
        self.io, self.step = io, step

    def __call__(self, x, r, **inputs):
        i, io = self.step, self.io
        assert torch.all(r == io[f"step{i}.r"][0])  # the model time is t itself
        if f"step{i}.model_out" in io:
            assert x.shape[0] == io["x_init"].shape[0]
            return io[f"step{i}.model_out"]
        assert x.shape[0] == 2 * io["x_init"].shape[0]  # one batched call on [cond; uncond]
        return torch.cat([io[f"step{i}.model_out_cond"], io[f"step{i}.model_out_uncond"]])


@pytest.mark.parametrize("name", VECTORS)
def test_teacher_forced_replay(name, monkeypatch):
    meta, _, io = load_v2(name)
    grid = torch.tensor(meta["timesteps"], dtype=torch.float32)
    cond, uncond = conditioning(io)
    for i in range(meta["num_steps"]):
        noise = io[f"step{i}.noise"]
        monkeypatch.setattr(torch, "randn", lambda shape, *a, _n=noise, **k: _n.clone())
        x_in = io["x_init"] if i == 0 else io[f"step{i - 1}.x"]
        x = sample_v2(Recorded(io, i), x_in, cond, uncond, timesteps=grid[i:i + 2], cfg=guidance(meta))
        assert rel_err(x, io[f"step{i}.x"]) < 1e-5, f"step {i}"


def run_end_to_end(name, generator, model=None):
    meta, _, io = load_v2(name)
    model = model or model_for(meta)
    cond, uncond = conditioning(io)
    steps = []
    x = sample_v2(model, io["x_init"], cond, uncond, timesteps=torch.tensor(meta["timesteps"]), cfg=guidance(meta),
                  generator=generator, callback=lambda i, n, x: steps.append((i, n, x.clone())))
    assert [(i, n) for i, n, _ in steps] == [(i + 1, meta["num_steps"]) for i in range(meta["num_steps"])]
    for i, _, x_i in steps:
        assert rel_err(x_i, io[f"step{i - 1}.x"]) < 1e-3, f"{name} step {i - 1}"
    assert rel_err(x, io["final_x"]) < 1e-3
    return meta, io, x


def test_prior_then_decoder_end_to_end_on_one_generator():
    """The hub recipe: one CPU generator, x_init then one draw per step; the decoder continues it."""
    prior_meta, _, prior_io = load_v2("v2_sampling_prior")
    generator = torch.Generator().manual_seed(recorded_seed(prior_meta["call"]["generator"]))
    assert torch.equal(torch.randn(tuple(prior_meta["latent_shape"]), generator=generator), prior_io["x_init"])
    run_end_to_end("v2_sampling_prior", generator)
    decoder_meta, _, decoder_io = load_v2("v2_sampling_decoder")
    assert torch.equal(torch.randn(tuple(decoder_meta["latent_shape"]), generator=generator), decoder_io["x_init"])
    run_end_to_end("v2_sampling_decoder", generator)


def test_decoder_with_guidance_end_to_end():
    meta, _, io = load_v2("v2_sampling_decoder_cfg")
    generator = torch.Generator().manual_seed(recorded_seed(meta["call"]["generator"]))
    assert torch.equal(torch.randn(tuple(meta["latent_shape"]), generator=generator), io["x_init"])
    assert not io["uncond.effnet"].any()  # the unconditional effnet is zeros
    run_end_to_end("v2_sampling_decoder_cfg", generator)


def test_original_two_segment_recipe_on_the_global_generator():
    meta, _, io = load_v2("v2_sampling_prior_diffuzz")
    segments = [(s["t_start"], s["t_end"], s["timesteps"]) for s in meta["segments"]]
    assert segments == list(ORIGINAL_PRIOR_SEGMENTS)  # 1 -> 2/3 in 20 steps, then 2/3 -> 0 in 10
    model = model_for(meta)  # built first: initialising a module draws from the global generator
    with torch.random.fork_rng():
        torch.manual_seed(recorded_seed(" ".join(meta["rng_protocol"])))
        assert torch.equal(torch.randn(tuple(meta["latent_shape"])), io["x_init"])
        run_end_to_end("v2_sampling_prior_diffuzz", None, model)


# ---------------------------------------------------------------------------------------------
# Behaviour


def test_guidance_only_above_one_and_needs_uncond():
    calls = []

    def model(x, r, c):
        calls.append(x.shape[0])
        return x * 0.5 + c.mean()

    x_init = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"c": torch.ones(1, 4)}, {"c": torch.zeros(1, 4)}
    unguided = sample_v2(model, x_init, cond, uncond, timesteps=3, cfg=1.0, generator=torch.Generator().manual_seed(1))
    assert calls == [2, 2, 2]
    assert torch.equal(unguided, sample_v2(model, x_init, cond, None, timesteps=3, cfg=0.0,
                                           generator=torch.Generator().manual_seed(1)))
    calls.clear()
    guided = sample_v2(model, x_init, cond, uncond, timesteps=3, cfg=4.0, generator=torch.Generator().manual_seed(1))
    assert calls == [4, 4, 4] and not torch.equal(guided, unguided)
    with pytest.raises(ValueError, match="uncond"):
        sample_v2(model, x_init, cond, None, timesteps=3, cfg=4.0)


def test_last_step_draws_noise_but_adds_none():
    draws = []
    generator = torch.Generator().manual_seed(3)
    reference = torch.Generator().manual_seed(3)
    x = sample_v2(lambda x, r: torch.zeros_like(x), torch.ones(1, 2, 2, 2), {}, None, timesteps=[1.0, 0.5, 0.0], cfg=0,
                  generator=generator, callback=lambda i, n, x: draws.append(x))
    torch.randn((1, 2, 2, 2), generator=reference)
    torch.randn((1, 2, 2, 2), generator=reference)
    assert torch.equal(torch.randn(4, generator=generator), torch.randn(4, generator=reference))  # 2 draws made
    abar = alpha_cumprod([0.5, 0.0])
    assert torch.allclose(x, draws[0] / (abar[0] / abar[1]).sqrt(), rtol=1e-6)  # eps = 0: last x = mu exactly


def test_noise_to_v2_is_the_diffuzz_forward_process():
    x0, noise = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    abar = alpha_cumprod(0.6)
    assert torch.allclose(noise_to_v2(x0, 0.6, noise=noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    assert torch.allclose(noise_to_v2(x0, 1.0, noise=noise), 0.01 * x0 + (1 - 1e-4) ** 0.5 * noise)
