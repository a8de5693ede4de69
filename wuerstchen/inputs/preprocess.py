"""Image -> CLIP ViT-L/14 ``pixel_values`` [B, 3, 224, 224], as the official code prepares them.

The official inference notebook resizes the [0, 1] image so its short side is 768 (bilinear,
antialiased), then applies ``clip_preprocess``: torchvision ``Resize(224, BICUBIC)``, which with
the pinned torchvision 0.16.2 does *not* antialias tensors (plain bicubic, a = -0.75),
``CenterCrop(224)`` with ``round((h - 224) / 2)`` offsets, and the OpenAI normalisation.
Nothing is clamped or quantised.  This module reproduces that with torch alone.

Pipelines (``PIPELINES``):

* ``official_notebook`` - the official inference path above (default);
* ``official_notebook_aa`` - the same with torchvision >= 0.17, whose Resize antialiases;
* ``official`` - ``clip_preprocess`` applied directly, without the 768 step.

Only the central square of a picture reaches the encoder (the short side is resized to 224 and
the centre cropped). A picture more than :data:`MAX_ASPECT` times longer than wide is first cut to
that aspect around its centre, so a 2x4000 strip does not become a 768x1,536,000 intermediate
(14 GB); what it keeps still holds that square with a wide margin, so the result only moves by the
resize ratio's rounding. Pictures up to that aspect are processed exactly as officially.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224
NOTEBOOK_SIZE = 768
PIPELINES = ("official_notebook", "official_notebook_aa", "official")
MAX_ASPECT = 8
"""Long side / short side beyond which a picture is first cut around its centre (see above)."""


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int) geometry: short side -> size, long side int(size*long/short)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _resize(image: torch.Tensor, size: int, mode: str, antialias: bool) -> torch.Tensor:
    """Resize a float [3, H, W] image so its short side is ``size`` (no rounding/clamping)."""
    target = short_side_size(image.shape[-2], image.shape[-1], size)
    if target == tuple(image.shape[-2:]):
        return image
    return F.interpolate(image[None], size=target, mode=mode, align_corners=False,
                         antialias=antialias)[0]


def _bound_aspect(image: torch.Tensor, aspect: int = MAX_ASPECT) -> torch.Tensor:
    """Cut a [3, H, W] image whose long side exceeds ``aspect`` x its short side to that, around its centre."""
    height, width = image.shape[-2:]
    short = min(height, width)
    if max(height, width) <= aspect * short:
        return image
    keep = aspect * short
    if height > width:
        top = (height - keep) // 2
        return image[..., top:top + keep, :]
    left = (width - keep) // 2
    return image[..., left:left + keep]


def _center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from {height}x{width}")
    top = int(round((height - size) / 2.0))  # Python round: halves go to the even integer
    left = int(round((width - size) / 2.0))
    return image[..., top:top + size, left:left + size]


def _normalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD, dtype=image.dtype, device=image.device)[:, None, None]
    return (image - mean) / std


def to_float_images(images) -> list[torch.Tensor]:
    """Accept PIL images, uint8 HWC arrays/tensors, or float [B, H, W, 3] in [0, 1]
    (ComfyUI's IMAGE layout), single or as a list; return float32 [3, H, W] tensors in [0, 1]
    (uint8 is divided by 255 exactly like torchvision's ``to_tensor``)."""
    if isinstance(images, (list, tuple)):
        return [t for image in images for t in to_float_images(image)]
    if hasattr(images, "convert") and hasattr(images, "size"):  # PIL image, 16-bit and float scaled
        from .images import picture_to_array

        images = picture_to_array(images, "RGB")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images))  # a writable copy
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"unsupported image type {type(images).__name__}; pass PIL images, "
                        "uint8 HWC arrays or float [B, H, W, 3] tensors")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"images must be [H, W, 3] or [B, H, W, 3] (channels last), got "
                         f"{list(images.shape)}")
    images = images[..., :3]
    if images.dtype == torch.uint8:
        images = images.to(torch.float32).div(255)
    elif images.is_floating_point():
        images = images.to(torch.float32)
    else:
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    return list(images.permute(0, 3, 1, 2))


def clip_preprocess(images, pipeline: str = "official_notebook") -> torch.Tensor:
    """Images -> normalised ``pixel_values`` float32 [B, 3, 224, 224] (see ``PIPELINES``).

    Each image is processed at its own size, then the results are stacked.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    out = []
    for image in to_float_images(images):
        if min(image.shape[-2:]) == 0:
            raise ValueError(f"clip_preprocess() got an empty image ({image.shape[-1]}x{image.shape[-2]})")
        image = _bound_aspect(image)
        if pipeline != "official":
            image = _resize(image, NOTEBOOK_SIZE, "bilinear", antialias=True)
        image = _resize(image, CLIP_SIZE, "bicubic", antialias=pipeline == "official_notebook_aa")
        out.append(_normalize(_center_crop(image, CLIP_SIZE)))
    if not out:
        raise ValueError("clip_preprocess() got no images")
    return torch.stack(out)


def clip_preprocess_official(images) -> torch.Tensor:
    """The official inference preprocessing (``official_notebook``)."""
    return clip_preprocess(images, "official_notebook")

