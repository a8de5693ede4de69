"""Stable Cascade ControlNet: a control image -> per-ResBlock feature maps added inside StageC.

Three bottlenecks as in the official ``ControlNet``:

* ``'effnet'`` (default; canny, inpainting): EfficientNetV2-S features, 1280 channels at 1/32.
  When ``c_in != 3`` the stem conv becomes ``Conv2d(c_in, 24, 3, stride=2)`` with *no padding*
  and no bias, exactly as the released checkpoints were trained.
* ``'large'`` (super-resolution): 1x1 convs to 16384 and 1024 channels, 8 residual conv
  blocks, 1x1 conv to 1280; no downsampling.
* ``'simple'``: two 3x3 convs that keep ``c_in`` channels.

Each entry of ``proj_blocks`` gets a projection head (1x1 conv, LeakyReLU, 1x1 conv to
``c_proj``). ``forward`` returns a list of length ``max(proj_blocks) + 1`` holding the
projections at the ``proj_blocks`` positions and ``None`` elsewhere; StageC adds entry i before
its i-th ResBlock call.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .effnet import BACKBONE_OUT_CHANNELS, build_efficientnet_features

BOTTLENECK_MODES = ("effnet", "simple", "large")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of (B, C, H, W) tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class CNetResBlock(nn.Module):
    """Pre-norm residual block of two 3x3 convs (LayerNorm, GELU, conv) x 2."""

    def __init__(self, c: int):
        super().__init__()
        self.blocks = nn.Sequential(
            ChannelLayerNorm(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            ChannelLayerNorm(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks(x)


def _effnet_backbone(c_in: int, setting=None, last_channel: int = BACKBONE_OUT_CHANNELS) -> nn.Sequential:
    backbone = build_efficientnet_features(setting, last_channel=last_channel)
    if c_in != 3:
        stem = backbone[0][0]
        backbone[0][0] = nn.Conv2d(c_in, stem.out_channels, kernel_size=3, stride=2, bias=False,
                                   device=stem.weight.device, dtype=stem.weight.dtype)
    return backbone


class ControlNet(nn.Module):
    """Control-image encoder producing StageC injection maps (see module docstring)."""

    def __init__(self, c_in: int = 3, c_proj: int = 2048, proj_blocks: Sequence[int] | None = None,
                 bottleneck_mode: str | None = None, backbone_setting=None, embd_channels: int | None = None,
                 large_hidden: Sequence[int] | None = None):
        """The first four arguments are the official ones. ``backbone_setting`` (effnet stage table),
        ``embd_channels`` (bottleneck width, 1280 officially) and ``large_hidden`` (the 'large'
        bottleneck's two widths, (16384, 1024) officially) exist for small test models."""
        super().__init__()
        if not proj_blocks:
            raise ValueError(
                "ControlNet needs proj_blocks, the StageC ResBlock indices to inject into; the released "
                "Stable Cascade ControlNets use [0, 4, 8, 12, 51, 55, 59, 63]"
            )
        if any(int(i) < 0 for i in proj_blocks):
            raise ValueError(f"proj_blocks must be non-negative ResBlock indices, got {list(proj_blocks)}")
        if bottleneck_mode is None:
            bottleneck_mode = "effnet"
        self.proj_blocks = [int(i) for i in proj_blocks]
        self.bottleneck_mode = bottleneck_mode
        self.c_in = c_in

        if bottleneck_mode == "effnet":
            embd_channels = embd_channels or BACKBONE_OUT_CHANNELS
            self.backbone = _effnet_backbone(c_in, backbone_setting, embd_channels)
        elif bottleneck_mode == "simple":
            embd_channels = c_in
            self.backbone = nn.Sequential(
                nn.Conv2d(c_in, c_in * 4, kernel_size=3, padding=1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(c_in * 4, c_in, kernel_size=3, padding=1),
            )
        elif bottleneck_mode == "large":
            embd_channels = embd_channels or BACKBONE_OUT_CHANNELS
            wide, hidden = large_hidden or (4096 * 4, 1024)
            self.backbone = nn.Sequential(
                nn.Conv2d(c_in, wide, kernel_size=1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(wide, hidden, kernel_size=1),
                *[CNetResBlock(hidden) for _ in range(8)],
                nn.Conv2d(hidden, embd_channels, kernel_size=1),
            )
        else:
            raise ValueError(f"Unknown bottleneck_mode {bottleneck_mode!r}; expected one of {BOTTLENECK_MODES}")

        self.projections = nn.ModuleList()
        for _ in self.proj_blocks:
            head = nn.Sequential(
                nn.Conv2d(embd_channels, embd_channels, kernel_size=1, bias=False),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(embd_channels, c_proj, kernel_size=1, bias=False),
            )
            nn.init.zeros_(head[-1].weight)  # an untrained ControlNet leaves StageC unchanged
            self.projections.append(head)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        weight = self.projections[0][0].weight
        if x.is_floating_point():
            x = x.to(dtype=weight.dtype)
        if x.shape[1] != self.c_in:
            raise ValueError(f"ControlNet expects {self.c_in}-channel control images, got shape {tuple(x.shape)}")
        features = self.backbone(x)
        outputs: list[torch.Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for index, head in zip(self.proj_blocks, self.projections):
            outputs[index] = head(features)
        return outputs
