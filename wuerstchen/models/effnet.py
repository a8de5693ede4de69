"""EfficientNetV2 feature extractor and Stable Cascade's EfficientNet latent encoder.

Stable Cascade encodes images for stage C training and stage B conditioning with an
EfficientNetV2-S backbone followed by a 1x1 projection to 16 channels. The official code takes
the backbone from torchvision; this is an independent implementation with the same module tree,
so released checkpoints (``backbone.0 ... backbone.7``) load unchanged.

Würstchen v2's semantic compressor is the same network with two changes (``family="v2"``): its
mapper BatchNorm has affine parameters, and its output is moved into the prior's sampling space,
``(y + 1) / 42``. :func:`v2_effnet_to_raw` maps a prior result back to the raw ``y`` the v2
decoder was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONE_BN_EPS = 1e-3
BACKBONE_OUT_CHANNELS = 1280

V2_LATENT_SCALE = 42.0
V2_LATENT_OFFSET = 1.0
"""Würstchen v2: the prior samples ``(y + 1) / 42`` of the raw effnet output y (hub ``latent_mean`` 42 and
``latent_std`` 1, although the pipeline uses them as ``x · 42 − 1``)."""

EFFNET_FAMILIES = ("v3", "v2")


@dataclass(frozen=True)
class EfficientNetStage:
    """One stage of an EfficientNetV2 backbone: ``num_layers`` blocks of one kind.

    ``block`` is ``"FusedMBConv"`` (full k x k expansion conv) or ``"MBConv"`` (1x1 expansion,
    depthwise k x k conv and squeeze-excitation). Only the first block of a stage changes the
    stride and channel count.
    """

    block: str
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int

    def __post_init__(self):
        if self.block not in ("FusedMBConv", "MBConv"):
            raise ValueError(f"EfficientNet stage block must be 'FusedMBConv' or 'MBConv', got {self.block!r}")
        if self.num_layers < 1:
            raise ValueError(f"EfficientNet stage needs at least one layer, got num_layers={self.num_layers}")


# torchvision's efficientnet_v2_s stage table (width and depth multipliers 1.0).
EFFICIENTNET_V2_S: tuple[EfficientNetStage, ...] = (
    EfficientNetStage("FusedMBConv", 1, 3, 1, 24, 24, 2),
    EfficientNetStage("FusedMBConv", 4, 3, 2, 24, 48, 4),
    EfficientNetStage("FusedMBConv", 4, 3, 2, 48, 64, 4),
    EfficientNetStage("MBConv", 4, 3, 2, 64, 128, 6),
    EfficientNetStage("MBConv", 6, 3, 1, 128, 160, 9),
    EfficientNetStage("MBConv", 6, 3, 2, 160, 256, 15),
)

StageLike = Union[EfficientNetStage, Mapping]


def _divisible_by_8(value: float) -> int:
    """Round a channel count to a multiple of 8, never dropping more than 10% (MobileNet rule)."""
    rounded = max(8, int(value + 4) // 8 * 8)
    if rounded < 0.9 * value:
        rounded += 8
    return rounded


def _as_stage(spec: StageLike) -> EfficientNetStage:
    if isinstance(spec, EfficientNetStage):
        stage = spec
    elif isinstance(spec, Mapping):
        try:
            stage = EfficientNetStage(**spec)
        except TypeError as err:
            raise ValueError(
                f"backbone_setting entry {dict(spec)!r} must have exactly the keys block, expand_ratio, kernel, "
                "stride, input_channels, out_channels, num_layers"
            ) from err
    else:
        raise TypeError(f"backbone_setting entries must be dicts or EfficientNetStage, got {type(spec).__name__}")
    if stage.block == "MBConv":
        # torchvision's MBConvConfig rounds its channel counts; FusedMBConvConfig does not.
        stage = EfficientNetStage(
            stage.block, stage.expand_ratio, stage.kernel, stage.stride,
            _divisible_by_8(stage.input_channels), _divisible_by_8(stage.out_channels), stage.num_layers,
        )
    return stage


class ConvNormAct(nn.Sequential):
    """Conv (no bias, 'same' padding) + BatchNorm (+ SiLU); children ``0`` conv and ``1`` norm."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, groups=1, activation=True, eps=BACKBONE_BN_EPS):
        layers = [
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, eps=eps),
        ]
        if activation:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gating: sigmoid(fc2(silu(fc1(mean over H, W)))) scales the input."""

    def __init__(self, channels, squeeze_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x):
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(scale))))
        return x * scale


class FusedMBConv(nn.Module):
    """k x k expansion conv then 1x1 projection (a single k x k conv when expand_ratio is 1)."""

    def __init__(self, c_in, c_out, expand_ratio, kernel, stride, eps=BACKBONE_BN_EPS):
        super().__init__()
        c_expanded = _divisible_by_8(c_in * expand_ratio)
        if c_expanded != c_in:
            layers = [
                ConvNormAct(c_in, c_expanded, kernel, stride, eps=eps),
                ConvNormAct(c_expanded, c_out, 1, activation=False, eps=eps),
            ]
        else:
            layers = [ConvNormAct(c_in, c_out, kernel, stride, eps=eps)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_residual else out


class MBConv(nn.Module):
    """1x1 expansion, depthwise k x k conv, squeeze-excitation, 1x1 projection."""

    def __init__(self, c_in, c_out, expand_ratio, kernel, stride, eps=BACKBONE_BN_EPS):
        super().__init__()
        c_expanded = _divisible_by_8(c_in * expand_ratio)
        layers = []
        if c_expanded != c_in:
            layers.append(ConvNormAct(c_in, c_expanded, 1, eps=eps))
        layers += [
            ConvNormAct(c_expanded, c_expanded, kernel, stride, groups=c_expanded, eps=eps),
            SqueezeExcitation(c_expanded, max(1, c_in // 4)),
            ConvNormAct(c_expanded, c_out, 1, activation=False, eps=eps),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_residual else out


_BLOCKS = {"FusedMBConv": FusedMBConv, "MBConv": MBConv}


def build_efficientnet_features(
    setting: Iterable[StageLike] | None = None,
    in_channels: int = 3,
    last_channel: int = BACKBONE_OUT_CHANNELS,
    eps: float = BACKBONE_BN_EPS,
) -> nn.Sequential:
    """Build the ``features`` part of an EfficientNetV2 (stem, one child per stage, 1x1 head).

    ``setting`` lists the stages (dicts or :class:`EfficientNetStage`); the default is
    EfficientNetV2-S. The result downsamples by 2 per stride-2 stage plus 2 in the stem and ends
    with ``last_channel`` channels after SiLU. Inference only: stochastic depth is not applied.
    """
    stages = [_as_stage(spec) for spec in (EFFICIENTNET_V2_S if setting is None else setting)]
    if not stages:
        raise ValueError("backbone_setting must list at least one stage")
    layers = [ConvNormAct(in_channels, stages[0].input_channels, 3, stride=2, eps=eps)]
    for stage in stages:
        block_cls = _BLOCKS[stage.block]
        blocks = []
        for i in range(stage.num_layers):
            c_in = stage.input_channels if i == 0 else stage.out_channels
            stride = stage.stride if i == 0 else 1
            blocks.append(block_cls(c_in, stage.out_channels, stage.expand_ratio, stage.kernel, stride, eps=eps))
        layers.append(nn.Sequential(*blocks))
    layers.append(ConvNormAct(stages[-1].out_channels, last_channel, 1, eps=eps))
    return nn.Sequential(*layers)


def effnet_preprocess(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise RGB images in [0, 1] (B, 3, H, W), as the official ``effnet_preprocess``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"effnet_preprocess expects images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def v2_effnet_to_raw(x: torch.Tensor) -> torch.Tensor:
    """Würstchen v2 prior space -> raw effnet output (the decoder's ``effnet`` input): ``x · 42 − 1``."""
    return x * V2_LATENT_SCALE - V2_LATENT_OFFSET


class EfficientNetEncoder(nn.Module):
    """The semantic compressor: EfficientNetV2 features, 1x1 conv, BatchNorm.

    Input: ImageNet-normalised images (see :func:`effnet_preprocess`); output: ``c_latent``
    channels at 1/32 of the input size. ``backbone_setting`` replaces the EfficientNetV2-S stage
    table (used for small test models). ``family`` "v3" is Stable Cascade's encoder (BatchNorm
    without affine, raw output); "v2" is Würstchen v2's (affine BatchNorm, output ``(y + 1) / 42``).
    """

    def __init__(self, c_latent: int = 16, backbone_setting: Sequence[StageLike] | None = None,
                 last_channel: int = BACKBONE_OUT_CHANNELS, family: str = "v3"):
        super().__init__()
        if family not in EFFNET_FAMILIES:
            raise ValueError(f"EfficientNetEncoder family must be one of {EFFNET_FAMILIES}, got {family!r}")
        self.family = family
        self.backbone = build_efficientnet_features(backbone_setting, last_channel=last_channel)
        self.mapper = nn.Sequential(
            nn.Conv2d(last_channel, c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent, affine=family == "v2"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.mapper[0].weight
        if x.is_floating_point():
            x = x.to(dtype=weight.dtype)
        y = self.mapper(self.backbone(x))
        if self.family == "v2":
            return y.add(V2_LATENT_OFFSET).div(V2_LATENT_SCALE)
        return y
