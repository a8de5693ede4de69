"""Stage C: the text-conditional prior U-Net of Stable Cascade (Würstchen v3).

It denoises the 16-channel, 24x24-ish "semantic" latent that Stage B expands. Constructor keywords,
defaults (the 3.6B model) and ``state_dict`` layout are those of the official
``modules/stage_c.py``; the 1B "lite" model only changes the config. The forward reproduces the
official numerics, including its quirks (see the reference README), and adds:

* dtype handling: floating inputs are cast to the parameter dtype, the output is in it;
* ``fp16_guard`` (see :class:`~wuerstchen.models.blocks.CascadeUNet`);
* a 2-D ``clip_text_pooled`` [B, C] is treated as [B, 1, C]. The official code mishandles it:
  its ``unsqueeze`` result is discarded, so the tokens come out with the wrong shape.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import CascadeUNet, LayerNorm2d, UpDownBlock2d, linear


class StageC(CascadeUNet):
    """Official StageC. ``forward(x, r, clip_text, clip_text_pooled, clip_img, cnet=None, **t_conds)``."""

    def __init__(self, c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=2048, c_hidden=[2048, 2048], nhead=[32, 32],
                 blocks=[[8, 24], [24, 8]], block_repeat=[[1, 1], [1, 1]], level_config=['CTA', 'CTA'],
                 c_clip_text=1280, c_clip_text_pooled=1280, c_clip_img=768, c_clip_seq=4, kernel_size=3,
                 dropout=[0.1, 0.1], self_attn=True, t_conds=['sca', 'crp'], switch_level=[False]):
        super().__init__()
        levels = len(c_hidden)
        self.c_r = c_r
        self.t_conds = list(t_conds)
        self.c_clip_seq = c_clip_seq
        dropout = list(dropout) if isinstance(dropout, (list, tuple)) else [dropout] * levels
        self_attn = list(self_attn) if isinstance(self_attn, (list, tuple)) else [self_attn] * levels
        if levels > 1 and (switch_level is None or len(switch_level) < levels - 1):
            raise ValueError(f"switch_level needs {levels - 1} entries for {levels} levels, got {switch_level!r}")

        # conditioning
        self.clip_txt_mapper = nn.Linear(c_clip_text, c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(c_clip_text_pooled, c_cond * c_clip_seq)
        self.clip_img_mapper = nn.Linear(c_clip_img, c_cond * c_clip_seq)
        self.clip_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)

        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(c_in * (patch_size ** 2), c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )

        def make_downscaler(i):
            return nn.Sequential(
                LayerNorm2d(c_hidden[i - 1], elementwise_affine=False, eps=1e-6),
                UpDownBlock2d(c_hidden[i - 1], c_hidden[i], mode="down", enabled=switch_level[i - 1]),
            )

        def make_upscaler(i):
            return nn.Sequential(
                LayerNorm2d(c_hidden[i], elementwise_affine=False, eps=1e-6),
                UpDownBlock2d(c_hidden[i], c_hidden[i - 1], mode="up", enabled=switch_level[i - 1]),
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

    def _tokens(self, mapper, emb):
        """Map [B, N, C] embeddings to [B, N * c_clip_seq, c_cond] tokens (row-major split)."""
        if emb.dim() == 2:
            emb = emb.unsqueeze(1)
        out = linear(emb, mapper.weight, mapper.bias)
        return out.view(emb.size(0), emb.size(1) * self.c_clip_seq, -1)

    def gen_c_embeddings(self, clip_txt, clip_txt_pooled, clip_img):
        """Conditioning tokens: [text tokens, 4 per pooled vector, 4 per image embedding], normalized."""
        txt = linear(clip_txt, self.clip_txt_mapper.weight, self.clip_txt_mapper.bias)
        pooled = self._tokens(self.clip_txt_pooled_mapper, clip_txt_pooled)
        img = self._tokens(self.clip_img_mapper, clip_img)
        clip = torch.cat([txt, pooled, img], dim=1)
        return F.layer_norm(clip, clip.shape[-1:], None, None, self.clip_norm.eps)

    def forward(self, x, r, clip_text, clip_text_pooled, clip_img, cnet=None, **kwargs):
        """Predict the noise for latent ``x`` [B, 16, H, W] at cosine time ``r`` [B].

        ``kwargs`` may hold the extra time conditions named in ``t_conds`` (``sca``, ``crp``;
        default zeros). ``cnet`` is a ControlNet output list: entry i (or None) is resized and
        added before the i-th ResBlock call, counting the down path then the up path with repeats.
        """
        dtype = self.stream_dtype()
        r_embed = self._time_embedding(r, kwargs, dtype)
        clip = self.gen_c_embeddings(clip_text.to(dtype), clip_text_pooled.to(dtype), clip_img.to(dtype))
        h = self._embed(x.to(dtype))
        ws = self._workspace(x, r, clip_text, clip_text_pooled, clip_img)
        level_outputs, counter = self._down_encode(h, r_embed, clip, ws, cnet)
        h = self._up_decode(level_outputs, r_embed, clip, ws, cnet, counter)
        return self._classify(h, self.compute_dtype())
