"""The Stable Cascade cascade as plain functions (used by the ComfyUI nodes) and one class (CLI).

Stage C samples a 16-channel semantic latent from text, Stage B samples the 4-channel VQGAN
latent conditioned on it, Stage A decodes pixels. Defaults are the official notebook's: 1024²,
Stage C 20 steps cfg 4 shift 2, Stage B 10 steps cfg 1.1 shift 1, DDPM with cfg_rho 0.7, and the
last step's x0 as each stage's result. Noise is drawn on a CPU generator so a seed gives the same
image on every device. Images are [B, 3, H, W] in [0, 1] throughout.

LoRAs (:class:`LoraUse`) are applied for the duration of a call, on Stage C while it samples and on
CLIP-G while it encodes prompts, and undone exactly afterwards; ControlNet hints
(:class:`~wuerstchen.pipeline.control.Hint`) reach Stage C as its official ``cnet`` input at the steps of
their range.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs import limits
from ..sampling import samplers as sampling
from ..models.configs import STAGE_B as _STAGE_B_CONFIGS
from ..models.configs import EFFNET_COMPRESSION, OFFICIAL_COMPRESSION, STAGE_B_COMPRESSION  # noqa: F401 (also read from here)
from .semantic import encode_semantic, model_param as _model_param, semantic_input, stage_c_latent_size  # noqa: F401
from .control import ControlSchedule, Hint, check_fits
from ..sampling.schedule import img2img_steps

STAGE_B_PATCH = _STAGE_B_CONFIGS["full"]["patch_size"]  # Stage B latent sides are multiples of this
STAGE_A_SCALE = 0.43
AUTO_TILE_CELLS = 192 * 192  # Stage B latents larger than this are decoded in tiles by default
AUTO_TILE = 128

ProgressFn = Callable[[int, int, torch.Tensor], None]


class _Settings:
    """Sampler settings that refuse, on construction and before each run, values that cannot run
    (see :func:`wuerstchen.inputs.limits.check_sampling`); the defaults are the official values."""

    STAGE = ""

    def __post_init__(self):
        self.check()

    def check(self, names=None) -> None:
        """Raise :class:`~wuerstchen.inputs.limits.RequestError` naming the first unusable setting;
        ``names`` maps a setting to what the caller calls it (e.g. a CLI flag)."""
        official = {f.name: f.default for f in fields(self)}
        limits.check_sampling(self.STAGE, steps=self.steps, cfg=self.cfg, shift=self.shift, cfg_rho=self.cfg_rho,
                              sampler=self.sampler, denoise=getattr(self, "denoise", 1.0), official=official,
                              names=names)


@dataclass
class StageCSettings(_Settings):
    STAGE = "Stage C"
    steps: int = 20
    cfg: float = 4.0
    shift: float = 2.0
    sampler: str = "ddpm"
    cfg_rho: float = 0.7
    denoise: float = 1.0

    def steps_to_run(self, img2img: bool) -> int:
        """Steps a run takes: all of them, or int(steps * denoise) for img2img (official)."""
        return img2img_steps(self.steps, self.denoise) if img2img and self.denoise < 1.0 else self.steps


@dataclass
class StageBSettings(_Settings):
    STAGE = "Stage B"
    steps: int = 10
    cfg: float = 1.1
    shift: float = 1.0
    sampler: str = "ddpm"
    cfg_rho: float = 0.7


@dataclass
class Conditioning:
    """Stage C conditioning of one side (positive or negative) of CFG."""

    clip_text: torch.Tensor  # [B, L, 1280], last hidden state before the final LayerNorm
    clip_text_pooled: torch.Tensor  # [B, 1, 1280]
    clip_img: Optional[torch.Tensor] = None  # [B, N, 768]; zeros [B, 1, 768] when absent

    def stage_c_inputs(self, batch: int, c_clip_img: int) -> Dict[str, torch.Tensor]:
        clip_img = self.clip_img
        if clip_img is None:
            clip_img = torch.zeros(self.clip_text.shape[0], 1, c_clip_img, dtype=self.clip_text.dtype)
        return {
            "clip_text": _repeat_to(self.clip_text, batch),
            "clip_text_pooled": _repeat_to(self.clip_text_pooled, batch),
            "clip_img": _repeat_to(clip_img, batch),
        }


def _repeat_to(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"conditioning batch {t.shape[0]} does not divide the latent batch {batch}")
    return t.repeat_interleave(batch // t.shape[0], dim=0)


# --------------------------------------------------------------------------------------------
# LoRAs


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a stack: its parsed file, the strength on Stage C and on the CLIP-G text encoder."""

    file: object  # wuerstchen.lora.LoraFile
    model_strength: float = 1.0
    text_strength: float = 1.0

    def __post_init__(self):
        name = getattr(self.file, "name", "LoRA")
        object.__setattr__(self, "model_strength",
                           limits.check_number(self.model_strength, f"{name}: model strength"))
        object.__setattr__(self, "text_strength", limits.check_number(self.text_strength, f"{name}: text strength"))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model_strength: float = 1.0, text_strength: float = 1.0) -> "LoraUse":
        from ..lora import load_lora

        return cls(load_lora(path), model_strength, text_strength)

    def check(self, stage_c: nn.Module, text_encoder: Optional[nn.Module] = None, who: str = "") -> str:
        """Check the LoRA against the models it will patch, before anything runs, and say what applies.

        Raises :class:`~wuerstchen.lora.LoraError` when nothing of it fits (a LoRA for another model).
        Otherwise logs (``wuerstchen.lora``) and returns one line such as "x.safetensors: applied 704 of
        711 modules; 7 keys not for this model, e.g. …": at INFO level when all of it applies, at
        WARNING when a part is left out (including a text part without a text encoder to take it).
        """
        from ..lora import LoraError, check_lora, describe_match

        lora = self.file
        if not _has_part(lora, "stage_c") and not _has_part(lora, "text"):
            raise LoraError(f"{lora.name} holds no Stage C or CLIP-G weights ({lora.summary()})")
        matches = []
        if _has_part(lora, "stage_c"):
            matches.append(check_lora(stage_c, lora, "stage_c"))
        if text_encoder is not None and _has_part(lora, "text"):
            matches.append(check_lora(text_encoder, lora, "text"))
        summary = describe_match(lora, matches)
        complete = not lora.unused and all(m.matched == m.total for m in matches)
        if text_encoder is None and _has_part(lora, "text"):
            summary, complete = summary + "; its text-encoder part needs the text encoder (clip input)", False
        message = f"{who}: {summary}" if who else summary
        logging.getLogger("wuerstchen.lora").log(logging.INFO if complete else logging.WARNING, "%s", message)
        return summary


def _has_part(lora, part: str) -> bool:
    if part == "stage_c":
        return bool(lora.stage_c or lora.stage_c_indexed)
    return bool(lora.text or lora.embeddings)


@contextlib.contextmanager
def _loras_applied(model: nn.Module, loras: Sequence[LoraUse], part: str) -> Iterator[None]:
    stack = [(use.file, use.model_strength if part == "stage_c" else use.text_strength)
             for use in loras if _has_part(use.file, part)]
    if not stack:
        yield
        return
    from ..lora import apply_loras

    with apply_loras(model, stack, part=part):
        yield


def stage_c_loras(model: nn.Module, loras: Sequence[LoraUse]):
    """Stage C patched with the stack's Stage C parts (model strengths) inside the block, then restored."""
    return _loras_applied(model, loras, "stage_c")


def text_loras(text_encoder: nn.Module, loras: Sequence[LoraUse]):
    """CLIP-G patched with the stack's text parts and learned tokens (text strengths), then restored."""
    return _loras_applied(text_encoder, loras, "text")


# --------------------------------------------------------------------------------------------
# Sizes


def stage_b_latent_size(height: int, width: int, multiple: int = STAGE_B_PATCH) -> Tuple[int, int]:
    """Stage B latent (h, w) for an output size: ceil(side / 4) (official), rounded up to a multiple of
    Stage B's patch size, which its patch embedding needs. Sides that are multiples of 8 pixels are
    exactly side / 4; any other side gets up to 7 more pixels, which :func:`crop_to` removes after
    the decode, so every size from 64 to 8192 works."""
    def side(n: int) -> int:
        return math.ceil(math.ceil(n / STAGE_B_COMPRESSION) / multiple) * multiple

    return side(height), side(width)


def crop_to(images: torch.Tensor, size: Optional[Tuple[int, int]]) -> torch.Tensor:
    """Decoded images cropped to the size they were made for (see :func:`stage_b_latent_size`)."""
    if size is None:
        return images
    return images[..., :int(size[0]), :int(size[1])]


def output_size_from_stage_c(latent_h: int, latent_w: int, compression: float = OFFICIAL_COMPRESSION) -> Tuple[int, int]:
    """Pixel size a Stage C latent stands for (1024 for 24 latent rows at 42.67), a multiple of 4."""
    return (int(latent_h * compression) // 4) * 4, (int(latent_w * compression) // 4) * 4


def output_size(latent_size: Tuple[int, int], made_for: Optional[Tuple[int, int]] = None,
                compression: float = OFFICIAL_COMPRESSION) -> Tuple[int, int]:
    """(H, W) a Stage C latent of ``latent_size`` cells stands for: the size it was made for, if it
    still fits the latent, else the size its cells cover at ``compression``."""
    if made_for is not None and stage_c_latent_size(made_for[0], made_for[1], compression) == tuple(latent_size):
        return int(made_for[0]), int(made_for[1])
    return output_size_from_stage_c(latent_size[0], latent_size[1], compression)


def check_size(height: int, width: int, where: str = "size") -> Tuple[int, int]:
    """Refuse output sizes outside 64..8192 pixels per side (see :func:`wuerstchen.inputs.limits.check_size`)."""
    return limits.check_size(height, width, where)


# --------------------------------------------------------------------------------------------
# Text and image conditioning


@torch.no_grad()
def encode_text(text_encoder: nn.Module, prompts: Sequence[str], loras: Sequence[LoraUse] = (),
                embeddings=None) -> Conditioning:
    """Official CLIP-G conditioning: hidden state before the final LayerNorm, and the pooled token.
    ``loras`` patch the encoder (text strengths, learned tokens) while it encodes; ``embeddings``
    is where ``embedding:NAME`` in a prompt is looked up (folders, a mapping or a resolver; see
    :func:`wuerstchen.text.embeddings.embedding_resolver`)."""
    with text_loras(text_encoder, loras):
        clip_text, clip_text_pooled = text_encoder.encode_prompts(list(prompts), embeddings=embeddings)
    return Conditioning(clip_text.float().cpu(), clip_text_pooled.float().cpu())


@torch.no_grad()
def encode_image_embeds(vision_encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """ViT-L/14 ``image_embeds`` [B, 768] of images [B, 3, H, W] in [0, 1] (official preprocessing)."""
    from ..inputs import preprocess

    images = limits.check_images(images, "image variation reference")
    param = _model_param(vision_encoder)
    channels_last = images.permute(0, 2, 3, 1)  # clip_preprocess reads pictures channels-last
    pixels = preprocess.clip_preprocess_official(channels_last).to(param.device, param.dtype)
    return vision_encoder.encode(pixels).float().cpu()


def _check_conditioning(stage_c: nn.Module, cond: Conditioning, side: str = "positive") -> None:
    """Refuse conditioning whose widths do not fit Stage C (made by another text or image encoder)."""
    text, pooled = stage_c.clip_txt_mapper.in_features, stage_c.clip_txt_pooled_mapper.in_features
    if cond.clip_text.shape[-1] != text or cond.clip_text_pooled.shape[-1] != pooled:
        raise ValueError(f"the conditioning has width {cond.clip_text.shape[-1]} but this Stage C expects {text}: "
                         "encode the prompt with the CLIP-G (ViT-bigG) text encoder")
    image = stage_c.clip_img_mapper.in_features
    if cond.clip_img is not None and cond.clip_img.shape[-1] != image:
        raise ValueError(f"image tokens are {cond.clip_img.shape[-1]} wide, this Stage C expects {image} "
                         "(the ViT-L/14 image encoder)")
    _check_finite_conditioning(cond, side)


def _check_finite_conditioning(cond: Conditioning, side: str) -> None:
    for name, t in (("text", cond.clip_text), ("pooled text", cond.clip_text_pooled), ("image", cond.clip_img)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise limits.RequestError(f"the {side} conditioning's {name} embedding holds NaN or inf values; "
                                      "lower the prompt weights, LoRA text strengths or image strengths that "
                                      "made it")


def with_image_embeds(cond: Conditioning, embeds: torch.Tensor, strengths: Optional[Sequence[float]] = None) -> Conditioning:
    """Add image tokens (one per image, scaled by its strength) to a conditioning, as variations do."""
    embeds = embeds.float()
    if strengths is not None:
        strengths = [limits.check_number(s, "image variation strength", official=1.0) for s in strengths]
        embeds = embeds * torch.tensor(list(strengths), dtype=embeds.dtype)[:, None]
    tokens = embeds.unsqueeze(0).expand(cond.clip_text.shape[0], -1, -1)  # every prompt sees every image
    existing = cond.clip_img
    clip_img = tokens if existing is None else torch.cat([existing, tokens], dim=1)
    return Conditioning(cond.clip_text, cond.clip_text_pooled, clip_img)


# --------------------------------------------------------------------------------------------
# Latents


def cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


def sample_stage_c(
    model: nn.Module,
    cond: Conditioning,
    uncond: Conditioning,
    *,
    shape: Optional[Tuple[int, int, int, int]] = None,
    init_latent: Optional[torch.Tensor] = None,
    seed: int = 0,
    settings: StageCSettings = StageCSettings(),
    loras: Sequence[LoraUse] = (),
    control: Sequence[Hint] = (),
    callback: Optional[ProgressFn] = None,
) -> torch.Tensor:
    """Sample a Stage C latent. ``init_latent`` with ``settings.denoise`` < 1 is the official img2img.

    ``loras`` patch Stage C for this call only. Each ControlNet hint in ``control`` runs once and its
    maps reach Stage C as ``cnet`` at the steps of its range, counted in the steps this run takes.

    Everything is checked before the first model call (settings, conditioning, ControlNet widths,
    the memory the run needs: :class:`~wuerstchen.inputs.limits.RequestError`); a step whose result is
    not finite stops the run with :class:`~wuerstchen.inputs.limits.NonFiniteError`.
    """
    settings.check()
    for side, c in (("positive", cond), ("negative", uncond)):
        _check_conditioning(model, c, side)
    param = _model_param(model)
    img2img = init_latent is not None and settings.denoise < 1.0
    if shape is None and init_latent is None:
        raise ValueError("sample_stage_c needs a latent shape or an init_latent")
    shape = tuple(init_latent.shape) if img2img or shape is None else tuple(shape)
    _check_latent_shape(model, shape, "Stage C latent")
    if init_latent is not None and img2img:
        limits.check_finite_input(init_latent, "the img2img Stage C latent", "encode the image again")
    batch = limits.check_batch(shape[0], "batch")
    for hint in control:
        check_fits(hint.net, model)
    limits.check_memory(limits.estimate(batch=batch, stage_c=(model, shape[-2:], settings.cfg != 1)), param.device,
                        f"Stage C with a {shape[-1]}x{shape[-2]} latent, batch {batch}",
                        "lower the size or the batch, or raise the compression")
    generator = cpu_generator(seed)
    c_clip_img = model.clip_img_mapper.in_features
    if img2img:
        t_start = float(settings.denoise)
        steps = img2img_steps(settings.steps, t_start)
        x_init = sampling.noise_to(init_latent.float(), t_start, generator=generator)
    else:
        t_start, steps = 1.0, settings.steps
        x_init = torch.randn(shape, generator=generator)
    device = param.device
    cond_in = cond.stage_c_inputs(batch, c_clip_img)
    uncond_in = uncond.stage_c_inputs(batch, c_clip_img)
    _match_token_counts(cond_in, uncond_in)
    cond_in, uncond_in = _to(cond_in, device), _to(uncond_in, device)
    if control:
        cond_in["cnet"] = ControlSchedule(control, batch)  # shared by both CFG halves, as officially
    with stage_c_loras(model, loras):
        x0 = sampling.sample(
            model, x_init.to(device), cond_in, uncond_in, steps=steps, cfg=settings.cfg, shift=settings.shift,
            cfg_rho=settings.cfg_rho, t_start=t_start, sampler=settings.sampler, generator=generator,
            callback=_finite_steps("Stage C", model, callback),
        )
    return x0.float().cpu()


def _check_latent_shape(model: nn.Module, shape: Sequence[int], what: str) -> None:
    if len(shape) != 4 or min(shape) < 1:
        raise limits.RequestError(f"the {what} must be [batch, channels, height, width] with every side at least 1, "
                                  f"got {list(shape)}")
    if not hasattr(model, "embedding"):  # another build of the model: its forward checks the rest
        return
    patch = model.embedding[0].downscale_factor
    channels = model.embedding[1].in_channels // (patch ** 2)
    if shape[1] != channels:
        raise limits.RequestError(f"the {what} must be [batch, {channels}, height, width], got {list(shape)}")
    if shape[2] % patch or shape[3] % patch:
        raise limits.RequestError(f"the {what} is {shape[3]}x{shape[2]}; this model needs sides that are multiples "
                                  f"of {patch}")


def _finite_steps(stage: str, model: nn.Module, callback: Optional[ProgressFn]) -> ProgressFn:
    """``callback`` behind a check that stops sampling at the first step whose x0 is not finite."""
    dtype = _model_param(model).dtype
    guard = bool(getattr(model, "fp16_guard", False))
    return limits.finite_callback(stage, dtype, callback, fp16_guard=guard)


def _match_token_counts(cond: Dict[str, torch.Tensor], uncond: Dict[str, torch.Tensor]) -> None:
    """CFG runs both sides in one batch: pad the shorter token sequence (long prompts, image tokens)."""
    for key in ("clip_text", "clip_img"):
        a, b = cond[key], uncond[key]
        if a.shape[1] == b.shape[1]:
            continue
        if key == "clip_img":  # zero image tokens are what "no image" means officially
            n = max(a.shape[1], b.shape[1])
            cond[key], uncond[key] = pad_tokens(a, n), pad_tokens(b, n)
        else:  # repeat the shorter text encoding's windows, as ComfyUI does for long prompts
            n = max(a.shape[1], b.shape[1])
            cond[key], uncond[key] = repeat_tokens(a, n), repeat_tokens(b, n)


def pad_tokens(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[1] == n:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1], t.shape[2])], dim=1)


def repeat_tokens(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[1] == n:
        return t
    reps = math.ceil(n / t.shape[1])
    return t.repeat(1, reps, 1)[:, :n]


def _to(inputs: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def sample_stage_b(
    model: nn.Module,
    stage_c_latent: torch.Tensor,
    pooled: torch.Tensor,
    pooled_uncond: torch.Tensor,
    *,
    size: Tuple[int, int],
    seed: int = 0,
    settings: StageBSettings = StageBSettings(),
    callback: Optional[ProgressFn] = None,
) -> torch.Tensor:
    """Sample the Stage B latent [B, 4, h, w] (official scale) for output ``size`` (H, W); h and w
    are :func:`stage_b_latent_size`: H/4 and W/4, rounded up to even sides (crop the decoded image
    to ``size`` with :func:`crop_to`). Checked before the first model call, stopped at the first
    step whose result is not finite, like :func:`sample_stage_c`."""
    settings.check()
    height, width_px = limits.check_size(size[0], size[1], "Stage B output size")
    width = model.clip_mapper.in_features
    for p in (pooled, pooled_uncond):
        if p.shape[-1] != width:
            raise ValueError(f"pooled text embedding is {p.shape[-1]} wide, Stage B expects {width}")
        if not bool(torch.isfinite(p).all()):
            raise limits.RequestError("the pooled text embedding holds NaN or inf values; lower the prompt weights "
                                      "or LoRA text strengths that made it")
    if stage_c_latent.dim() != 4 or stage_c_latent.numel() == 0:
        raise limits.RequestError(f"the Stage C latent must be [batch, 16, h, w], got {list(stage_c_latent.shape)}")
    limits.check_finite_input(stage_c_latent, "the Stage C latent given to Stage B",
                              "the stage that made it failed; sample Stage C again")
    param = _model_param(model)
    device = param.device
    batch = limits.check_batch(stage_c_latent.shape[0], "batch")
    patch = model.embedding[0].downscale_factor if hasattr(model, "embedding") else STAGE_B_PATCH
    h, w = stage_b_latent_size(height, width_px, patch)
    c_in = model.embedding[1].in_channels // (patch ** 2) if hasattr(model, "embedding") else 4
    limits.check_memory(limits.estimate(batch=batch, stage_b=(model, (h, w), settings.cfg != 1)), device,
                        f"Stage B at {width_px}x{height}, batch {batch}", "lower the size or the batch")
    generator = cpu_generator(seed)
    x_init = torch.randn((batch, c_in, h, w), generator=generator)
    effnet = stage_c_latent.float()
    cond = {"effnet": effnet, "clip": _repeat_to(pooled.float(), batch)}
    uncond = {"effnet": torch.zeros_like(effnet), "clip": _repeat_to(pooled_uncond.float(), batch)}
    x0 = sampling.sample(
        model, x_init.to(device), _to(cond, device), _to(uncond, device), steps=settings.steps, cfg=settings.cfg,
        shift=settings.shift, cfg_rho=settings.cfg_rho, t_start=1.0, sampler=settings.sampler,
        generator=generator, callback=_finite_steps("Stage B", model, callback),
    )
    return x0.float().cpu()


# --------------------------------------------------------------------------------------------
# Pixels


def _tiles(size: int, tile: int, overlap: int) -> List[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def auto_tile(height: int, width: int) -> int:
    """Tile size for decoding a Stage B latent of this size: none up to 192x192 cells (768² pixels)."""
    return AUTO_TILE if height * width > AUTO_TILE_CELLS else 0


@torch.no_grad()
def decode_stage_a(stage_a: nn.Module, latent: torch.Tensor, tile: Optional[int] = 0, overlap: int = 16,
                   callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """VQGAN-decode an official-scale Stage B latent to images [B, 3, H, W] in [0, 1].

    ``tile`` > 0 decodes latent tiles of that size with ``overlap`` and blends them linearly,
    so memory stays bounded for large images (the decoder's receptive field is small); None picks
    :func:`auto_tile`, 0 decodes in one piece. A latent or a result holding NaN/inf raises
    :class:`~wuerstchen.inputs.limits.NonFiniteError`.
    """
    param = _model_param(stage_a)
    if latent.dim() != 4 or latent.numel() == 0 or latent.shape[1] != stage_a.c_latent:
        raise limits.RequestError(f"the Stage B latent must be [batch, {stage_a.c_latent}, h, w], got "
                                  f"{list(latent.shape)}")
    limits.check_finite_input(latent, "the Stage B latent given to Stage A",
                              "the stage that made it failed; sample Stage B again")
    b, _, h, w = latent.shape
    if tile is None:
        tile = auto_tile(h, w)
    limits.check_memory(limits.estimate(batch=b, stage_a=(stage_a, (h, w), max(tile, 0)), size=(4 * h, 4 * w)),
                        param.device, f"Stage A decode of a {w}x{h} latent, batch {b}",
                        "lower the size or the batch, or decode in smaller tiles")
    x = latent.to(param.device, param.dtype)
    if tile <= 0 or (h <= tile and w <= tile):
        out = stage_a.decode(x).float()
        _check_decoded(out, param.dtype)
        out = out.clamp(0, 1).cpu()
        if callback:
            callback(1, 1)
        return out
    overlap = min(overlap, tile // 2)
    ys, xs = _tiles(h, tile, overlap), _tiles(w, tile, overlap)
    scale = None
    out = weight = None
    total, done = len(ys) * len(xs), 0
    for y0 in ys:
        for x0 in xs:
            part = stage_a.decode(x[:, :, y0:y0 + tile, x0:x0 + tile]).float().cpu()
            _check_decoded(part, param.dtype)
            if out is None:
                scale = part.shape[-1] // min(tile, w)
                out = torch.zeros(b, part.shape[1], h * scale, w * scale)
                weight = torch.zeros(1, 1, h * scale, w * scale)
            ph, pw = part.shape[-2:]
            mask = _blend_mask(ph, pw, overlap * scale, top=y0 > 0, left=x0 > 0,
                               bottom=y0 + tile < h, right=x0 + tile < w)
            out[:, :, y0 * scale:y0 * scale + ph, x0 * scale:x0 * scale + pw] += part * mask
            weight[:, :, y0 * scale:y0 * scale + ph, x0 * scale:x0 * scale + pw] += mask
            done += 1
            if callback:
                callback(done, total)
    return (out / weight.clamp_min(1e-8)).clamp(0, 1)


def _check_decoded(images: torch.Tensor, dtype: torch.dtype) -> None:
    limits.check_finite(images, "Stage A decode", dtype)


def _blend_mask(h: int, w: int, ramp: int, *, top: bool, left: bool, bottom: bool, right: bool) -> torch.Tensor:
    def axis(n, start, end):
        m = torch.ones(n)
        if ramp > 0:
            r = torch.linspace(0, 1, ramp + 2)[1:-1]
            if start:
                m[:ramp] = r
            if end:
                m[-ramp:] = r.flip(0)
        return m

    return (axis(h, top, bottom)[:, None] * axis(w, left, right)[None, :])[None, None]


@torch.no_grad()
def encode_stage_a(stage_a: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> official-scale Stage B latent (unquantized, as the official
    pipeline). Sizes are cropped to a multiple of 4, the VQGAN's compression."""
    images = limits.check_images(images, "Stage A encode image")
    h, w = (images.shape[-2] // STAGE_B_COMPRESSION) * STAGE_B_COMPRESSION, (images.shape[-1] // STAGE_B_COMPRESSION) * STAGE_B_COMPRESSION
    if h == 0 or w == 0:
        raise limits.RequestError(f"image of {images.shape[-1]}x{images.shape[-2]} is too small for Stage A; it "
                                  f"needs at least {STAGE_B_COMPRESSION} pixels per side")
    param = _model_param(stage_a)
    batch = limits.check_batch(images.shape[0], "Stage A encode batch")
    limits.check_memory(limits.estimate(batch=batch, stage_a=(stage_a, (h // 4, w // 4), 0)), param.device,
                        f"Stage A encode of {w}x{h} images, batch {batch}", "encode smaller images")
    x = images[:, :, :h, :w].to(param.device, param.dtype)
    latent = stage_a.encode(x, quantize=False)[0].float()
    limits.check_finite(latent, "Stage A encode", param.dtype)
    return latent.cpu()


@torch.no_grad()
def preview_stage_c(previewer: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """Stage C latent -> small RGB preview [B, 3, 8h, 8w] in [0, 1]."""
    param = _model_param(previewer)
    return previewer(latent.to(param.device, param.dtype)).float().clamp(0, 1).cpu()


@torch.no_grad()
def preview_x0(x0: torch.Tensor, previewer: Optional[nn.Module] = None) -> torch.Tensor:
    """Live preview [1, 3, 8h, 8w] in [0, 1] of the first latent of a sampling step's x0: the
    previewer model when given, else :func:`latent_rgb_preview` (nearest-upscaled to match)."""
    if previewer is not None:
        return preview_stage_c(previewer, x0[:1])
    return F.interpolate(latent_rgb_preview(x0[:1].float().cpu()), scale_factor=8, mode="nearest")


def latent_rgb_preview(latent: torch.Tensor) -> torch.Tensor:
    """A model-free preview of a latent when no previewer is loaded: three fixed channel mixes,
    normalised per image. Crude, but it shows composition while Stage C runs."""
    x = latent.float()
    c = x.shape[1]
    idx = torch.arange(c, dtype=torch.float32)
    mix = torch.stack([torch.cos(idx * 0.9), torch.cos(idx * 0.9 + 2.1), torch.cos(idx * 0.9 + 4.2)])  # [3, C]
    rgb = torch.einsum("rc,bchw->brhw", mix, x)
    lo = rgb.amin(dim=(1, 2, 3), keepdim=True)
    hi = rgb.amax(dim=(1, 2, 3), keepdim=True)
    return ((rgb - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
