"""The Würstchen v2 recipe as plain functions: text -> prior -> ×42 − 1 -> decoder -> VQGAN -> image.

Defaults are the hub ``WuerstchenCombinedPipeline``'s: the prior samples 29 steps on
``DEFAULT_STAGE_C_TIMESTEPS`` with guidance 4 (a uniform grid, 60 steps in the hub pipelines, is
selectable), the decoder 12 uniform steps without guidance, and each stage's result is its last x.
Conditioning (reference README, "The v2 conditioning recipe"):

* both text towers give ``last_hidden_state`` (after the final LayerNorm) of prompts tokenized
  with pad 49407; the unconditional side is the embedding of the negative prompt, or of "" when
  there is none (never zeros);
* the prior's result lives in the v2 EfficientNet's space (y + 1)/42; the decoder gets
  ``x · 42 − 1``, and for guidance its unconditional effnet is zeros;
* the VQGAN decodes ``0.3764 · x`` without quantization, then the image is clamped to [0, 1].

Sizes: the prior latent side is ⌈side/42.67⌉ and the decoder's is int(e·10.67), which the
decoder can only take when it is a multiple of 16, i.e. when e is a multiple of 3 (every multiple
of 128 works; 960 or 700 do not). :func:`check_size_v2` says so before any work starts and
:func:`round_size_v2` gives the nearest size that works.

Random numbers come from one CPU generator for the whole chain: the prior draws its start latent
and one tensor per step, and the decoder continues from the same generator, as the combined hub
pipeline does, so a seed gives the same image on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..inputs import limits
from ..sampling import samplers as sampling
from ..models.effnet import v2_effnet_to_raw
from .stages import STAGE_B_COMPRESSION, cpu_generator, semantic_input
from ..sampling.schedule_v2 import (DEFAULT_DECODER_STEPS, check_timesteps, default_prior_timesteps,
                          uniform_timesteps)

V2_RESOLUTION_MULTIPLE = 42.67
"""Image side per prior latent row (hub prior pipeline ``resolution_multiple``)."""

V2_DECODER_LATENT_SCALE = 10.67
"""Decoder latent rows per prior latent row (hub decoder pipeline ``latent_dim_scale``)."""

V2_STAGE_A_SCALE = 0.3764
"""The v2 VQGAN decodes ``0.3764 · decoder latent`` (hub ``scale_factor``)."""

DECODER_SIZE_MULTIPLE = 16
"""The released decoder (patch 2, three stride-2 levels) needs latent sides that are multiples of 16."""

ProgressFn = Callable[[int, int, torch.Tensor], None]
Prompts = Union[str, Sequence[str]]


# --------------------------------------------------------------------------------------------
# Sizes


def prior_latent_size(height: int, width: int) -> Tuple[int, int]:
    """Prior latent (h, w) for an image size: ⌈side / 42.67⌉."""
    return math.ceil(height / V2_RESOLUTION_MULTIPLE), math.ceil(width / V2_RESOLUTION_MULTIPLE)


def decoder_latent_size(prior_h: int, prior_w: int) -> Tuple[int, int]:
    """Decoder latent (h, w) for a prior latent (image embeddings) of ``prior_h × prior_w``: int(e · 10.67)."""
    return int(prior_h * V2_DECODER_LATENT_SCALE), int(prior_w * V2_DECODER_LATENT_SCALE)


def output_size(height: int, width: int) -> Tuple[int, int]:
    """The image size the chain really produces for a requested size (4 × the decoder latent)."""
    h, w = decoder_latent_size(*prior_latent_size(height, width))
    return h * STAGE_B_COMPRESSION, w * STAGE_B_COMPRESSION


def _side_works(side: int, multiple: int) -> bool:
    e = math.ceil(side / V2_RESOLUTION_MULTIPLE)
    return e >= 1 and int(e * V2_DECODER_LATENT_SCALE) % multiple == 0


def _nearest_working_side(side: int, multiple: int) -> int:
    """The working output side nearest to ``side`` (ties: the larger one)."""
    best = None
    for e in range(1, max(2, math.ceil(side / V2_RESOLUTION_MULTIPLE)) * 2 + 2 * multiple):
        out = int(e * V2_DECODER_LATENT_SCALE)
        if out % multiple:
            continue
        candidate = out * STAGE_B_COMPRESSION
        if best is None or abs(candidate - side) < abs(best - side) or (
                abs(candidate - side) == abs(best - side) and candidate > best):
            best = candidate
    return best


def round_size_v2(height: int, width: int, multiple: int = DECODER_SIZE_MULTIPLE) -> Tuple[int, int]:
    """The nearest output size the decoder can take (for the released model: multiples of 128).

    A size that already works is returned as the chain's real output (e.g. 1000 -> 1024).
    """
    def one(side):
        return output_size(side, side)[0] if _side_works(side, multiple) else _nearest_working_side(side, multiple)

    return one(height), one(width)


def check_size_v2(height: int, width: int, multiple: int = DECODER_SIZE_MULTIPLE, where: str = "size") -> None:
    """Raise a one-line ValueError for sizes the v2 decoder cannot take, naming the nearest ones that work."""
    if height < 64 or width < 64 or height > 8192 or width > 8192:
        raise ValueError(f"{where}: {width}x{height} is out of range for Würstchen v2; use 64 to 8192 pixels per "
                         "side (1024x1024 is what the models were trained for)")
    bad = [side for side in (height, width) if not _side_works(side, multiple)]
    if bad:
        e_h, e_w = prior_latent_size(height, width)
        d_h, d_w = decoder_latent_size(e_h, e_w)
        nearest = round_size_v2(height, width, multiple)
        raise ValueError(
            f"{where}: Würstchen v2 cannot make {width}x{height}: the prior latent would be {e_w}x{e_h} and the "
            f"decoder latent {d_w}x{d_h}, but the decoder needs multiples of {multiple} (a prior latent side "
            f"divisible by 3); use {nearest[1]}x{nearest[0]} (any multiple of 128 works)")


def nearest_working_latent(height: int, width: int) -> Tuple[int, int]:
    """The prior latent size nearest to ``height × width`` that the released decoder can take
    (sides divisible by 3), e.g. for encoding an image of any size for img2img."""
    return tuple(3 * max(1, round(e / 3)) for e in (height, width))


def check_prior_latent_v2(height: int, width: int, multiple: int = DECODER_SIZE_MULTIPLE, where: str = "latent") -> None:
    """Raise a one-line ValueError when a prior latent of ``height × width`` would give a decoder
    latent the decoder cannot take (sides divisible by 3 work), naming image sizes that work."""
    d_h, d_w = decoder_latent_size(height, width)
    if height >= 1 and width >= 1 and not (d_h % multiple or d_w % multiple):
        return
    good = output_size(*(math.floor((e - 0.5) * V2_RESOLUTION_MULTIPLE) for e in nearest_working_latent(height, width)))
    raise ValueError(f"{where}: a Würstchen v2 prior latent of {width}x{height} gives a decoder latent of {d_w}x{d_h}, "
                     f"but the decoder needs multiples of {multiple} (prior latent sides divisible by 3); make the "
                     f"image {good[1]}x{good[0]} (any multiple of 128 works, e.g. 1024x1024)")


# --------------------------------------------------------------------------------------------
# Text


@dataclass
class V2Text:
    """One text tower's conditioning for both guidance sides: ``last_hidden_state`` [B, L, W]."""

    cond: torch.Tensor
    uncond: torch.Tensor


def _prompt_list(prompts: Prompts, what: str) -> list:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError(f"{what}: at least one prompt is needed")
    return prompts


def encode_text_v2(text_encoder: nn.Module, prompts: Prompts, negative_prompts: Optional[Prompts] = None, *,
                   num_images_per_prompt: int = 1, weights: bool = True, long_prompts: bool = True,
                   embeddings=None) -> V2Text:
    """Both sides of one tower's conditioning, as float32 CPU tensors.

    ``text_encoder`` must be a v2-family :class:`~wuerstchen.text.encoder.CLIPTextEncoder` (pad 49407,
    ``last_hidden_state``). The negative side is the embedding of ``negative_prompts`` (one for
    all, or one per prompt), or of "" when None. Prompt weights and long prompts behave as
    :meth:`~wuerstchen.text.encoder.CLIPTextEncoder.encode_prompts` documents (``embeddings``: where
    ``embedding:NAME`` is looked up); a plain prompt of at most 75 tokens gives exactly the hub
    pipelines' embedding.
    """
    family = getattr(text_encoder, "family", None)
    if family != "v2":
        raise ValueError(f"encode_text_v2 needs a Würstchen v2 text encoder (family 'v2'), got family {family!r}; "
                         "build it with CLIPTextEncoder.from_state_dict(..., family='v2')")
    prompts = _prompt_list(prompts, "encode_text_v2")
    if negative_prompts is None:
        negatives = [""] * len(prompts)
    else:
        negatives = _prompt_list(negative_prompts, "encode_text_v2 negative_prompts")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        elif len(negatives) != len(prompts):
            raise ValueError(f"encode_text_v2: {len(negatives)} negative prompts for {len(prompts)} prompts; "
                             "give one for all or one per prompt")
    cond, _ = text_encoder.encode_prompts(prompts, weights=weights, long_prompts=long_prompts, embeddings=embeddings)
    uncond, _ = text_encoder.encode_prompts(negatives, weights=weights, long_prompts=long_prompts,
                                            embeddings=embeddings)
    cond, uncond = match_lengths(cond.float().cpu(), uncond.float().cpu())
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
    return V2Text(cond.repeat_interleave(num_images_per_prompt, dim=0),
                  uncond.repeat_interleave(num_images_per_prompt, dim=0))


def match_lengths(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Guidance batches both sides: repeat the shorter sequence's 77-token windows (long prompts)."""
    n = max(a.shape[1], b.shape[1])

    def grow(t):
        return t if t.shape[1] == n else t.repeat(1, math.ceil(n / t.shape[1]), 1)[:, :n]

    return grow(a), grow(b)


# --------------------------------------------------------------------------------------------
# Sampling


@dataclass
class PriorSettings:
    """Prior sampling. ``steps`` None: the 29-step ``DEFAULT_STAGE_C_TIMESTEPS`` (hub recipe); an int:
    that many uniform steps (the hub pipelines' uniform default is 60); ``timesteps``: an explicit grid."""

    cfg: float = 4.0
    steps: Optional[int] = None
    timesteps: Optional[Sequence[float]] = None

    def __post_init__(self):
        """Settings that cannot run are refused here, before any work (a RequestError naming them)."""
        if self.steps is not None:
            limits.check_steps(self.steps, "prior steps", official=len(default_prior_timesteps()) - 1)
        limits.check_number(self.cfg, "prior cfg", minimum=0, official=4.0)

    def grid(self) -> torch.Tensor:
        if self.timesteps is not None:
            return check_timesteps(self.timesteps)
        return default_prior_timesteps() if self.steps is None else uniform_timesteps(self.steps)


@dataclass
class DecoderSettings:
    """Decoder sampling: uniform steps; guidance only when ``cfg`` > 1 (hub default 0: off)."""

    steps: int = DEFAULT_DECODER_STEPS
    cfg: float = 0.0

    def __post_init__(self):
        limits.check_steps(self.steps, "decoder steps", official=DEFAULT_DECODER_STEPS)
        limits.check_number(self.cfg, "decoder cfg", minimum=0, official=0.0, hint="guidance needs more than 1")

    def grid(self) -> torch.Tensor:
        return uniform_timesteps(self.steps)


def prior_steps(settings: PriorSettings, denoise: float = 1.0) -> int:
    """How many steps :func:`sample_prior_v2` runs (img2img, ``denoise`` < 1: the grid below it)."""
    grid = settings.grid()
    return grid.numel() - 1 if denoise >= 1.0 else int((grid < denoise).sum())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batch_to(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{what}: batch {t.shape[0]} does not match the latent batch {batch}")


def sample_prior_v2(prior: nn.Module, text: V2Text, *, latent_size: Tuple[int, int], generator: torch.Generator,
                    settings: PriorSettings = PriorSettings(), init_latent: Optional[torch.Tensor] = None,
                    denoise: float = 1.0, callback: Optional[ProgressFn] = None) -> torch.Tensor:
    """Sample the prior latent [B, c_in, h, w] (in the (y + 1)/42 space), float32 on the CPU.

    ``init_latent`` (a prior-space latent, e.g. from :func:`encode_semantic_v2`) with ``denoise``
    < 1 is img2img: it is noised to t = denoise and the grid's part below that time is sampled.
    """
    device = _device(prior)
    batch = text.cond.shape[0]
    grid = settings.grid()
    if init_latent is not None and denoise < 1.0:
        if not 0.0 < denoise:
            raise ValueError(f"denoise must be in (0, 1], got {denoise}")
        grid = torch.cat([torch.tensor([denoise], dtype=torch.float32), grid[grid < denoise]])
        x_init = sampling.noise_to_v2(_batch_to(init_latent.float(), batch, "init_latent"), denoise, generator)
    else:
        c_in = prior.projection.in_channels
        x_init = torch.randn((batch, c_in, *latent_size), generator=generator)
    cond, uncond = {"c": text.cond}, {"c": _batch_to(text.uncond, batch, "prior uncond")}
    x = sampling.sample_v2(prior, x_init.to(device), cond, uncond, timesteps=grid, cfg=settings.cfg,
                           generator=generator, callback=callback)
    return x.float().cpu()


def sample_decoder_v2(decoder: nn.Module, image_embeddings: torch.Tensor, text: V2Text, *,
                      generator: torch.Generator, settings: DecoderSettings = DecoderSettings(),
                      callback: Optional[ProgressFn] = None) -> torch.Tensor:
    """Sample the decoder latent [B, 4, int(h·10.67), int(w·10.67)] for raw ``image_embeddings``
    (the prior result × 42 − 1) [B, 16, h, w]; float32 on the CPU."""
    device = _device(decoder)
    batch = image_embeddings.shape[0]
    size = decoder_latent_size(*image_embeddings.shape[-2:])
    multiple = getattr(decoder, "size_multiple", DECODER_SIZE_MULTIPLE)
    if size[0] % multiple or size[1] % multiple:
        raise ValueError(f"image embeddings of {image_embeddings.shape[-1]}x{image_embeddings.shape[-2]} give a "
                         f"decoder latent of {size[1]}x{size[0]}, but the decoder needs multiples of {multiple} "
                         "(a prior latent side divisible by 3)")
    x_init = torch.randn((batch, decoder.c_out, *size), generator=generator)
    effnet = image_embeddings.float()
    cond = {"effnet": effnet, "clip": _batch_to(text.cond, batch, "decoder text")}
    uncond = {"effnet": torch.zeros_like(effnet), "clip": _batch_to(text.uncond, batch, "decoder uncond")}
    x = sampling.sample_v2(decoder, x_init.to(device), cond, uncond, timesteps=settings.grid(), cfg=settings.cfg,
                           generator=generator, callback=callback)
    return x.float().cpu()


def prior_for_latent(prior: nn.Module, cond: torch.Tensor, uncond: torch.Tensor, latent: torch.Tensor, *,
                     seed: int, steps: int = 0, cfg: float = 4.0, denoise: float = 1.0,
                     callback: Optional[ProgressFn] = None) -> torch.Tensor:
    """The prior sampled for a given latent, as a graph asks for it: ``latent`` sets the size and batch
    (an empty latent), or with ``denoise`` < 1 is the img2img start (an encoded image). ``cond`` /
    ``uncond`` are prior text encodings (one prompt for the batch, or one per image); ``steps`` 0 is
    the hub's 29-step grid, another number that many uniform steps. Checked before any work."""
    check_prior_latent_v2(*latent.shape[-2:], where="latent")
    settings = PriorSettings(cfg=cfg, steps=steps or None)
    batch = latent.shape[0]
    text = V2Text(*match_lengths(_batch_to(cond, batch, "positive"), _batch_to(uncond, batch, "negative")))
    img2img = denoise < 1.0
    return sample_prior_v2(prior, text, latent_size=tuple(latent.shape[-2:]), generator=cpu_generator(seed),
                           settings=settings, init_latent=latent if img2img else None, denoise=denoise,
                           callback=callback)


def prior_run_steps(steps: int = 0, denoise: float = 1.0) -> int:
    """How many steps :func:`prior_for_latent` runs with these settings (for progress bars)."""
    return prior_steps(PriorSettings(steps=steps or None), denoise)


def decoder_for_prior(decoder: nn.Module, cond: torch.Tensor, uncond: torch.Tensor, prior_latent: torch.Tensor, *,
                      seed: int, steps: int = DEFAULT_DECODER_STEPS, cfg: float = 0.0,
                      size: Tuple[int, int] = (0, 0), callback: Optional[ProgressFn] = None) -> torch.Tensor:
    """The decoder latent for a prior latent (prior space; mapped by ``×42 − 1`` here) and decoder text
    encodings. The output size follows the prior latent: ``size`` (height, width) may be 0 or must
    agree with it. Checked before any work."""
    e_h, e_w = prior_latent.shape[-2:]
    d_h, d_w = decoder_latent_size(e_h, e_w)
    made = (d_h * STAGE_B_COMPRESSION, d_w * STAGE_B_COMPRESSION)
    height, width = size
    if (width or height) and (height or made[0], width or made[1]) != made:
        raise ValueError(f"Würstchen v2's output size follows the prior latent ({e_w}x{e_h} makes "
                         f"{made[1]}x{made[0]}); set width and height to 0 (or to {made[1]} and {made[0]})")
    settings = DecoderSettings(steps=steps, cfg=cfg)
    batch = prior_latent.shape[0]
    text = V2Text(*match_lengths(_batch_to(cond, batch, "positive"), _batch_to(uncond, batch, "negative")))
    return sample_decoder_v2(decoder, v2_effnet_to_raw(prior_latent.float()), text,
                             generator=cpu_generator(seed), settings=settings, callback=callback)


# --------------------------------------------------------------------------------------------
# Pixels


@torch.no_grad()
def decode_v2(stage_a: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """VQGAN-decode a decoder latent: ``decode(0.3764 · x)`` without quantization, clamped to [0, 1]."""
    param = next(stage_a.parameters())
    h = V2_STAGE_A_SCALE * latent.to(param.device, torch.float32)
    return stage_a.decode_unscaled(h.to(param.dtype)).float().clamp(0, 1).cpu()


@torch.no_grad()
def encode_semantic_v2(effnet: nn.Module, images: torch.Tensor,
                       latent_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> prior-space latent [B, 16, h, w] with the v2 EfficientNet.

    The images are resized (bilinear, antialiased) to 32 × the latent size (default: the prior
    latent size of the image) and ImageNet-normalised as for Stable Cascade, then encoded. Decode it directly with
    ``v2_effnet_to_raw`` as the decoder's image embeddings, or use it as the prior's img2img start.
    """
    if getattr(effnet, "family", None) != "v2":
        raise ValueError("encode_semantic_v2 needs the Würstchen v2 EfficientNet (EfficientNetEncoder(family='v2'))")
    if latent_size is None:
        latent_size = prior_latent_size(images.shape[-2], images.shape[-1])
    param = next(effnet.parameters())
    return effnet(semantic_input(images, latent_size).to(param.device, param.dtype)).float().cpu()


# --------------------------------------------------------------------------------------------
# The whole chain


@dataclass
class V2Result:
    prior_latent: torch.Tensor  # [B, 16, h, w], (y + 1)/42 space
    image_embeddings: torch.Tensor  # prior_latent · 42 − 1, the decoder's effnet input
    decoder_latent: torch.Tensor  # [B, 4, H/4, W/4]
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]


def text_to_image_v2(prior: nn.Module, decoder: nn.Module, stage_a: nn.Module, prior_text: V2Text,
                     decoder_text: V2Text, *, height: int = 1024, width: int = 1024, seed: int = 0,
                     generator: Optional[torch.Generator] = None, prior_settings: PriorSettings = PriorSettings(),
                     decoder_settings: DecoderSettings = DecoderSettings(),
                     prior_callback: Optional[ProgressFn] = None,
                     decoder_callback: Optional[ProgressFn] = None) -> V2Result:
    """The combined hub recipe from text conditioning (see :func:`encode_text_v2`) to images.

    The size is checked first (:func:`check_size_v2`). One generator (``generator``, or a CPU one
    seeded with ``seed``) feeds the prior and then the decoder.
    """
    check_size_v2(height, width, getattr(decoder, "size_multiple", DECODER_SIZE_MULTIPLE))
    if generator is None:
        generator = cpu_generator(seed)
    prior_latent = sample_prior_v2(prior, prior_text, latent_size=prior_latent_size(height, width),
                                   generator=generator, settings=prior_settings, callback=prior_callback)
    image_embeddings = v2_effnet_to_raw(prior_latent)
    decoder_latent = sample_decoder_v2(decoder, image_embeddings, decoder_text, generator=generator,
                                       settings=decoder_settings, callback=decoder_callback)
    return V2Result(prior_latent, image_embeddings, decoder_latent, decode_v2(stage_a, decoder_latent))
