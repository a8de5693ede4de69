"""Training pictures and captions: a folder (``name.png|jpg|jpeg|webp`` + ``name.txt``, and kohya's
``N_name/`` sub-folders repeated N times) or tensors,
checked before any training; the official multi-aspect buckets; the semantic latents, computed once.

Buckets follow the official data pipeline (``core/data/bucketeer.py`` with
``configs/training/finetune_c_3b_lora.yaml``): the ratios 1/1, 1/2, 1/3, 2/3, 3/4, 1/5, 2/5, 3/5,
4/5, 1/6, 5/6, 9/16 and their reciprocals; a ratio r = w/h at resolution R gets the size
``h = floor(sqrt(R²/r) / 32) · 32``, ``w = floor(sqrt(R²·r) / 32) · 32``; each picture goes to the
ratio closest to its own w/h, is scaled (bilinear, antialiased) to cover it and cropped to it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..inputs.images import read_image
from ..inputs.limits import RequestError
from ..pipeline.stages import EFFNET_COMPRESSION, encode_semantic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
OFFICIAL_RATIOS = ("1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16")
BUCKET_FACTOR = 32  # the effnet's compression: bucket sides are multiples of it
MAX_UPSCALE = 2.0  # a picture that must grow more than this to fill its bucket is refused as too small


class DatasetError(RequestError):
    """A training set that cannot be used; the message names the file and what is expected."""


@dataclass(eq=False)
class Example:
    """One training picture [3, H, W] in [0, 1] and its caption (``name`` for messages)."""

    image: torch.Tensor
    caption: str
    name: str = ""
    # Pre-encoded text (clip_text [L, W], clip_text_pooled [1, P]) when the caption came encoded.
    encoded: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)


def bucket_ratios(ratios: Sequence[str] = OFFICIAL_RATIOS) -> List[float]:
    """The ratios (w/h) and their reciprocals, in the official order (originals first)."""
    values = [float(Fraction(r)) for r in ratios]
    for r in list(values):
        if 1 / r not in values:
            values.append(1 / r)
    return values


def bucket_sizes(resolution: int, ratios: Sequence[str] = OFFICIAL_RATIOS,
                 factor: int = BUCKET_FACTOR) -> List[Tuple[int, int]]:
    """(height, width) of each bucket at ``resolution`` (the side of the square bucket's area)."""
    density = resolution ** 2
    return [(int((density / r) ** 0.5 // factor * factor), int((density * r) ** 0.5 // factor * factor))
            for r in bucket_ratios(ratios)]


def closest_bucket(height: int, width: int, resolution: int, ratios: Sequence[str] = OFFICIAL_RATIOS
                   ) -> Tuple[int, int]:
    """The bucket whose ratio is closest to the picture's w/h (first one on a tie, as the official)."""
    values = bucket_ratios(ratios)
    best = min(range(len(values)), key=lambda i: abs(width / height - values[i]))
    return bucket_sizes(resolution, ratios)[best]


def fit_to_bucket(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Scale [3, H, W] to cover ``size`` (bilinear, antialiased) and crop its centre to it."""
    h, w = image.shape[-2:]
    th, tw = size
    scale = max(th / h, tw / w)
    nh, nw = max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))
    x = image.unsqueeze(0).float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[0, :, top:top + th, left:left + tw].clamp(0, 1).contiguous()


def _pictures_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_folder(folder: os.PathLike | str) -> List[Example]:
    """Every picture in ``folder`` with its caption, checked; sorted by name. Sub-folders (one level)
    are read too, kohya-style: ``10_name/`` repeats its pictures 10 times per pass, others once."""
    root = Path(folder)
    if not root.exists():
        raise DatasetError(f"training data {str(root)!r}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"training data {str(root)!r} is a file; give a folder of pictures with .txt captions")
    pictures = _pictures_in(root)
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        repeat = re.match(r"^(\d+)_", sub.name)
        pictures += _pictures_in(sub) * (int(repeat.group(1)) if repeat else 1)
    if not pictures:
        raise DatasetError(f"training data {str(root)!r} holds no pictures ({', '.join(IMAGE_EXTENSIONS)}); "
                           "put name.png (or .jpg/.webp) with name.txt captions in it")
    missing = [p.name for p in pictures if not p.with_suffix(".txt").is_file()]
    if missing:
        raise DatasetError(f"training data {str(root)!r}: {len(missing)} picture(s) without a caption file, e.g. "
                           f"{missing[0]} needs {Path(missing[0]).with_suffix('.txt').name}")
    examples, read = [], {}
    for p in pictures:
        if p not in read:  # a repeated picture is read (and later encoded) once
            try:
                caption = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise DatasetError(f"caption {str(p.with_suffix('.txt'))!r} is not UTF-8 text") from None
            read[p] = (read_image(p, what="training picture")[0], caption)
        image, caption = read[p]
        examples.append(Example(image, caption, str(p.relative_to(root))))
    return examples


def from_tensors(images, captions: Sequence[str], names: Optional[Sequence[str]] = None) -> List[Example]:
    """Examples from pictures ([B, 3, H, W] / [B, H, W, 3] batches or a list of them) and captions.

    One caption for many pictures is used for all of them."""
    pictures: List[torch.Tensor] = []
    for item in images if isinstance(images, (list, tuple)) else [images]:
        if not isinstance(item, torch.Tensor) or item.dim() not in (3, 4):
            raise DatasetError(f"training pictures: expected image tensors, got {type(item).__name__}")
        batch = item if item.dim() == 4 else item.unsqueeze(0)
        if batch.shape[-1] in (1, 3, 4) and batch.shape[1] not in (1, 3, 4):  # channels-last (ComfyUI IMAGE)
            batch = batch.permute(0, 3, 1, 2)
        batch = batch[:, :3].float() if batch.shape[1] >= 3 else batch.float().repeat(1, 3, 1, 1)
        pictures.extend(batch)
    captions = list(captions)
    if not pictures:
        raise DatasetError("training pictures: none given")
    if len(captions) == 1 and len(pictures) > 1:
        captions = captions * len(pictures)
    if len(captions) != len(pictures):
        raise DatasetError(f"training data: {len(pictures)} pictures but {len(captions)} captions; give one "
                           "caption per picture (or one for all)")
    names = list(names) if names is not None else [f"picture {i}" for i in range(len(pictures))]
    return [Example(p.contiguous(), str(c).strip() if isinstance(c, str) else "", n)
            for p, c, n in zip(pictures, captions, names)]


def check_examples(examples: Sequence[Example], resolution: int) -> None:
    """Refuse, naming the picture, what cannot train at ``resolution``: no pictures, non-finite pixels,
    a picture that would need more than 2x upscaling to fill its bucket."""
    if not examples:
        raise DatasetError("training data holds no pictures")
    if resolution < BUCKET_FACTOR or resolution % BUCKET_FACTOR:
        raise DatasetError(f"resolution {resolution}: must be a multiple of {BUCKET_FACTOR} (official: 768)")
    for e in examples:
        if not bool(torch.isfinite(e.image).all()):
            raise DatasetError(f"training picture {e.name}: holds NaN or infinite values")
        h, w = e.image.shape[-2:]
        th, tw = closest_bucket(h, w, resolution)
        if min(th, tw) < BUCKET_FACTOR:
            raise DatasetError(f"training picture {e.name}: {w}x{h} is too elongated for resolution {resolution}")
        scale = max(th / h, tw / w)
        if scale > MAX_UPSCALE:
            raise DatasetError(f"training picture {e.name} is too small: {w}x{h} pixels would be upscaled "
                               f"{scale:.1f}x to its {tw}x{th} bucket at resolution {resolution}; use pictures "
                               f"of at least about {math.ceil(tw / MAX_UPSCALE)}x{math.ceil(th / MAX_UPSCALE)} "
                               "or a lower --resolution")


@dataclass
class LatentSet:
    """Semantic latents of the examples, grouped by bucket: ``latents[i]`` [16, h, w] of example i."""

    latents: List[torch.Tensor]
    captions: List[str]
    encoded: List[Optional[Tuple[torch.Tensor, torch.Tensor]]]
    buckets: Dict[Tuple[int, int], List[int]]

    def __len__(self) -> int:
        return len(self.latents)


@torch.no_grad()
def encode_examples(effnet: torch.nn.Module, examples: Sequence[Example], resolution: int) -> LatentSet:
    """Each picture fitted to its bucket and encoded by the semantic compressor once (float32, CPU)."""
    check_examples(examples, resolution)
    latents, buckets, done = [], {}, {}
    for i, e in enumerate(examples):
        if id(e.image) not in done:  # repeats of one picture share its latent
            size = closest_bucket(*e.image.shape[-2:], resolution)
            picture = fit_to_bucket(e.image, size).unsqueeze(0)
            done[id(e.image)] = encode_semantic(effnet, picture, (size[0] // EFFNET_COMPRESSION,
                                                                  size[1] // EFFNET_COMPRESSION))[0]
        latent = done[id(e.image)]
        latents.append(latent)
        buckets.setdefault(tuple(latent.shape[-2:]), []).append(i)
    return LatentSet(latents, [e.caption for e in examples], [e.encoded for e in examples], buckets)
