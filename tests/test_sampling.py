"""Schedule and samplers against the official gdf trajectories, plus analytic checks of the others."""

import math

import pytest
import torch

from conftest import load_parity
from wuerstchen.sampling.samplers import (SAMPLERS, SamplingInterrupted, batch_conditioning, guide, noise_to, sample,
                                 sample_steps)
from wuerstchen.sampling.schedule import CosineSchedule, img2img_steps, step_schedule, time_grid, vp_scalers

VECTORS = ["sampling_stage_c", "sampling_stage_c_rho0", "sampling_stage_c_img2img", "sampling_stage_b"]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def sampling_args(meta: dict) -> dict:
    kw = meta["sample_kwargs"]
    return dict(steps=kw["timesteps"], cfg=kw["cfg"], shift=kw["shift"], cfg_rho=kw["cfg_rho"],
                t_start=kw["t_start"])


def conditioning(io: dict) -> tuple[dict, dict]:
    cond = {k[len("cond."):]: v for k, v in io.items() if k.startswith("cond.")}
    uncond = {k[len("uncond."):]: v for k, v in io.items() if k.startswith("uncond.")}
    return cond, uncond


def seeded_start(meta: dict, io: dict) -> tuple[torch.Tensor, torch.Generator]:
    """x_init and a generator positioned as the reference's rng_protocol leaves the global generator."""
    generator = torch.Generator().manual_seed(meta["seed"])
    shape = tuple(meta["sample_kwargs"]["shape"])
    if meta["img2img"] is None:
        x_init = torch.randn(shape, generator=generator)
    else:
        x_init = noise_to(io["img2img.x0_latent"], meta["img2img"]["t_noise"], generator=generator)
    return x_init, generator


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VECTORS)
def test_schedule_matches_per_step_values(name):
    meta, _, io = load_parity(name)
    kw = meta["sample_kwargs"]
    sched = step_schedule(kw["timesteps"], shift=kw["shift"], t_start=kw["t_start"])
    assert sched.t.dtype == torch.float32
    assert sched.t.tolist() == meta["r_range"]
    # float32 transcendental functions differ by an ulp between CPUs, hence the tight tolerances.
    for row in meta["per_step"]:
        i = row["step"]
        assert sched.t[i].item() == row["t"] and sched.t[i + 1].item() == row["t_next"]
        assert sched.log_snr[i].item() == pytest.approx(row["logSNR"], rel=1e-6, abs=1e-6)
        assert sched.log_snr[i + 1].item() == pytest.approx(row["logSNR_next"], rel=1e-6, abs=1e-6)
        assert sched.r[i].item() == pytest.approx(row["r_model_input"], abs=3e-7)
        torch.testing.assert_close(sched.r[i].expand(kw["shape"][0]).repeat(2), io[f"step{i}.r"], rtol=0, atol=3e-7)
        for key, value in [("a", sched.a[i]), ("b", sched.b[i]), ("a_next", sched.a[i + 1]), ("b_next", sched.b[i + 1])]:
            assert value.item() == pytest.approx(row[key], rel=3e-7), key
        a, b, a_next, b_next = (float(v) for v in (sched.a[i], sched.b[i], sched.a[i + 1], sched.b[i + 1]))
        ddpm_sigma = (b_next / b) * math.sqrt(1 - a * a / (a_next * a_next))
        assert ddpm_sigma == pytest.approx(row["ddpm_sigma"], rel=1e-6)
        assert math.sqrt(b_next ** 2 - ddpm_sigma ** 2) == pytest.approx(row["ddpm_eps_coef"], rel=1e-4, abs=5e-7)  # cancellation-sensitive


def test_shift_is_clipped_to_unshifted_bounds():
    schedule = CosineSchedule()
    low, high = schedule.bounds()
    assert low == pytest.approx(-9.21024, abs=1e-5) and high == pytest.approx(9.21024, abs=2e-4)
    # shift 2 would give -10.60 at t = 1; it is clipped back, while t = 0 moves down to +7.824.
    shifted = schedule.log_snr(torch.tensor([1.0, 0.0]), shift=2.0)
    assert shifted[0].item() == low
    assert shifted[1].item() == pytest.approx(7.8238, abs=1e-3)
    # the model time is re-derived from the shifted logSNR: r(1) != 1 for shift 2, r == t for shift 1
    assert schedule.model_time(shifted)[0].item() == pytest.approx(0.99358, abs=1e-5)
    t = torch.linspace(0.05, 0.95, 7)
    torch.testing.assert_close(schedule.model_time(schedule.log_snr(t)), t, atol=1e-5, rtol=0)


def test_vp_scalers_preserve_variance():
    a, b = vp_scalers(torch.linspace(-9, 9, 19))
    torch.testing.assert_close(a ** 2 + b ** 2, torch.ones(19))
    assert torch.all(a[1:] > a[:-1])


def test_time_grid_and_img2img_step_rule():
    grid = time_grid(0.6, 3)
    assert grid.dtype == torch.float32 and grid.tolist() == torch.linspace(0.6, 0.0, 4).tolist()
    assert img2img_steps(20, 0.6) == 12
    assert img2img_steps(6, 0.6) == 3
    assert img2img_steps(3, 0.1) == 1
    with pytest.raises(ValueError, match="steps"):
        time_grid(1.0, 0)
    with pytest.raises(ValueError, match="t_start"):
        time_grid(1.5, 4)


# ---------------------------------------------------------------------------------------------
# Replay of the official trajectories
# ---------------------------------------------------------------------------------------------

class RecordedModel:
    """Returns the recorded [cond; uncond] outputs and checks it is called the official way."""

    def __init__(self, io: dict, cond: dict, uncond: dict):
        self.io, self.cond, self.uncond, self.calls = io, cond, uncond, 0

    def __call__(self, x, r, **inputs):
        i = self.calls
        self.calls += 1
        x_in = self.io[f"step{i}.x_in"]
        assert x.shape[0] == 2 * x_in.shape[0], "cond and uncond must share one batched call"
        assert rel_err(x[: x_in.shape[0]], x_in) < 1e-5 and torch.equal(x[: x_in.shape[0]], x[x_in.shape[0]:])
        torch.testing.assert_close(r, self.io[f"step{i}.r"], rtol=0, atol=3e-7)
        assert set(inputs) == set(self.cond)
        for key, value in inputs.items():
            assert torch.equal(value, torch.cat([self.cond[key], self.uncond[key]]))
        return torch.cat([self.io[f"step{i}.model_out_cond"], self.io[f"step{i}.model_out_uncond"]])


@pytest.mark.parametrize("name", VECTORS)
def test_replay_matches_official_trajectory(name):
    meta, _, io = load_parity(name)
    cond, uncond = conditioning(io)
    x_init, generator = seeded_start(meta, io)
    assert rel_err(x_init, io["x_init"]) < 1e-6
    if meta["img2img"] is not None:
        torch.testing.assert_close(noise_to(io["img2img.x0_latent"], meta["img2img"]["t_noise"],
                                            noise=io["img2img.diffuse_noise"]), io["x_init"], rtol=0, atol=1e-6)
    model = RecordedModel(io, cond, uncond)
    results = list(sample_steps(model, io["x_init"], cond, uncond, generator=generator, **sampling_args(meta)))
    assert model.calls == len(results) == meta["sample_kwargs"]["timesteps"]
    for i, result in enumerate(results):
        for key, ours in [("pred", result.eps), ("x0", result.x0), ("x", result.x)]:
            assert rel_err(ours, io[f"step{i}.{key}"]) < 1e-5, (i, key)
        assert result.x0.dtype == result.x.dtype == torch.float32
    # the guidance formula alone, on the recorded model outputs
    for i in range(len(results)):
        pred = guide(io[f"step{i}.model_out_cond"], io[f"step{i}.model_out_uncond"], meta["sample_kwargs"]["cfg"],
                     meta["sample_kwargs"]["cfg_rho"])
        assert rel_err(pred, io[f"step{i}.pred"]) < 1e-6
    final = sample(RecordedModel(io, cond, uncond), io["x_init"], cond, uncond,
                   generator=seeded_start(meta, io)[1], **sampling_args(meta))
    assert rel_err(final, io["final_x0"]) < 1e-5
    assert rel_err(results[-1].x, io["final_x"]) < 1e-5


def test_global_generator_reproduces_official_rng_protocol():
    """Without a generator the noise comes from torch's global CPU generator, like gdf."""
    meta, _, io = load_parity("sampling_stage_c")
    cond, uncond = conditioning(io)
    torch.manual_seed(meta["seed"])
    x_init = torch.randn(tuple(meta["sample_kwargs"]["shape"]))
    assert torch.equal(x_init, io["x_init"])
    final = sample(RecordedModel(io, cond, uncond), x_init, cond, uncond, **sampling_args(meta))
    assert rel_err(final, io["final_x0"]) < 1e-5


# ---------------------------------------------------------------------------------------------
# End to end with the real networks
# ---------------------------------------------------------------------------------------------

def build_parity_model(meta: dict):
    model_meta, weights, _ = load_parity(meta["model_json"].removesuffix(".json"))
    if meta["model_json"] == "stage_c.json":
        from wuerstchen.models.stage_c import StageC as model_class
    else:
        from wuerstchen.models.stage_b import StageB as model_class
    model = model_class(**model_meta["config"])
    model.load_state_dict(weights, strict=True)
    return model.float().eval()


@pytest.mark.parametrize("name", VECTORS)
def test_end_to_end_with_parity_models(name):
    meta, _, io = load_parity(name)
    cond, uncond = conditioning(io)
    model = build_parity_model(meta)
    x_init, generator = seeded_start(meta, io)
    assert rel_err(x_init, io["x_init"]) < 1e-6
    kw = meta["sample_kwargs"]
    schedule = step_schedule(kw["timesteps"], shift=kw["shift"], t_start=kw["t_start"])
    results = list(sample_steps(model, x_init, cond, uncond, generator=generator, **sampling_args(meta)))
    for i, result in enumerate(results):
        assert rel_err(result.x0, io[f"step{i}.x0"]) < 1e-3, i
        assert rel_err(result.x, io[f"step{i}.x"]) < 1e-3, i
        # The networks embed r as sin/cos(r * 10000 * f), so a one-ulp change of r moves the raw
        # prediction by about 1e-3 relative. float32 sigmoid is one ulp apart between this CPU and
        # the reference's at stage_b step 3 (r = 0.25000009 vs 0.24999996); where r is bit-identical
        # the prediction matches to about 1e-6. x0 and x are insensitive (b * Δpred << x).
        r_identical = torch.equal(schedule.r[i].expand(kw["shape"][0]).repeat(2), io[f"step{i}.r"])
        assert rel_err(result.eps, io[f"step{i}.pred"]) < (1e-3 if r_identical else 2e-3), i
    assert rel_err(results[-1].x0, io["final_x0"]) < 1e-3


# ---------------------------------------------------------------------------------------------
# Conditioning layout
# ---------------------------------------------------------------------------------------------

def test_batch_conditioning_pairs_lists_shared_and_missing_inputs():
    c, u = torch.ones(2, 3), torch.zeros(2, 3)
    hint = torch.full((1, 4), 2.0)
    batched = batch_conditioning(
        {"clip": c, "cnet": [hint, None, hint], "shared": c, "flag": True},
        {"clip": u, "cnet": [hint, None, None], "flag": True},
        batch=2, device=torch.device("cpu"))
    assert torch.equal(batched["clip"], torch.cat([c, u]))
    assert batched["cnet"][1] is None
    assert torch.equal(batched["cnet"][0], hint.expand(4, 4))  # batch-1 hint repeated to 2 + 2
    assert torch.equal(batched["cnet"][2], torch.cat([hint.expand(2, 4), torch.zeros(2, 4)]))
    assert torch.equal(batched["shared"], torch.cat([c, c]))  # key only in cond: used for both halves
    assert batched["flag"] is True
    with pytest.raises(ValueError, match="entries"):
        batch_conditioning({"cnet": [hint]}, {"cnet": [hint, hint]}, batch=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="differ"):
        batch_conditioning({"mode": "a"}, {"mode": "b"}, batch=1, device=torch.device("cpu"))


def test_cfg_one_skips_uncond_and_matches_batched_math():
    from wuerstchen.sampling.samplers import _GuidedModel

    calls = []

    def model(x, r, clip):
        calls.append(x.shape[0])
        return 0.3 * x + clip.view(-1, 1, 1, 1) * r.view(-1, 1, 1, 1)

    x, r = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.7])
    cond, uncond = {"clip": torch.tensor([1.0, 2.0])}, {"clip": torch.tensor([-3.0, 0.5])}
    device = torch.device("cpu")
    batched = _GuidedModel(model, batch_conditioning(cond, uncond, 2, device), {}, 1.0, 0.7)(x, r)
    single = _GuidedModel(model, None, cond, 1.0, 0.7)(x, r)
    assert calls == [4, 2]
    assert rel_err(single, batched) < 1e-6

    calls.clear()
    sample(model, x, cond, None, steps=3, cfg=1.0, shift=1.0, generator=torch.Generator().manual_seed(0))
    assert calls == [2, 2, 2]  # the uncond half is never evaluated
    with pytest.raises(ValueError, match="uncond"):
        sample(model, x, cond, None, steps=3, cfg=2.0, shift=1.0)


# ---------------------------------------------------------------------------------------------
# The other samplers on an analytic model
# ---------------------------------------------------------------------------------------------

def log_snr_from_model_time(r: torch.Tensor) -> torch.Tensor:
    """Invert CosineSchedule.model_time (unshifted cosine), in float64."""
    s = 0.008
    min_var = math.cos(s / (1 + s) * math.pi / 2) ** 2
    var = torch.cos((r.double() + s) / (1 + s) * math.pi / 2) ** 2 / min_var
    return torch.log(var / (1 - var))


class TwoPointModel:
    """The exact epsilon predictor for data that is +1 or -1 with equal probability, per element."""

    def __call__(self, x, r, **inputs):
        log_snr = log_snr_from_model_time(r).view(-1, *[1] * (x.dim() - 1))
        a, b = torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()
        x0 = torch.tanh(a * x.double() / b ** 2)
        return ((x.double() - a * x0) / b).float()


class GaussianModel:
    """The exact epsilon predictor for data ~ N(mean, std²) per element."""

    def __init__(self, mean=0.5, std=0.5):
        self.mean, self.std = mean, std

    def __call__(self, x, r, **inputs):
        log_snr = log_snr_from_model_time(r).view(-1, *[1] * (x.dim() - 1))
        a2, b2 = torch.sigmoid(log_snr), torch.sigmoid(-log_snr)
        return (b2.sqrt() * (x.double() - a2.sqrt() * self.mean) / (a2 * self.std ** 2 + b2)).float()


def run_analytic(model, sampler, steps=24, shift=1.0, seed=0, shape=(4, 1, 32, 32), callback=None):
    generator = torch.Generator().manual_seed(seed)
    x_init = torch.randn(shape, generator=generator)
    return sample(model, x_init, {}, {}, steps=steps, cfg=1.0, shift=shift, sampler=sampler,
                  generator=generator, callback=callback)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_samplers_converge_to_two_point_data(sampler, shift):
    x0 = run_analytic(TwoPointModel(), sampler, steps=40, shift=shift)
    assert torch.isfinite(x0).all()
    assert ((x0.abs() - 1).abs() < 0.05).float().mean() > 0.999  # the samples land on the data points
    assert 0.4 < (x0 > 0).float().mean() < 0.6  # and both points are reached about equally


def expected_final_std(steps: int, shift: float, std: float = 0.5) -> float:
    """std of E[x0 | x] at the last grid time, i.e. of the exact last-step x0 prediction."""
    schedule = step_schedule(steps, shift=shift)
    a2, b2 = schedule.a[-2].item() ** 2, schedule.b[-2].item() ** 2
    return std * math.sqrt(a2 * std ** 2 / (a2 * std ** 2 + b2))


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_samplers_reproduce_gaussian_statistics(sampler, shift):
    """Mean and spread are right, and the spread error shrinks with the step count."""
    errors = []
    for steps in (20, 80):  # with shift 2 and 80 steps the first step has zero length (clipped logSNR)
        x0 = run_analytic(GaussianModel(mean=0.5, std=0.5), sampler, steps=steps, shift=shift, shape=(8, 1, 64, 64))
        assert x0.mean().item() == pytest.approx(0.5, abs=0.02)
        errors.append(abs(x0.std().item() - expected_final_std(steps, shift)))
    assert errors[1] < 0.035
    assert errors[1] < errors[0] or errors[1] < 0.005


def test_euler_variants_equal_ddim_and_ddpm():
    """For an epsilon model on a VP schedule, Euler is DDIM and Euler ancestral is DDPM (see sampling.py)."""
    ddim = run_analytic(GaussianModel(), "ddim")
    torch.testing.assert_close(run_analytic(GaussianModel(), "euler"), ddim, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(run_analytic(GaussianModel(), "euler_ancestral"), run_analytic(GaussianModel(), "ddpm"),
                               atol=1e-4, rtol=1e-4)
    for name in ("ddpm", "euler_ancestral", "dpmpp_2m_sde"):
        assert not torch.allclose(run_analytic(GaussianModel(), name), ddim, atol=1e-3)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_are_deterministic_per_seed(sampler):
    first = run_analytic(TwoPointModel(), sampler, steps=6, seed=7)
    assert torch.equal(first, run_analytic(TwoPointModel(), sampler, steps=6, seed=7))
    if sampler in ("ddpm", "euler_ancestral", "dpmpp_2m_sde"):
        assert not torch.equal(first, run_analytic(TwoPointModel(), sampler, steps=6, seed=8))


def test_callback_counts_steps_and_interrupt_propagates():
    seen = []
    final = run_analytic(TwoPointModel(), "ddpm", steps=5, callback=lambda step, total, x0: seen.append((step, total, x0)))
    assert [(s, t) for s, t, _ in seen] == [(i, 5) for i in range(1, 6)]
    assert torch.equal(seen[-1][2], final)

    calls = []

    def model(x, r, **inputs):
        calls.append(1)
        return torch.zeros_like(x)

    def interrupt(step, total, x0):
        if step == 2:
            raise SamplingInterrupted("stopped by user")

    with pytest.raises(SamplingInterrupted):
        sample(model, torch.zeros(1, 1, 2, 2), {}, {}, steps=10, cfg=1.0, shift=1.0, callback=interrupt)
    assert len(calls) == 2


def test_unknown_sampler_is_rejected():
    with pytest.raises(ValueError, match="unknown sampler"):
        run_analytic(TwoPointModel(), "heun")


def test_noise_to_uses_unshifted_schedule():
    x0 = torch.full((1, 2, 3, 3), 2.0)
    eps = torch.randn(1, 2, 3, 3)
    a, b = vp_scalers(CosineSchedule().log_snr(0.6, shift=1.0))
    torch.testing.assert_close(noise_to(x0, 0.6, noise=eps), x0 * a + eps * b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(noise_to(x0, 0.6, generator=g1), x0 * a.item() + torch.randn(x0.shape, generator=g2) * b.item())
