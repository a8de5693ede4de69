"""Pictures into Stage C's semantic latent (the EfficientNetV2-S compressor), and the latent size for a picture.

Below both the stage functions and the ControlNet inputs: img2img and the super-resolution
ControlNet encode pictures the same way.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs import limits
from ..models.configs import EFFNET_COMPRESSION, OFFICIAL_COMPRESSION
from ..models.effnet import effnet_preprocess


def model_param(model: nn.Module) -> torch.Tensor:
    """One parameter of ``model``: where and in which dtype it runs."""
    return next(model.parameters())


def stage_c_latent_size(height: int, width: int, compression: float = OFFICIAL_COMPRESSION) -> Tuple[int, int]:
    """Stage C latent (h, w) for an output size, as the official ``calculate_latent_sizes``."""
    compression = limits.check_compression(compression)
    return math.ceil(height / compression), math.ceil(width / compression)


def semantic_input(images: torch.Tensor, latent_size: Tuple[int, int]) -> torch.Tensor:
    """Resize [B, 3, H, W] images in [0, 1] for the effnet (bilinear, antialiased, as the official
    ``resize_image``) to 32x the wanted Stage C latent size, then ImageNet-normalise."""
    target = (latent_size[0] * EFFNET_COMPRESSION, latent_size[1] * EFFNET_COMPRESSION)
    x = images.float()
    if tuple(x.shape[-2:]) != target:
        x = F.interpolate(x, size=target, mode="bilinear", antialias=True, align_corners=False)
    return effnet_preprocess(x)


@torch.no_grad()
def encode_semantic(effnet: nn.Module, images: torch.Tensor, latent_size: Optional[Tuple[int, int]] = None,
                    compression: float = OFFICIAL_COMPRESSION) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> Stage C latent [B, 16, h, w] (img2img, reconstruction)."""
    images = limits.check_images(images, "semantic encode image")
    if latent_size is None:
        latent_size = stage_c_latent_size(images.shape[-2], images.shape[-1], compression)
    param = model_param(effnet)
    batch = limits.check_batch(images.shape[0], "semantic encode batch")
    limits.check_memory(limits.estimate(batch=batch, semantic=tuple(latent_size)), param.device,
                        f"semantic encode to a {latent_size[1]}x{latent_size[0]} latent, batch {batch}",
                        "raise the compression or encode smaller images")
    x = semantic_input(images, latent_size).to(param.device, param.dtype)
    latent = effnet(x).float()
    limits.check_finite(latent, "The semantic encoder (EfficientNet)", param.dtype)
    return latent.cpu()
