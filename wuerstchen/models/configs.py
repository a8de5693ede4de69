"""Constructor configs of the released Stable Cascade networks.

These are the official values (train/train_c.py, train/train_b.py, the inference YAMLs).
Hyper-parameters that leave no trace in a state dict (attention heads, dropout, switch_level,
ControlNet proj_blocks, EfficientNet strides) come from here when a file's shapes match.
"""

from __future__ import annotations

import copy

# Pixels per latent cell, the facts every layer above sizes its tensors with.
OFFICIAL_COMPRESSION = 42.67  # pixels per Stage C cell at the official 1024² -> 24x24
STAGE_B_COMPRESSION = 4  # pixels per Stage B (VQGAN) latent cell
EFFNET_COMPRESSION = 32  # pixels of the semantic compressor's input per latent cell

# Names of the released variants, in messages (the kinds table and LoRA matching both say them).
VARIANT_TITLES = {
    "stage_c": {"full": "Stage C (3.6B)", "lite": "Stage C lite (1B)"},
    "stage_b": {"full": "Stage B (3B / 1.5B params)", "lite": "Stage B lite (700M)"},
}

STAGE_C = {
    "full": dict(
        c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=2048, c_hidden=[2048, 2048], nhead=[32, 32],
        blocks=[[8, 24], [24, 8]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
        c_clip_text=1280, c_clip_text_pooled=1280, c_clip_img=768, c_clip_seq=4, kernel_size=3,
        dropout=[0.1, 0.1], self_attn=True, t_conds=["sca", "crp"], switch_level=[False],
    ),
    "lite": dict(
        c_in=16, c_out=16, c_r=64, patch_size=1, c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24],
        blocks=[[4, 12], [12, 4]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"],
        c_clip_text=1280, c_clip_text_pooled=1280, c_clip_img=768, c_clip_seq=4, kernel_size=3,
        dropout=[0.1, 0.1], self_attn=True, t_conds=["sca", "crp"], switch_level=[False],
    ),
}

STAGE_B = {
    "full": dict(
        c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1280, c_hidden=[320, 640, 1280, 1280],
        nhead=[-1, -1, 20, 20], blocks=[[2, 6, 28, 6], [6, 28, 6, 2]], block_repeat=[[1, 1, 1, 1], [3, 3, 2, 2]],
        level_config=["CT", "CT", "CTA", "CTA"], c_clip=1280, c_clip_seq=4, c_effnet=16, c_pixels=3,
        kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True, t_conds=["sca"],
    ),
    "lite": dict(
        c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1280, c_hidden=[320, 576, 1152, 1152],
        nhead=[-1, 9, 18, 18], blocks=[[2, 4, 14, 4], [4, 14, 4, 2]], block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]],
        level_config=["CT", "CT", "CTA", "CTA"], c_clip=1280, c_clip_seq=4, c_effnet=16, c_pixels=3,
        kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True, t_conds=["sca"],
    ),
}

STAGE_A = dict(levels=2, bottleneck_blocks=12, c_hidden=384, c_latent=4, codebook_size=8192, scale_factor=0.43)
EFFNET = dict(c_latent=16)
PREVIEWER = dict(c_in=16, c_hidden=512, c_out=3)
CONTROLNET_PROJ_BLOCKS = [0, 4, 8, 12, 51, 55, 59, 63]
CONTROLNET = {
    "canny": dict(c_in=1, c_proj=2048, proj_blocks=CONTROLNET_PROJ_BLOCKS, bottleneck_mode="effnet"),
    "inpainting": dict(c_in=4, c_proj=2048, proj_blocks=CONTROLNET_PROJ_BLOCKS, bottleneck_mode="effnet"),
    "super_resolution": dict(c_in=16, c_proj=2048, proj_blocks=CONTROLNET_PROJ_BLOCKS, bottleneck_mode="large"),
}

# Würstchen v2 (warp-ai/wuerstchen-prior prior/config.json, warp-ai/wuerstchen decoder/config.json; the
# original dome272 files hold the same networks). Heads are width / 64; dropout is the released 0.1.
V2_PRIOR = dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1)
V2_DECODER = dict(
    c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1024, c_hidden=[320, 640, 1280, 1280], nhead=[-1, 10, 20, 20],
    blocks=[4, 4, 14, 4], level_config=["CT", "CTA", "CTA", "CTA"], inject_effnet=[False, True, True, True],
    effnet_embd=16, clip_embd=1024, kernel_size=3, dropout=0.1,
)
V2_EFFNET = dict(c_latent=16, family="v2")


def official(table: dict, variant: str) -> dict:
    """A deep copy of an official config, safe to modify."""
    return copy.deepcopy(table[variant])
