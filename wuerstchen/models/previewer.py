"""Previewer: a small conv decoder from stage C latents to a rough RGB image (8x upscale).

Used for live previews during stage C sampling. Layout matches the official ``Previewer`` so
``previewer.safetensors`` loads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_gelu_norm(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.GELU(), nn.BatchNorm2d(channels)]


class Previewer(nn.Module):
    """Maps (B, c_in, h, w) latents to (B, c_out, 8h, 8w) images roughly in [0, 1]."""

    def __init__(self, c_in: int = 16, c_hidden: int = 512, c_out: int = 3):
        super().__init__()
        c2, c4 = c_hidden // 2, c_hidden // 4
        self.blocks = nn.Sequential(
            *_conv_gelu_norm(nn.Conv2d(c_in, c_hidden, kernel_size=1), c_hidden),
            *_conv_gelu_norm(nn.Conv2d(c_hidden, c_hidden, kernel_size=3, padding=1), c_hidden),
            *_conv_gelu_norm(nn.ConvTranspose2d(c_hidden, c2, kernel_size=2, stride=2), c2),
            *_conv_gelu_norm(nn.Conv2d(c2, c2, kernel_size=3, padding=1), c2),
            *_conv_gelu_norm(nn.ConvTranspose2d(c2, c4, kernel_size=2, stride=2), c4),
            *_conv_gelu_norm(nn.Conv2d(c4, c4, kernel_size=3, padding=1), c4),
            *_conv_gelu_norm(nn.ConvTranspose2d(c4, c4, kernel_size=2, stride=2), c4),
            *_conv_gelu_norm(nn.Conv2d(c4, c4, kernel_size=3, padding=1), c4),
            nn.Conv2d(c4, c_out, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            x = x.to(dtype=self.blocks[0].weight.dtype)
        return self.blocks(x)
