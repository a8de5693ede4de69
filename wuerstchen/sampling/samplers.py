"""Samplers for Stable Cascade stages B and C, on the official cosine/VP schedule.

``sample(..., sampler="ddpm")`` reproduces the official ``gdf`` sampling loop (``GDF.sample`` with
``DDPMSampler``): the same time grid, classifier-free guidance with the ``cfg_rho`` rescale, the
epsilon target, and the same random draws in the same order, so with the same CPU seed it gives
the official trajectory. The other samplers reuse the schedule and guidance and differ only in the
update rule.

:func:`sample_v2` is Würstchen v2's sampler (diffusers' ``DDPMWuerstchenScheduler`` loop): its
own update rule on the ᾱ schedule of :mod:`wuerstchen.sampling.schedule_v2`, plain lerp guidance, and the
last x as the result.

Conventions shared by every sampler:

* x is kept in float32; the model output is cast to float32 before any arithmetic.
* The result is the **last step's x0 prediction**, as the official notebooks use it (not the x
  reached at t = 0, which still carries the last step's noise).
* Random noise is drawn with ``torch.randn(x.shape, generator=generator)`` on the generator's
  device (the CPU when no generator is given, i.e. torch's global CPU generator) and then moved to
  x's device, so a seed reproduces across devices. Stochastic samplers draw exactly one such
  tensor per step, after the model call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch

from .schedule import CosineSchedule, StepSchedule, step_schedule, vp_scalers
from .schedule_v2 import alpha_cumprod, check_timesteps

SAMPLERS = ("ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde")
"""Sampler names accepted by :func:`sample`; ``ddpm`` is the official one."""

CFG_STD_EPS = 1e-9
"""Added to the guided prediction's std in the ``cfg_rho`` rescale (as gdf does)."""


class SamplingInterrupted(Exception):
    """Raise this from a sampling callback to stop sampling; it propagates out of :func:`sample`."""


class StepInput:
    """A model input whose value depends on the step, e.g. ControlNet maps used for part of a run.

    Put one in ``cond``/``uncond`` like any other input: before each model call the loop asks it
    for ``at(step, steps)``, with the 0-based step index and the number of steps this run takes
    (for img2img, the steps actually run), and uses the value it returns. Return the *same*
    object for steps that share a value: the loop then reuses its batched copy.
    """

    def at(self, step: int, steps: int) -> Any:
        raise NotImplementedError


Callback = Callable[[int, int, torch.Tensor], None]


# --------------------------------------------------------------------------------------------
# Conditioning and guidance
# --------------------------------------------------------------------------------------------

def _fit_batch(value: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    value = value.to(device)
    if value.shape[0] == 1 and batch > 1:
        value = value.expand(batch, *value.shape[1:])
    return value


def _pair_inputs(name: str, cond: Any, uncond: Any, batch: int, device: torch.device) -> Any:
    """One model input for the [cond; uncond] batch.

    Tensors are concatenated on dim 0 (batch-1 tensors are first repeated to the latent batch).
    A tensor paired with None gets zeros for the missing half: this is gdf's convention for absent
    unconditional inputs, and for ControlNet lists a zero hint is exactly "no injection". Lists and
    dicts are paired element by element; other values must agree between the two halves.
    """
    if isinstance(cond, torch.Tensor) or isinstance(uncond, torch.Tensor):
        if cond is None:
            cond = torch.zeros_like(uncond)
        if uncond is None:
            uncond = torch.zeros_like(cond)
        if not (isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)):
            other = uncond if isinstance(cond, torch.Tensor) else cond
            raise TypeError(f"model input {name!r}: cannot pair a tensor with a {type(other).__name__}")
        cond, uncond = _fit_batch(cond, batch, device), _fit_batch(uncond, batch, device)
        if cond.shape[1:] != uncond.shape[1:]:
            raise ValueError(f"model input {name!r}: cond shape {tuple(cond.shape)} and uncond shape "
                             f"{tuple(uncond.shape)} differ beyond the batch dimension")
        return torch.cat([cond, uncond.to(cond.dtype)], dim=0)
    if isinstance(cond, (list, tuple)) and isinstance(uncond, (list, tuple)):
        if len(cond) != len(uncond):
            raise ValueError(f"model input {name!r}: cond has {len(cond)} entries but uncond has {len(uncond)}")
        return [_pair_inputs(f"{name}[{i}]", c, u, batch, device) for i, (c, u) in enumerate(zip(cond, uncond))]
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        keys = list(cond) + [k for k in uncond if k not in cond]
        return {k: _pair_inputs(f"{name}.{k}", cond.get(k), uncond.get(k), batch, device) for k in keys}
    if cond is None or uncond is None or cond is uncond or cond == uncond:
        return cond if cond is not None else uncond
    raise ValueError(f"model input {name!r}: cond and uncond values differ ({cond!r} vs {uncond!r}); "
                     "only tensors, lists and dicts of tensors can differ between the two halves")


def _single_inputs(name: str, value: Any, batch: int, device: torch.device) -> Any:
    """One model input for a conditional-only batch (same placement rules as :func:`_pair_inputs`)."""
    if isinstance(value, torch.Tensor):
        return _fit_batch(value, batch, device)
    if isinstance(value, (list, tuple)):
        return [_single_inputs(f"{name}[{i}]", v, batch, device) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {k: _single_inputs(f"{name}.{k}", v, batch, device) for k, v in value.items()}
    return value


def batch_conditioning(cond: Mapping[str, Any], uncond: Mapping[str, Any], batch: int,
                       device: torch.device) -> dict[str, Any]:
    """Keyword arguments for the single batched [cond; uncond] model call.

    Inputs are paired by key name (gdf pairs them by dictionary order, which is the same thing when
    both dicts list their keys in the same order). A key that only one side has is shared, e.g. a
    ControlNet hint given once applies to both halves, as in the official ControlNet sampling.
    """
    keys = list(cond) + [k for k in uncond if k not in cond]
    return {k: _pair_inputs(k, cond.get(k, uncond.get(k)), uncond.get(k, cond.get(k)), batch, device)
            for k in keys}


def guide(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, cfg: float, cfg_rho: float) -> torch.Tensor:
    """Classifier-free guidance exactly as gdf: ``lerp(uncond, cond, cfg)``, then the std rescale.

    With ``cfg_rho > 0`` the guided prediction is pulled back towards the conditional prediction's
    overall standard deviation (one Bessel-corrected scalar over the whole batch tensor), which
    tames the over-saturation of large guidance scales.
    """
    guided = torch.lerp(eps_uncond, eps_cond, cfg)
    if cfg_rho > 0:
        std_cond, std_guided = eps_cond.std(), guided.std()
        guided = cfg_rho * (guided * std_cond / (std_guided + CFG_STD_EPS)) + guided * (1 - cfg_rho)
    return guided


@dataclass(frozen=True)
class _GuidedModel:
    """The model wrapped into an epsilon predictor with guidance, one model call per step.

    With ``cfg == 1`` the unconditional half is skipped: lerp(u, c, 1) is exactly c, and the
    ``cfg_rho`` rescale then multiplies c by std(c)/(std(c) + 1e-9), which equals 1 to within
    float32 rounding, so the result agrees with the batched official path to about one ulp while
    the model runs on half the batch.
    """

    model: Callable[..., torch.Tensor]
    batched_inputs: dict[str, Any] | None
    cond_inputs: dict[str, Any]
    cfg: float
    cfg_rho: float

    def __call__(self, x: torch.Tensor, r: torch.Tensor, step_inputs: Mapping[str, Any] | None = None) -> torch.Tensor:
        step_inputs = step_inputs or {}
        if self.batched_inputs is None:
            return self.model(x, r, **self.cond_inputs, **step_inputs).float()
        out = self.model(torch.cat([x, x], dim=0), r.repeat(2), **self.batched_inputs, **step_inputs).float()
        eps_cond, eps_uncond = out.chunk(2)
        return guide(eps_cond, eps_uncond, self.cfg, self.cfg_rho)


class _StepInputs:
    """The :class:`StepInput` values of cond/uncond, resolved and batched for one step."""

    def __init__(self, cond: Mapping[str, Any], uncond: Mapping[str, Any] | None, batch: int,
                 device: torch.device, paired: bool):
        uncond = uncond or {}
        keys = [k for k in list(cond) + [k for k in uncond if k not in cond]
                if isinstance(cond.get(k), StepInput) or isinstance(uncond.get(k), StepInput)]
        self.items = [(k, cond.get(k, uncond.get(k)), uncond.get(k, cond.get(k))) for k in keys]
        self.batch, self.device, self.paired = batch, device, paired
        self._last: dict[str, tuple] = {}

    def at(self, step: int, steps: int) -> dict[str, Any]:
        out = {}
        for key, c, u in self.items:
            vc = c.at(step, steps) if isinstance(c, StepInput) else c
            vu = vc if u is c else (u.at(step, steps) if isinstance(u, StepInput) else u)
            last = self._last.get(key)
            if last is not None and last[0] is vc and last[1] is vu:
                out[key] = last[2]
                continue
            if self.paired:
                value = _pair_inputs(key, vc, vu, self.batch, self.device)
            else:
                value = _single_inputs(key, vc, self.batch, self.device)
            self._last[key] = (vc, vu, value)
            out[key] = value
        return out


def _split_step_inputs(inputs: Mapping[str, Any] | None, step_keys: set) -> dict[str, Any] | None:
    if inputs is None:
        return None
    return {k: v for k, v in inputs.items() if k not in step_keys}


# --------------------------------------------------------------------------------------------
# Update rules
# --------------------------------------------------------------------------------------------
#
# All samplers see the VP process x = a·x0 + b·ε with a² + b² = 1 and λ = ln(a²/b²). For the
# ODE/SDE solvers it helps to rescale to x̃ = x/a, which is the variance-exploding process
# x̃ = x0 + σ·ε with σ = b/a = exp(-λ/2): there the probability-flow ODE is dx̃/dσ = ε, the form
# the Euler and DPM-Solver++ formulas of Karras et al. / k-diffusion are written in. Each update
# below is that σ-space formula with x̃ = x/a substituted in and the result multiplied by a'.


@dataclass
class _Step:
    """One step's schedule values (float32 values from the schedule, as Python floats)."""

    a: float
    b: float
    a_next: float
    b_next: float
    a_t: torch.Tensor  # float32 0-dim, for the bit-exact gdf arithmetic
    b_t: torch.Tensor
    a_next_t: torch.Tensor
    b_next_t: torch.Tensor

    @property
    def sigma(self) -> float:
        return self.b / self.a

    @property
    def sigma_next(self) -> float:
        return self.b_next / self.a_next


NoiseFn = Callable[[], torch.Tensor]


class _Sampler:
    """An update rule x_t -> x_{t_next} given the x0 and ε predicted at x_t."""

    def step(self, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, s: _Step, noise: NoiseFn) -> torch.Tensor:
        raise NotImplementedError


class _DDIM(_Sampler):
    """DDIM with stochasticity ``eta``, computed exactly as gdf's DDIMSampler (eta 1 = DDPMSampler).

    σ_i = eta·(b'/b)·sqrt(1 − a²/a'²); x' = a'·x0 + sqrt(b'² − σ_i²)·ε + σ_i·z.
    """

    def __init__(self, eta: float):
        self.eta = eta

    def step(self, x, x0, eps, s, noise):
        if self.eta == 0:
            return s.a_next * x0 + s.b_next * eps
        sigma = self.eta * (s.b_next_t ** 2 / s.b_t ** 2).sqrt() * (1 - s.a_t ** 2 / s.a_next_t ** 2).sqrt()
        eps_coef = (s.b_next_t ** 2 - sigma ** 2).sqrt()
        return s.a_next * x0 + eps_coef.item() * eps + sigma.item() * noise()


class _Euler(_Sampler):
    """Euler on dx̃/dσ = ε. For an epsilon-predicting model this equals DDIM (eta 0) analytically:
    x̃ + (σ' − σ)·ε = x0 + σ'·ε. Kept as its own name because users look for it."""

    def step(self, x, x0, eps, s, noise):
        x_tilde = x / s.a
        derivative = (x_tilde - x0) / s.sigma
        return s.a_next * (x_tilde + (s.sigma_next - s.sigma) * derivative)


class _EulerAncestral(_Sampler):
    """Euler ancestral (k-diffusion, eta 1): a deterministic Euler step down to σ_down, then fresh
    noise of std σ_up, with σ_down² + σ_up² = σ'².

    On a VP schedule with b² = 1 − a² this is algebraically the DDPM step: a'·σ_up equals gdf's
    σ_i because a'²b² − a²b'² = a'² − a². It differs from "ddpm" only by float rounding."""

    def step(self, x, x0, eps, s, noise):
        sigma, sigma_next = s.sigma, s.sigma_next
        sigma_up = min(sigma_next, math.sqrt(max(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2, 0.0)))
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        x_tilde = x / s.a
        derivative = (x_tilde - x0) / sigma
        x_tilde = x_tilde + (sigma_down - sigma) * derivative
        return s.a_next * (x_tilde + sigma_up * noise())


class _DPMpp2M(_Sampler):
    """DPM-Solver++(2M): multistep second order in half-logSNR h = ln(σ/σ').

    In VP form x' = (b'/b)·x + a'·(1 − e^{−h})·D, with D = x0 on the first step and otherwise the
    linear extrapolation (1 + 1/2r)·x0 − (1/2r)·x0_prev, r = h_prev/h.
    """

    def __init__(self):
        self.prev_x0: torch.Tensor | None = None
        self.prev_h: float | None = None

    def step(self, x, x0, eps, s, noise):
        h = math.log(s.sigma / s.sigma_next)
        if h == 0:  # a zero-length step (both times clipped to the same logSNR): nothing to do
            return x
        denoised = x0
        if self.prev_x0 is not None:
            ratio = self.prev_h / h
            denoised = (1 + 1 / (2 * ratio)) * x0 - (1 / (2 * ratio)) * self.prev_x0
        self.prev_x0, self.prev_h = x0, h
        return (s.b_next / s.b) * x + s.a_next * (-math.expm1(-h)) * denoised


class _DPMpp2MSDE(_Sampler):
    """DPM-Solver++(2M) SDE (k-diffusion's midpoint variant, eta 1).

    In σ-space: x̃' = (σ'/σ)·e^{−h}·x̃ + (1 − e^{−2h})·x0 [+ ½(1 − e^{−2h})/r·(x0 − x0_prev)]
    + σ'·sqrt(1 − e^{−2h})·z, then x' = a'·x̃'.
    """

    def __init__(self):
        self.prev_x0: torch.Tensor | None = None
        self.prev_h: float | None = None

    def step(self, x, x0, eps, s, noise):
        h = math.log(s.sigma / s.sigma_next)
        if h == 0:  # zero-length step; still draw the step's noise so every step uses one draw
            noise()
            return x
        data_coef = -math.expm1(-2 * h)
        x_tilde = (s.sigma_next / s.sigma) * math.exp(-h) * (x / s.a) + data_coef * x0
        if self.prev_x0 is not None:
            ratio = self.prev_h / h
            x_tilde = x_tilde + (0.5 * data_coef / ratio) * (x0 - self.prev_x0)
        self.prev_x0, self.prev_h = x0, h
        x_tilde = x_tilde + (s.sigma_next * math.sqrt(data_coef)) * noise()
        return s.a_next * x_tilde


def _make_sampler(name: str) -> _Sampler:
    factories = {
        "ddpm": lambda: _DDIM(eta=1.0),
        "ddim": lambda: _DDIM(eta=0.0),
        "euler": _Euler,
        "euler_ancestral": _EulerAncestral,
        "dpmpp_2m": _DPMpp2M,
        "dpmpp_2m_sde": _DPMpp2MSDE,
    }
    if name not in factories:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return factories[name]()


def _draw_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal noise from ``generator`` (or torch's global CPU generator), moved to ``device``."""
    source = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=source, dtype=torch.float32).to(device)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleStep:
    """What one sampling step produced (the tuple gdf yields, plus the step counter)."""

    step: int  # 1-based
    total: int
    x0: torch.Tensor | None  # the clean-latent prediction at this step's input time (None for v2)
    x: torch.Tensor  # the latent after the update, at the next grid time
    eps: torch.Tensor  # the guided epsilon prediction


@torch.no_grad()
def sample_steps(model: Callable[..., torch.Tensor], x_init: torch.Tensor, cond: Mapping[str, Any],
                 uncond: Mapping[str, Any] | None, *, steps: int, cfg: float, shift: float,
                 cfg_rho: float = 0.7, t_start: float = 1.0, sampler: str = "ddpm",
                 generator: torch.Generator | None = None) -> Iterator[SampleStep]:
    """The sampling loop as an iterator of :class:`SampleStep`; see :func:`sample` for the arguments."""
    update = _make_sampler(sampler)
    if uncond is None and cfg != 1:
        raise ValueError(f"uncond inputs are required for classifier-free guidance (cfg={cfg}); "
                         "pass cfg=1 to sample without guidance")
    schedule: StepSchedule = step_schedule(steps, shift=shift, t_start=t_start)

    x = x_init.detach().to(torch.float32).clone()
    batch, device = x.shape[0], x.device
    per_step = _StepInputs(cond, uncond, batch, device, paired=cfg != 1)
    step_keys = {key for key, _c, _u in per_step.items}
    cond, uncond = _split_step_inputs(cond, step_keys), _split_step_inputs(uncond, step_keys)
    if cfg == 1:
        guided = _GuidedModel(model, None, {k: _single_inputs(k, v, batch, device) for k, v in cond.items()},
                              cfg, cfg_rho)
    else:
        guided = _GuidedModel(model, batch_conditioning(cond, uncond, batch, device), {}, cfg, cfg_rho)

    def noise() -> torch.Tensor:
        return _draw_noise(x.shape, generator, device)

    for i in range(steps):
        r = schedule.r[i].expand(batch).to(device)
        eps = guided(x, r, per_step.at(i, steps))
        a, b = schedule.a[i], schedule.b[i]
        a_next, b_next = schedule.a[i + 1], schedule.b[i + 1]
        x0 = (x - eps * b.item()) / a.item()
        s = _Step(a=a.item(), b=b.item(), a_next=a_next.item(), b_next=b_next.item(),
                  a_t=a, b_t=b, a_next_t=a_next, b_next_t=b_next)
        x = update.step(x, x0, eps, s, noise)
        yield SampleStep(step=i + 1, total=steps, x0=x0, x=x, eps=eps)


def sample(model: Callable[..., torch.Tensor], x_init: torch.Tensor, cond: Mapping[str, Any],
           uncond: Mapping[str, Any] | None, *, steps: int, cfg: float, shift: float,
           cfg_rho: float = 0.7, t_start: float = 1.0, sampler: str = "ddpm",
           generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Denoise ``x_init`` (the latent at time ``t_start``) in ``steps`` steps; returns the final x0.

    ``model(x, r, **inputs)`` must return the epsilon prediction; ``r`` is the per-sample model time.
    ``cond``/``uncond`` are the model's keyword inputs for the two guidance halves, evaluated in
    one batched call [cond; uncond] per step (see :func:`batch_conditioning`); an input that is a
    :class:`StepInput` is asked for its value at every step. ``uncond`` may be
    None only when ``cfg == 1``. ``callback(step, steps, x0)`` runs after every step (step counts
    from 1); anything it raises, e.g. :class:`SamplingInterrupted`, propagates at once.
    For img2img, noise the latent with :func:`noise_to` and pass ``t_start`` and the step count
    from :func:`wuerstchen.sampling.schedule.img2img_steps`.
    """
    x0 = None
    for result in sample_steps(model, x_init, cond, uncond, steps=steps, cfg=cfg, shift=shift,
                               cfg_rho=cfg_rho, t_start=t_start, sampler=sampler, generator=generator):
        x0 = result.x0
        if callback is not None:
            callback(result.step, result.total, x0)
    return x0


# --------------------------------------------------------------------------------------------
# Würstchen v2
# --------------------------------------------------------------------------------------------
#
# v2 writes the process as DDPM in ᾱ: x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε. A step from t to an
# earlier time t' uses the per-step α = ᾱ_t/ᾱ_t' as if it were one DDPM transition, so the
# posterior mean in ε form is μ = (x − (1 − α)/sqrt(1 − ᾱ_t)·ε)/sqrt(α) and its variance is
# σ² = (1 − α)(1 − ᾱ_t')/(1 − ᾱ_t) (Ho et al. 2020, eq. 7 and 11). With x0 = (x − sqrt(1 − ᾱ_t)·ε)
# /sqrt(ᾱ_t) this is exactly the DDPM (η = 1 DDIM) step above in the a/b notation, a = sqrt(ᾱ);
# it is kept as its own rule because the scheduler computes it in this form (float32 order) and
# because the last step (t' = 0, where ᾱ is clamped to 0.9999) adds no noise but returns μ.


class _WuerstchenDDPM:
    """One DDPMWuerstchenScheduler step, in its operation order (coefficients as float32 0-dim tensors)."""

    def __init__(self, timesteps: torch.Tensor):
        self.t = timesteps
        self.alpha_cumprod = alpha_cumprod(timesteps)

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        abar, abar_next = self.alpha_cumprod[i].to(x.device), self.alpha_cumprod[i + 1].to(x.device)
        alpha = abar / abar_next
        mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - abar).sqrt())
        if self.t[i + 1] == 0:
            return mu
        std = ((1 - alpha) * (1.0 - abar_next) / (1 - abar)).sqrt()
        return mu + std * noise


@torch.no_grad()
def sample_v2_steps(model: Callable[..., torch.Tensor], x_init: torch.Tensor, cond: Mapping[str, Any],
                    uncond: Mapping[str, Any] | None, *, timesteps, cfg: float,
                    generator: torch.Generator | None = None) -> Iterator[SampleStep]:
    """The Würstchen v2 loop as an iterator of :class:`SampleStep` (``x0`` is None); see :func:`sample_v2`."""
    grid = check_timesteps(timesteps)
    guided = cfg > 1
    if guided and uncond is None:
        raise ValueError(f"uncond inputs are required for classifier-free guidance (cfg={cfg}); "
                         "pass cfg <= 1 to sample without guidance")
    x = x_init.detach().to(torch.float32).clone()
    batch, device = x.shape[0], x.device
    if guided:
        eps_fn = _GuidedModel(model, batch_conditioning(cond, uncond, batch, device), {}, cfg, 0.0)
    else:
        eps_fn = _GuidedModel(model, None, {k: _single_inputs(k, v, batch, device) for k, v in cond.items()},
                              cfg, 0.0)
    rule = _WuerstchenDDPM(grid)
    steps = grid.numel() - 1
    for i in range(steps):
        r = grid[i].expand(batch).to(device)
        eps = eps_fn(x, r)
        noise = _draw_noise(x.shape, generator, device)  # drawn on every step, the last one too
        x = rule.step(i, x, eps, noise)
        yield SampleStep(step=i + 1, total=steps, x0=None, x=x, eps=eps)


def sample_v2(model: Callable[..., torch.Tensor], x_init: torch.Tensor, cond: Mapping[str, Any],
              uncond: Mapping[str, Any] | None, *, timesteps, cfg: float,
              generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Würstchen v2 sampling (the hub pipelines' loop); returns the **last x** (no x0 prediction).

    ``timesteps`` is the grid from the start time down to 0 (see :mod:`wuerstchen.sampling.schedule_v2`:
    :func:`~wuerstchen.sampling.schedule_v2.default_prior_timesteps` for the prior's 29-step recipe,
    :func:`~wuerstchen.sampling.schedule_v2.uniform_timesteps`), or an int for that many uniform steps.
    The model is called as ``model(x, r, **inputs)`` with r = t (no shift). Guidance applies only
    when ``cfg > 1``: one batched call on [cond; uncond] and ``lerp(uncond, cond, cfg)``, no
    rescale; otherwise ``uncond`` is ignored (the decoder's default cfg 0 means no guidance).
    After each model call one ``torch.randn(x.shape, generator=generator)`` is drawn, the last
    step's too (it is then unused), so a generator continues exactly as in the hub pipelines.
    ``callback(step, steps, x)`` runs after each step.
    """
    x = x_init
    for result in sample_v2_steps(model, x_init, cond, uncond, timesteps=timesteps, cfg=cfg, generator=generator):
        x = result.x
        if callback is not None:
            callback(result.step, result.total, x)
    return x


def noise_to_v2(x0: torch.Tensor, t_start: float, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """Noise a clean Würstchen v2 latent to time ``t_start``: sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε (Diffuzz.diffuse).

    Sample it with a grid starting at ``t_start``; ``noise`` overrides the random draw.
    """
    abar = alpha_cumprod(t_start).to(x0.device)
    x0 = x0.to(torch.float32)
    if noise is None:
        noise = _draw_noise(x0.shape, generator, x0.device)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise.to(device=x0.device, dtype=torch.float32)


def noise_to(x0: torch.Tensor, t_start: float, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Noise a clean latent to time ``t_start`` for img2img, as the official notebook does.

    The official code noises with the **unshifted** schedule (shift 1), even though sampling then
    runs with shift 2 for stage C; this keeps that behaviour. ``noise`` overrides the random draw.
    """
    log_snr = CosineSchedule().log_snr(t_start, shift=1.0)
    a, b = vp_scalers(log_snr)
    x0 = x0.to(torch.float32)
    if noise is None:
        noise = _draw_noise(x0.shape, generator, x0.device)
    return x0 * a.item() + noise.to(device=x0.device, dtype=torch.float32) * b.item()
