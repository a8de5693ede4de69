"""ControlNet hints for Stage C: the official input recipes, strength, step ranges and chaining.

The released ControlNets were trained on inputs made by the official filters
(Stability-AI/StableCascade ``modules/controlnet.py``); these recipes rebuild those inputs from an
image the user gives (images are [B, 3, H, W] in [0, 1], masks [B, 1, H, W], 1 = repaint):

* ``canny`` (1 channel): the official CannyFilter. The image is resized to 224x224 (bilinear),
  quantised to 8 bits, run through OpenCV's Canny (thresholds 100/200, 3x3 Sobel, L1 gradient,
  on all three colour channels) and the 0/1 edges are resized back (bilinear). :func:`canny_edges`
  is that detector written in torch with OpenCV's integer arithmetic. An image that already *is* an
  edge map (grey and black/white, e.g. from ComfyUI's Canny node or a line drawing) is used as it is.
* ``inpainting`` (4 channels): the official InpaintFilter with a given mask: the image with the
  masked area set to white, then the mask.
* ``super_resolution`` (16 channels): the official SREffnetFilter, given the low-resolution image:
  its EfficientNet latent (1/32 of its size) upscaled 2x (nearest).

Masks and images pair by batch: one mask serves every image, one image every mask, otherwise
there must be as many of each (:func:`wuerstchen.inputs.limits.match_batches`). A ControlNet injects maps
of one width into given Stage C ResBlocks; :func:`check_fits` refuses a Stage C of another width
(the released ControlNets were made for the full 3.6B Stage C, not the lite one) before sampling.

A hint's step range runs on the sampling clock: with n steps in the run (for img2img, the steps
actually run), step i (from 0) uses the hint when ``start <= i / n < end``; 20 steps with 0 to 0.5
is exactly the first 10. Several hints add their strength-scaled maps at the steps they share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs import limits
from ..models.configs import EFFNET_COMPRESSION
from ..sampling.samplers import StepInput
from .semantic import encode_semantic

KINDS = ("canny", "inpainting", "super_resolution")
CANNY_SIZE = 224  # the official CannyFilter works at 224x224
CANNY_THRESHOLDS = (100, 200)
SR_UPSCALE = 2  # SREffnetFilter's 1 / scale_factor

Maps = List[Optional[torch.Tensor]]


class ControlInputError(ValueError):
    """A hint that lacks an input its ControlNet needs; ``missing`` is ``"mask"`` or ``"effnet"``."""

    def __init__(self, message: str, missing: str):
        super().__init__(message)
        self.missing = missing


def kind_of(config: dict) -> str:
    """Which recipe a ControlNet's input takes, from its config (input channels and bottleneck)."""
    c_in = int(config["c_in"])
    if config.get("bottleneck_mode") == "large" or c_in == 16:
        return "super_resolution"
    kind = {1: "canny", 4: "inpainting", 3: "image"}.get(c_in)
    if kind is None:
        raise ValueError(f"a ControlNet with {c_in} input channels is not supported (the released ones take "
                         "1 (canny), 4 (inpainting) or 16 (super-resolution))")
    return kind


# --------------------------------------------------------------------------------------------
# Canny, as OpenCV computes it


_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # tan(22.5°) in OpenCV's fixed point


def _shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., i, j] = t[..., i + dy, j + dx]``, zero outside (OpenCV's zero magnitude border)."""
    padded = F.pad(t, (1, 1, 1, 1))
    h, w = t.shape[-2:]
    return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def _canny_u8(image: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """OpenCV ``Canny(image, low, high)`` (aperture 3, L1) of int images [B, C, H, W] -> bool edges."""
    p = F.pad(image.float(), (1, 1, 1, 1), mode="replicate").long()  # Sobel with BORDER_REPLICATE
    dx = (p[..., :-2, 2:] - p[..., :-2, :-2]) + 2 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) + (p[..., 2:, 2:] - p[..., 2:, :-2])
    dy = (p[..., 2:, :-2] - p[..., :-2, :-2]) + 2 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) + (p[..., 2:, 2:] - p[..., :-2, 2:])
    mag = dx.abs() + dy.abs()
    if mag.shape[1] > 1:  # colour: per pixel, the channel with the largest magnitude (the first on ties)
        idx = mag.argmax(dim=1, keepdim=True)
        mag, dx, dy = mag.gather(1, idx), dx.gather(1, idx), dy.gather(1, idx)
    # Non-maximum suppression in four directions, with OpenCV's comparisons (strict on one side).
    x, y = dx.abs(), dy.abs() << 15
    tg22x = x * _TG22
    tg67x = tg22x + (x << 16)
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    s = torch.where((dx ^ dy) < 0, -1, 1)
    keep_h = (mag > _shift(mag, 0, -1)) & (mag >= _shift(mag, 0, 1))
    keep_v = (mag > _shift(mag, -1, 0)) & (mag >= _shift(mag, 1, 0))
    keep_d = torch.where(s > 0, (mag > _shift(mag, -1, -1)) & (mag > _shift(mag, 1, 1)),
                         (mag > _shift(mag, -1, 1)) & (mag > _shift(mag, 1, -1)))
    thin = (horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d)
    weak = thin & (mag > low)
    edges = weak & (mag > high)
    # Hysteresis: weak edges 8-connected to a strong one are kept.
    while True:
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            return edges[:, 0]
        edges = grown


@torch.no_grad()
def canny_edges(images: torch.Tensor, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1],
                size: Optional[int] = CANNY_SIZE) -> torch.Tensor:
    """The official CannyFilter: images [B, 3, H, W] in [0, 1] -> edges [B, 1, H, W] in [0, 1].

    Resize to ``size`` x ``size`` (bilinear, as the filter; None keeps the size), truncate to 8 bits
    (values are clamped to [0, 1] first), Canny, then resize the 0/1 edges back (bilinear).
    """
    x = images.float().cpu()
    height, width = x.shape[-2:]
    if size is not None:
        x = F.interpolate(x, size=(size, size), mode="bilinear")
    u8 = (x.clamp(0, 1) * 255).to(torch.uint8)
    lo, hi = sorted((int(math.floor(low)), int(math.floor(high))))
    edges = _canny_u8(u8, lo, hi).float()[:, None]
    if size is not None:
        edges = F.interpolate(edges, size=(height, width), mode="bilinear")
    return edges


def is_edge_map(images: torch.Tensor, tolerance: float = 0.1, share: float = 0.99) -> bool:
    """True for a grey, black-and-white picture (edges from ComfyUI's Canny node, a line drawing):
    one channel, or three equal ones (within 2/255), with at least ``share`` of the pixels within
    ``tolerance`` of 0 or 1 (so a JPEG-compressed edge map still counts)."""
    x = images.float()
    if x.shape[1] == 3 and (x.amax(dim=1) - x.amin(dim=1)).max() > 2 / 255:
        return False
    grey = x.mean(dim=1)
    binary = (grey <= tolerance) | (grey >= 1 - tolerance)
    return bool(binary.float().mean() >= share)


# --------------------------------------------------------------------------------------------
# Recipes


def canny_input(images: torch.Tensor) -> torch.Tensor:
    """Canny ControlNet input [B, 1, H, W]: an edge map as it is, any other image through CannyFilter."""
    if images.shape[1] == 1 or is_edge_map(images):
        return images[:, :1].float()
    return canny_edges(images)


def fit_mask(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A mask ([H, W], [B, H, W], [B, 1, H, W] or [B, H, W, 1]) as [B, 1, H, W] 0/1 at ``size`` (nearest)."""
    m = limits.check_masks(mask, "inpainting mask")
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="nearest")
    return (m > 0.5).float()


def inpainting_input(images: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Inpainting ControlNet input [B, 4, H, W]: the image whitened under the mask, then the mask.
    One mask serves every image and one image every mask; other batch sizes must match."""
    if mask is None:
        raise ControlInputError("the inpainting ControlNet needs a mask (white = area to repaint)", "mask")
    x = images.float()
    x, m = limits.match_batches(x, fit_mask(mask, x.shape[-2:]), "inpainting")
    return torch.cat([torch.where(m > 0.5, torch.ones_like(x), x), m], dim=1)


@torch.no_grad()
def super_resolution_input(effnet: Optional[nn.Module], images: torch.Tensor) -> torch.Tensor:
    """Super-resolution ControlNet input [B, 16, 2h, 2w]: the EfficientNet latent of the low-resolution
    image (h = its height / 32) upscaled 2x (nearest). The map covers a Stage C latent of 2h cells,
    i.e. an output about 2.67x the low-resolution image's size."""
    if effnet is None:
        raise ControlInputError("the super-resolution ControlNet needs the semantic compressor (effnet_encoder)",
                                "effnet")
    size = (max(1, round(images.shape[-2] / EFFNET_COMPRESSION)), max(1, round(images.shape[-1] / EFFNET_COMPRESSION)))
    latent = encode_semantic(effnet, images, size)
    return F.interpolate(latent, scale_factor=SR_UPSCALE, mode="nearest")


def control_input(kind: str, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  effnet: Optional[nn.Module] = None) -> torch.Tensor:
    """The input a ControlNet of ``kind`` (see :func:`kind_of`) expects, from an image (and mask)."""
    images = limits.check_images(images, f"the {kind} control image", keep_grey=kind == "canny")
    if kind == "canny":
        return canny_input(images)
    if kind == "inpainting":
        return inpainting_input(images, mask)
    if kind == "super_resolution":
        return super_resolution_input(effnet, images)
    if kind == "image":
        return images.float()
    raise ValueError(f"unknown ControlNet kind {kind!r}; choose one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------
# Hints on the sampling clock


def check_range(strength: float, start: float, end: float) -> None:
    """Refuse a strength or step range that cannot mean anything, with the values in the message."""
    if not all(math.isfinite(float(v)) for v in (strength, start, end)):
        raise ValueError(f"ControlNet strength, start and end must be finite numbers, got {strength}, {start}, {end}")
    if not 0.0 <= float(start) <= 1.0 or not 0.0 <= float(end) <= 1.0:
        raise ValueError(f"ControlNet start ({start}) and end ({end}) are fractions of the steps, between 0 and 1")
    if float(end) < float(start):
        raise ValueError(f"ControlNet end ({end}) is before start ({start})")


def injection_widths(stage_c: nn.Module) -> List[int]:
    """The width of each ResBlock call of a Stage C forward, in the order ControlNet maps are
    injected (down path, then up path, repeats included), read from the model's blocks."""
    from ..models.blocks import ResBlock

    widths: List[int] = []
    for blocks, mappers in ((stage_c.down_blocks, stage_c.down_repeat_mappers),
                            (stage_c.up_blocks, stage_c.up_repeat_mappers)):
        for level, repeats in zip(blocks, mappers):
            for _ in range(len(repeats) + 1):
                widths += [b.depthwise.in_channels for b in level if isinstance(b, ResBlock)]
    return widths


def check_widths(kind: str, c_proj: int, proj_blocks: Sequence[int], widths: Sequence[int]) -> None:
    """Refuse a ControlNet whose maps (``c_proj`` wide, for ResBlocks ``proj_blocks``) do not fit a
    Stage C whose ResBlock calls are ``widths`` wide, naming the Stage C it was made for."""
    used = [i for i in proj_blocks if i < len(widths)]
    wrong = [i for i in used if widths[i] != c_proj]
    if used and not wrong:
        return
    from ..models.configs import STAGE_C
    from ..files.kinds import title

    made_for = [title("stage_c", v) for v, cfg in STAGE_C.items() if cfg["c_hidden"][0] == c_proj]
    target = f"the {made_for[0]}" if made_for else f"a Stage C {c_proj} wide"
    if wrong:
        problem = f"its maps are {c_proj} wide but this Stage C is {widths[wrong[0]]} wide"
    else:
        problem = f"it injects into ResBlocks {list(proj_blocks)} but this Stage C has only {len(widths)}"
    raise limits.RequestError(f"the {kind} ControlNet does not fit this Stage C: {problem}; it was made for "
                              f"{target}: load that Stage C, or a ControlNet made for this one")


def check_fits(net: nn.Module, stage_c: nn.Module) -> None:
    """:func:`check_widths` for a loaded ControlNet and Stage C (before any ControlNet runs); a
    Stage C of another build (without the official blocks) is left to its forward."""
    if not hasattr(stage_c, "down_blocks") or not hasattr(net, "projections"):
        return
    kind = kind_of({"c_in": net.c_in, "bottleneck_mode": net.bottleneck_mode})
    check_widths(kind, net.projections[0][-1].out_channels, net.proj_blocks, injection_widths(stage_c))


def active_steps(start: float, end: float, steps: int) -> range:
    """The steps i of an n-step run with start <= i/n < end (rounding noise of the fractions ignored)."""
    first = math.ceil(float(start) * steps - 1e-9)
    stop = math.ceil(float(end) * steps - 1e-9)
    return range(max(first, 0), min(stop, steps))


@dataclass(frozen=True, eq=False)
class Control:
    """What a user asks for: a ControlNet ``kind`` (see :data:`KINDS`), its image, mask, strength and
    step range. :class:`~wuerstchen.pipeline.cascade.Cascade` finds the ControlNet and prepares the input."""

    kind: str
    image: torch.Tensor  # [B, 3, H, W] in [0, 1]
    mask: Optional[torch.Tensor] = None  # [B, 1, H, W], 1 = repaint (inpainting)
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown ControlNet kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        check_range(self.strength, self.start, self.end)
        if self.kind == "inpainting" and self.mask is None:
            raise ControlInputError("the inpainting ControlNet needs a mask (white = area to repaint)", "mask")


@dataclass(frozen=True, eq=False)
class Hint:
    """One prepared ControlNet application: the net, its input map, strength and step range."""

    net: nn.Module
    control_input: torch.Tensor  # [B, c_in, H, W], as the ControlNet expects it
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        check_range(self.strength, self.start, self.end)

    def active(self, step: int, steps: int) -> bool:
        return step in active_steps(self.start, self.end, steps)


class ControlSchedule(StepInput):
    """Stage C's ``cnet`` input, step by step: the sum of the hints active at that step, or None.

    Each ControlNet runs once, on construction (its net must be on its device by then); the maps
    are kept in float32 and fitted to the latent batch (a single control image serves every image).
    """

    def __init__(self, hints: Sequence[Hint], batch: int):
        self.hints = list(hints)
        self.maps = [_scaled_maps(h, batch) for h in self.hints]
        self._combined: Dict[Tuple[int, ...], Maps] = {}

    def at(self, step: int, steps: int) -> Optional[Maps]:
        active = tuple(i for i, h in enumerate(self.hints) if h.active(step, steps))
        if not active:
            return None
        if active not in self._combined:
            total = self.maps[active[0]]
            for i in active[1:]:
                total = _add_maps(total, self.maps[i])
            self._combined[active] = total
        return self._combined[active]


@torch.no_grad()
def _scaled_maps(hint: Hint, batch: int) -> Maps:
    param = next(hint.net.parameters())
    maps = hint.net(hint.control_input.to(param.device, param.dtype))
    return [None if m is None else _fit_batch(m.float() * hint.strength, batch) for m in maps]


def _fit_batch(m: torch.Tensor, batch: int) -> torch.Tensor:
    if m.shape[0] in (1, batch):
        return m
    if batch % m.shape[0]:
        raise ValueError(f"{m.shape[0]} control images do not fit a batch of {batch} latents; give one control "
                         "image, or as many as latents")
    return m.repeat(batch // m.shape[0], 1, 1, 1)


def _add_maps(a: Maps, b: Maps) -> Maps:
    """Sum two hints' per-ResBlock maps; a map of another size is first resized as Stage C would."""
    n = max(len(a), len(b))
    a, b = a + [None] * (n - len(a)), b + [None] * (n - len(b))
    out: Maps = []
    for p, q in zip(a, b):
        if p is None or q is None:
            out.append(p if q is None else q)
            continue
        if p.shape[-2:] != q.shape[-2:]:
            q = F.interpolate(q, size=p.shape[-2:], mode="bilinear", align_corners=True)
        out.append(p + q.to(p.device))
    return out
