"""What a request may ask for, checked before any work starts, and what a run reports when it breaks.

Every entry point (the library's :mod:`~wuerstchen.pipeline.stages` and :class:`~wuerstchen.pipeline.cascade.Cascade`,
the CLI, the ComfyUI nodes) asks the same functions here, so a setting is refused with the same
one-line reason everywhere:

* numbers: settings must be finite and in range (:func:`check_number`, :func:`check_sampling`);
  ``steps`` and ``batch`` have hard caps (:data:`MAX_STEPS`, :data:`MAX_BATCH`);
* memory: :func:`estimate` is the one estimate of what a request needs (activations of each stage
  on the compute device, latents and pixels in RAM) and :func:`check_memory` refuses a request
  that cannot fit, saying how much it needs and how much is there;
* results: :func:`check_finite` raises :class:`NonFiniteError` naming the stage whose output holds
  NaN or inf, and what to try.

The memory estimate is a deliberate *lower* bound (the activation factors were measured with
``bench/activation_memory.py``): a request is refused only when it certainly cannot fit, never
because the estimate guessed high.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..models.configs import EFFNET_COMPRESSION, OFFICIAL_COMPRESSION

MIN_SIDE = 64
"""Smallest output side in pixels (one Stage C latent cell is ~43 pixels)."""
MAX_SIDE = 8192
"""Largest output side in pixels; Stage B alone needs tens of GB beyond it."""
MAX_BATCH = 64
"""Most images per run: every image of a batch is in memory at once; run again for more."""
MAX_STEPS = 1000
"""Most sampling steps: the official recipe uses 20 (Stage C) and 10 (Stage B); far beyond 100
the result no longer changes, and a million steps would run for weeks."""
MAX_IMAGE_PIXELS = 100_000_000
"""Largest input image read from a file (100 megapixels, 1.2 GB as float RGB); larger files are
refused before they are decoded (decompression bombs)."""

STAGE_C_ACTIVATIONS = 12
STAGE_B_ACTIVATIONS = 12
STAGE_A_ACTIVATIONS = 10
"""Activation memory of one model call, in units of (rows x tokens x width x element size) at the
level where that product is largest. ``bench/activation_memory.py`` measured 16.6-21.6 (Stage C),
14.6-18.3 (Stage B) and 13.6-17.5 (Stage A decode) on the CPU in fp32 and bf16; these are kept
below, so the estimate stays a lower bound on other devices and kernels."""
SAMPLING_LATENTS = 6
"""float32 latent-sized tensors a sampling loop holds at once (x, x0, eps, noise, the CFG pair)."""

UNITS = ("bytes", "KB", "MB", "GB", "TB", "PB")


class RequestError(ValueError):
    """A request that cannot be run as asked: a setting out of range, or more memory than there is.
    Raised before any work; the message is one line naming the input and what to do."""


class NonFiniteError(ValueError):
    """A stage produced NaN or inf values; ``stage`` names it (e.g. "Stage C")."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


# --------------------------------------------------------------------------------------------
# Numbers


def _official(value) -> str:
    return f" (official: {value:g})" if isinstance(value, (int, float)) else ""


def check_number(value, name: str, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
                 above: Optional[float] = None, integer: bool = False, official=None, hint: str = ""):
    """``value`` as a float (an int with ``integer``) if it is finite and within the bounds, else a
    :class:`RequestError` naming ``name``, the bounds, the official value and ``hint``."""
    want = "a whole number" if integer else "a finite number"
    bounds = []
    if above is not None:
        bounds.append(f"above {above:g}")
    if minimum is not None:
        bounds.append(f"at least {minimum:g}")
    if maximum is not None:
        bounds.append(f"at most {maximum:g}")
    requirement = want + (" " + " and ".join(bounds) if bounds else "")
    tail = _official(official) + (f"; {hint}" if hint else "")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be {requirement}, got {value!r}{tail}") from None
    ok = math.isfinite(number) and (not integer or number == int(number))
    ok = ok and (above is None or number > above) and (minimum is None or number >= minimum)
    ok = ok and (maximum is None or number <= maximum)
    if not ok:
        shown = int(number) if integer and math.isfinite(number) and number == int(number) else value
        raise RequestError(f"{name} must be {requirement}, got {shown!r}{tail}")
    return int(number) if integer else number


def _exceeds(value, maximum: float) -> bool:
    try:
        return float(value) > maximum
    except (TypeError, ValueError):
        return False


def check_steps(steps, name: str = "steps", official=None) -> int:
    hint = "far beyond 100 steps the result no longer changes, only the time it takes" if _exceeds(steps, MAX_STEPS) else ""
    return check_number(steps, name, minimum=1, maximum=MAX_STEPS, integer=True, official=official, hint=hint)


def check_batch(batch, name: str = "batch") -> int:
    hint = "every image of a batch is in memory at once; for more images, run again" if _exceeds(batch, MAX_BATCH) else ""
    return check_number(batch, name, minimum=1, maximum=MAX_BATCH, integer=True, hint=hint)


def check_compression(compression, name: str = "compression") -> float:
    return check_number(compression, name, above=0, official=OFFICIAL_COMPRESSION,
                        hint="pixels per Stage C latent cell")


def check_sampling(stage: str, *, steps, cfg, shift, cfg_rho, sampler: str, denoise=1.0,
                   official: Optional[Mapping[str, float]] = None,
                   names: Optional[Mapping[str, str]] = None) -> None:
    """Refuse sampler settings of ``stage`` ("Stage C") that cannot run or mean nothing: steps outside
    1..MAX_STEPS, non-finite cfg, shift <= 0, cfg_rho outside [0, 1], denoise outside (0, 1], an
    unknown sampler. ``names`` maps a setting to what the caller calls it (a CLI flag)."""
    from ..sampling.samplers import SAMPLERS

    official = official or {}
    names = dict(names or {})

    def name(key):
        return names.get(key, f"{stage} {key}")

    check_steps(steps, name("steps"), official.get("steps"))
    check_number(cfg, name("cfg"), official=official.get("cfg"))
    check_number(shift, name("shift"), above=0, official=official.get("shift"),
                 hint="the schedule is shifted by log(1/shift)")
    check_number(cfg_rho, name("cfg_rho"), minimum=0, maximum=1, official=official.get("cfg_rho"))
    check_number(denoise, name("denoise"), above=0, maximum=1, official=official.get("denoise"),
                 hint="1 samples from noise, less keeps that much of the input image")
    if sampler not in SAMPLERS:
        raise RequestError(f"{name('sampler')} must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def check_size(height, width, where: str = "size") -> Tuple[int, int]:
    """Output sizes the cascade can make: whole numbers from MIN_SIDE to MAX_SIDE pixels per side."""
    for side, value in (("height", height), ("width", width)):
        check_number(value, f"{where}: {side}", integer=True)
    height, width = int(height), int(width)
    if height < MIN_SIDE or width < MIN_SIDE:
        raise RequestError(f"{where}: {width}x{height} is too small; use at least {MIN_SIDE} pixels per side "
                           "(1024x1024 is what the models were trained for)")
    if height > MAX_SIDE or width > MAX_SIDE:
        raise RequestError(f"{where}: {width}x{height} is too large; at most {MAX_SIDE} pixels per side")
    return height, width


def check_images(images: torch.Tensor, what: str, keep_grey: bool = False) -> torch.Tensor:
    """Images as the core takes them, float [B, 3, H, W]: a batch dimension is added to [C, H, W],
    one grey channel is repeated (kept with ``keep_grey``), alpha dropped, uint8 divided by 255.
    Empty or non-finite images and other layouts are refused, naming ``what``."""
    if not isinstance(images, torch.Tensor):
        raise RequestError(f"{what}: expected an image tensor [B, 3, H, W], got {type(images).__name__}")
    x = images
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3, 4):
        raise RequestError(f"{what}: expected images [B, 3, H, W] (1 grey or 4 RGBA channels also work), "
                           f"got shape {list(images.shape)}")
    if x.numel() == 0:
        raise RequestError(f"{what}: the image is empty (shape {list(images.shape)})")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise RequestError(f"{what}: images must be float in [0, 1] or uint8, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise RequestError(f"{what}: the image holds NaN or inf values")
    if x.shape[1] == 1:
        return x.float() if keep_grey else x.float().expand(-1, 3, -1, -1)
    return x[:, :3].float()


def check_masks(mask: torch.Tensor, what: str) -> torch.Tensor:
    """A mask as [B, 1, H, W] float from [H, W], [B, H, W], [B, 1, H, W] or [B, H, W, 1]; empty or
    non-finite masks and other layouts are refused, naming ``what``."""
    if not isinstance(mask, torch.Tensor):
        raise RequestError(f"{what}: expected a mask tensor [B, H, W], got {type(mask).__name__}")
    m = mask
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    elif m.dim() == 4 and m.shape[1] != 1 and m.shape[-1] == 1:
        m = m.permute(0, 3, 1, 2)
    if m.dim() != 4 or m.shape[1] != 1:
        raise RequestError(f"{what}: expected a mask [B, H, W] (or [H, W], [B, 1, H, W]), got shape "
                           f"{list(mask.shape)}")
    if m.numel() == 0:
        raise RequestError(f"{what}: the mask is empty (shape {list(mask.shape)})")
    if not (m.is_floating_point() or m.dtype in (torch.uint8, torch.bool)):
        raise RequestError(f"{what}: masks must be float in [0, 1], got {m.dtype}")
    m = m.float() / 255.0 if m.dtype == torch.uint8 else m.float()
    if not bool(torch.isfinite(m).all()):
        raise RequestError(f"{what}: the mask holds NaN or inf values")
    return m


def match_batches(images: torch.Tensor, masks: torch.Tensor, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images and masks of the same batch size: one of either serves every one of the other;
    other counts are refused (no mask is silently dropped)."""
    b_img, b_mask = images.shape[0], masks.shape[0]
    if b_img == b_mask:
        return images, masks
    if b_mask == 1:
        return images, masks.expand(b_img, -1, -1, -1)
    if b_img == 1:
        return images.expand(b_mask, -1, -1, -1), masks
    raise RequestError(f"{what}: {b_mask} masks for {b_img} images; give one mask for all images, one image "
                       "for all masks, or as many masks as images")


# --------------------------------------------------------------------------------------------
# Devices


def check_device(spec: Optional[str], name: str = "device") -> Optional[torch.device]:
    """A device the user named, if this machine has it (None stays None: the best available)."""
    if spec is None or spec == "":
        return None
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise RequestError(f"{name} {spec!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RequestError(f"{name} {spec!r}: CUDA is not available here (no NVIDIA GPU or driver, or a "
                               "CPU-only torch); use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RequestError(f"{name} {spec!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RequestError(f"{name} {spec!r}: Apple's MPS is not available here; use cpu")
    elif device.type != "cpu":
        raise RequestError(f"{name} {spec!r}: only cpu, cuda and mps devices are supported")
    return device


def physical_memory() -> Optional[int]:
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(device: torch.device | str) -> Optional[int]:
    """Total bytes of memory ``device`` has (RAM for cpu and mps), or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.get_device_properties(device).total_memory)
        except (RuntimeError, AssertionError):
            return None
    if device.type in ("cpu", "mps"):
        return physical_memory()
    return None


# --------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class Need:
    """Memory one part of a request needs at once: ``what`` (e.g. "Stage C sampling"), bytes, and
    where: on the compute device or in RAM (``on_host``)."""

    what: str
    nbytes: int
    on_host: bool = False


@dataclass(frozen=True)
class UNetProfile:
    """What a Stage B/C U-Net's activation memory depends on: its patch size and, per level, its
    width and how many latent cells one of its tokens covers."""

    patch: int
    levels: Tuple[Tuple[int, int], ...]  # (width, cells per token relative to the patched latent)

    def widest(self, cells: int) -> int:
        """Largest tokens x width over the levels for a latent of ``cells`` cells."""
        tokens = cells / (self.patch ** 2)
        return int(max(tokens / area * width for width, area in self.levels))


def unet_profile(model: nn.Module) -> Optional[UNetProfile]:
    """The :class:`UNetProfile` of a StageB/StageC module, read from its modules (the first ResBlock
    of each level, and whether each level change resamples); None for a module of another build."""
    from ..models.blocks import ResBlock, UpDownBlock2d

    if not all(hasattr(model, name) for name in ("embedding", "down_blocks", "down_downscalers")):
        return None

    patch = int(getattr(model.embedding[0], "downscale_factor", 1))
    levels, area = [], 1
    for level, downscaler in zip(model.down_blocks, model.down_downscalers):
        for module in downscaler.modules() if isinstance(downscaler, nn.Module) else ():
            if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
                area *= module.stride[0] * module.stride[1]
            elif isinstance(module, UpDownBlock2d) and module.enabled:
                area *= 4
        widths = [b.depthwise.in_channels for b in level if isinstance(b, ResBlock)]
        levels.append((max(widths) if widths else 0, area))
    return UNetProfile(patch, tuple(levels))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sampling_need(what: str, profile: UNetProfile, batch: int, latent: Tuple[int, int], channels: int,
                  guided: bool, dtype: torch.dtype, factor: int) -> Need:
    """Activations of one model call of a sampling stage plus the loop's float32 latents."""
    rows = batch * (2 if guided else 1)
    cells = int(latent[0]) * int(latent[1])
    activations = factor * rows * profile.widest(cells) * _element_size(dtype)
    latents = SAMPLING_LATENTS * rows * channels * cells * 4
    return Need(what, activations + latents)


def estimate(*, batch: int, size: Optional[Tuple[int, int]] = None,
             stage_c: Optional[Tuple[nn.Module, Tuple[int, int], bool]] = None,
             stage_b: Optional[Tuple[nn.Module, Tuple[int, int], bool]] = None,
             stage_a: Optional[Tuple[nn.Module, Tuple[int, int], int]] = None,
             semantic: Optional[Tuple[int, int]] = None,
             dtype: Optional[torch.dtype] = None) -> List[Need]:
    """The memory a request needs, part by part (the one estimate every entry point uses).

    ``stage_c`` / ``stage_b``: (model, latent (h, w), guided: cfg != 1) of a sampling stage;
    ``stage_a``: (model, Stage B latent (h, w), tile: 0 = in one piece) of a decode or encode; ``size``:
    the output pixels (H, W); ``semantic``: the Stage C latent an image is encoded to (its input is
    resized to 32x that). ``dtype`` is the weights' (default: the model's). Models may live on the
    meta device: only their shapes are read.
    """
    needs: List[Need] = []
    for stage, part, factor in (("Stage C", stage_c, STAGE_C_ACTIVATIONS), ("Stage B", stage_b, STAGE_B_ACTIVATIONS)):
        if part is None:
            continue
        model, latent, guided = part
        profile = unet_profile(model)
        if profile is None:  # not a Stage B/C build: nothing known about its activations
            continue
        channels = model.embedding[1].in_channels // (profile.patch ** 2)
        needs.append(sampling_need(f"{stage} sampling", profile, batch, latent, channels, guided,
                                   dtype or next(model.parameters()).dtype, factor))
        # the start noise, the result and its copy on the way back live in RAM as float32
        needs.append(Need(f"{stage} latents", 3 * batch * channels * latent[0] * latent[1] * 4, on_host=True))
    if stage_a is not None and hasattr(stage_a[0], "in_block"):
        model, latent, tile = stage_a
        h, w = (min(latent[0], tile), min(latent[1], tile)) if tile else latent
        width = model.in_block[1].out_channels  # the widest level runs at twice the latent's resolution
        needs.append(Need("Stage A (the VQGAN)", STAGE_A_ACTIVATIONS * batch * 4 * h * w * width *
                          _element_size(dtype or next(model.parameters()).dtype)))
    if size is not None:
        needs.append(Need("the images", 3 * batch * 3 * int(size[0]) * int(size[1]) * 4, on_host=True))
    if semantic is not None:
        cells = semantic[0] * semantic[1] * EFFNET_COMPRESSION ** 2
        needs.append(Need("the image resized for the semantic encoder", 2 * batch * 3 * cells * 4, on_host=True))
    return needs


def format_bytes(n: float) -> str:
    for unit in UNITS:
        if n < 1000 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_memory(needs: Iterable[Need], device: torch.device | str, where: str, lever: str = "") -> None:
    """Refuse a request one of whose parts needs more memory than the machine has.

    Parts on the compute device are compared with ``device``'s total memory, parts in RAM with the
    machine's. ``where`` says what was asked (e.g. "1024x1024, batch 1, compression 0.01");
    ``lever`` what the user can lower.
    """
    device = torch.device(device)
    worst = None
    for need in needs:
        target = torch.device("cpu") if need.on_host else device
        have = device_memory(target)
        if have is None or need.nbytes <= have:
            continue
        ratio = need.nbytes / have
        if worst is None or ratio > worst[0]:
            worst = (ratio, need, have, target)
    if worst is None:
        return
    ratio, need, have, target = worst
    place = "RAM" if target.type in ("cpu", "mps") else f"memory on {target}"
    lever = lever or "lower the size or the batch"
    raise RequestError(f"{where}: {need.what} needs at least {format_bytes(need.nbytes)}, more than the "
                       f"{format_bytes(have)} of {place} here; {lever} (by a factor of about "
                       f"{math.ceil(ratio)})")


# --------------------------------------------------------------------------------------------
# Results


def nonfinite_advice(dtype: Optional[torch.dtype], fp16_guard: bool = False) -> str:
    """What to try when a model's output is not finite, by the dtype its weights are in."""
    if dtype == torch.float16 and not fp16_guard:
        return ("float16 overflowed: load the models in bf16 or fp32 (CLI --dtype, the loader's dtype), or turn "
                "the model's fp16_guard on (the model manager does for Stage B and C)")
    if dtype == torch.float16:
        return "float16 overflowed even with the fp16 guard: load the models in bf16 or fp32"
    tail = "; or try fp32" if dtype not in (None, torch.float32) else ""
    return ("check the settings (cfg, LoRA strengths, prompt weights) and the model file, which may hold NaN/inf "
            "weights" + tail)


def check_finite(x: torch.Tensor, stage: str, dtype: Optional[torch.dtype] = None,
                 step: Optional[Tuple[int, int]] = None, advice: str = "", fp16_guard: bool = False) -> None:
    """Raise :class:`NonFiniteError` if ``x`` (what ``stage`` produced) holds NaN or inf."""
    if bool(torch.isfinite(x).all()):
        return
    at = f" at step {step[0]} of {step[1]}" if step else ""
    held = f" with {str(dtype).replace('torch.', '')} weights" if dtype is not None else ""
    advice = advice or nonfinite_advice(dtype, fp16_guard)
    raise NonFiniteError(f"{stage} produced NaN or inf values{at}{held}: {advice}", stage)


def check_finite_input(x: torch.Tensor, what: str, advice: str) -> None:
    """Raise :class:`NonFiniteError` if ``x``, an input a stage was given (``what``), holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} holds NaN or inf values: {advice}", what)


def finite_callback(stage: str, dtype: Optional[torch.dtype],
                    callback: Optional[Callable[[int, int, torch.Tensor], None]],
                    fp16_guard: bool = False) -> Callable[[int, int, torch.Tensor], None]:
    """A sampling callback that first stops the run at the first step whose x0 is not finite."""

    def step(i: int, n: int, x0: torch.Tensor) -> None:
        check_finite(x0, stage, dtype, (i, n), fp16_guard=fp16_guard)
        if callback is not None:
            callback(i, n, x0)

    return step


__all__ = [
    "MAX_BATCH", "MAX_IMAGE_PIXELS", "MAX_SIDE", "MAX_STEPS", "MIN_SIDE", "Need", "NonFiniteError",
    "RequestError", "UNetProfile", "check_batch", "check_compression", "check_device", "check_finite",
    "check_finite_input", "check_images", "check_masks", "check_memory", "check_number", "check_sampling", "check_size",
    "check_steps", "device_memory", "estimate", "finite_callback", "format_bytes", "match_batches",
    "nonfinite_advice", "unet_profile",
]
