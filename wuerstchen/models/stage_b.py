"""Stage B: the latent decoder U-Net of Stable Cascade (Würstchen v3).

It denoises the 4-channel Stage A latent (H/4 x W/4 of the image), conditioned on the Stage C
output (``effnet``, 16 channels), the pooled CLIP text embedding and optional low-resolution
``pixels``. Constructor keywords, defaults (the "3B" model, ~1.56B parameters) and ``state_dict``
layout are those of the official ``modules/stage_b.py``; the "700M" lite model only changes the
config. The forward reproduces the official numerics (effnet resized to the patched size before
its mapper, pixels mapped first and resized after, default pixels zeros [B, 3, 8, 8]) and adds
dtype handling and ``fp16_guard`` (see :class:`~wuerstchen.models.blocks.CascadeUNet`).
"""

import torch.nn.functional as F
from torch import nn

from .blocks import (CascadeUNet, LayerNorm2d, gelu_, layer_norm_channels, linear, pointwise_conv, to_nchw,
                     to_nhwc)


class StageB(CascadeUNet):
    """Official StageB. ``forward(x, r, effnet, clip, pixels=None, **t_conds)``."""

    def __init__(self, c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1280, c_hidden=[320, 640, 1280, 1280],
                 nhead=[-1, -1, 20, 20], blocks=[[2, 6, 28, 6], [6, 28, 6, 2]],
                 block_repeat=[[1, 1, 1, 1], [3, 3, 2, 2]], level_config=['CT', 'CT', 'CTA', 'CTA'], c_clip=1280,
                 c_clip_seq=4, c_effnet=16, c_pixels=3, kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True,
                 t_conds=['sca']):
        super().__init__()
        levels = len(c_hidden)
        self.c_r = c_r
        self.t_conds = list(t_conds)
        self.c_clip_seq = c_clip_seq
        dropout = list(dropout) if isinstance(dropout, (list, tuple)) else [dropout] * levels
        self_attn = list(self_attn) if isinstance(self_attn, (list, tuple)) else [self_attn] * levels

        # conditioning
        self.effnet_mapper = nn.Sequential(
            nn.Conv2d(c_effnet, c_hidden[0] * 4, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(c_hidden[0] * 4, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )
        self.pixels_mapper = nn.Sequential(
            nn.Conv2d(c_pixels, c_hidden[0] * 4, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(c_hidden[0] * 4, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )
        self.clip_mapper = nn.Linear(c_clip, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)

        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(c_in * (patch_size ** 2), c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )

        def make_downscaler(i):
            return nn.Sequential(
                LayerNorm2d(c_hidden[i - 1], elementwise_affine=False, eps=1e-6),
                nn.Conv2d(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2),
            )

        def make_upscaler(i):
            return nn.Sequential(
                LayerNorm2d(c_hidden[i], elementwise_affine=False, eps=1e-6),
                nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2),
            )

        self._build_levels(c_hidden=c_hidden, nhead=nhead, blocks=blocks, block_repeat=block_repeat,
                           level_config=level_config, dropout=dropout, self_attn=self_attn, c_cond=c_cond,
                           c_r=c_r, t_conds=self.t_conds, kernel_size=kernel_size,
                           make_downscaler=make_downscaler, make_upscaler=make_upscaler)

        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(c_hidden[0], c_out * (patch_size ** 2), kernel_size=1),
            nn.PixelShuffle(patch_size),
        )

    def gen_c_embeddings(self, clip):
        """4 normalized conditioning tokens per pooled CLIP vector; clip is [B, N, C] or [B, C]."""
        if clip.dim() == 2:
            clip = clip.unsqueeze(1)
        tokens = linear(clip, self.clip_mapper.weight, self.clip_mapper.bias)
        tokens = tokens.view(clip.size(0), clip.size(1) * self.c_clip_seq, -1)
        return F.layer_norm(tokens, tokens.shape[-1:], None, None, self.clip_norm.eps)

    @staticmethod
    def _map_nhwc(mapper, x_nhwc):
        """1x1 conv -> GELU -> 1x1 conv -> LayerNorm2d on a channels-last tensor."""
        h = gelu_(pointwise_conv(x_nhwc, mapper[0]))
        return layer_norm_channels(pointwise_conv(h, mapper[2]), mapper[3].eps)

    def forward(self, x, r, effnet, clip, pixels=None, **kwargs):
        """Predict the noise for the Stage A latent ``x`` [B, 4, H, W] at cosine time ``r`` [B].

        ``effnet`` [B, 16, h, w] is the Stage C latent; ``clip`` the pooled text embedding
        [B, 1, 1280]; ``kwargs`` may hold the ``t_conds`` values (``sca``, default zeros).
        """
        dtype = self.stream_dtype()
        if pixels is None:
            pixels = x.new_zeros(x.size(0), 3, 8, 8)
        r_embed = self._time_embedding(r, kwargs, dtype)
        clip = self.gen_c_embeddings(clip.to(dtype))

        h = self._embed(x.to(dtype))
        size = h.shape[1:3]
        effnet = F.interpolate(effnet.float(), size=size, mode="bilinear", align_corners=True)
        h = h + self._map_nhwc(self.effnet_mapper, effnet.to(dtype).permute(0, 2, 3, 1))
        pix = self._map_nhwc(self.pixels_mapper, pixels.to(dtype).permute(0, 2, 3, 1))
        pix = F.interpolate(to_nchw(pix).float(), size=size, mode="bilinear", align_corners=True)
        h = h + to_nhwc(pix).to(dtype)

        ws = self._workspace(x, r, effnet, clip, pixels)
        level_outputs, _ = self._down_encode(h, r_embed, clip, ws)
        h = self._up_decode(level_outputs, r_embed, clip, ws)
        return self._classify(h, self.compute_dtype())
