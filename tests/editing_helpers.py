"""Tiny models and pictures shared by the layered-editing tests."""

import torch

from wuerstchen.pipeline.cascade import Cascade, CascadeFiles
from wuerstchen.files.management import ModelManager


def tiny_cascade(tiny_dir) -> Cascade:
    return Cascade(CascadeFiles.from_dir(tiny_dir), ModelManager(device="cpu"), root=str(tiny_dir))


def picture(size=(256, 256), seed=0) -> torch.Tensor:
    """A smooth random picture [1, 3, H, W] in [0, 1] (low frequencies, like a photo)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 8, 8, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def box_mask(size, top, left, height, width) -> torch.Tensor:
    """A ComfyUI MASK [1, H, W] with one box of ones."""
    mask = torch.zeros(1, *size)
    mask[:, top:top + height, left:left + width] = 1.0
    return mask
