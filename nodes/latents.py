"""Latent nodes. LATENT dicts keep ComfyUI's Stable Cascade layout.

Stage C latents: ``{"samples": [B, 16, h, w]}`` at the official scale (ComfyUI's SC_Prior has
scale 1). Stage B latents: ``{"samples": [B, 4, H/4, W/4]}`` as ComfyUI keeps them, i.e. the raw
VQGAN encoder output, which is the official Stage B latent times 0.43.
"""

from __future__ import annotations

import torch

from wuerstchen import pipeline

from . import handles as H
from .host import NodeError, manager
from .loaders import require

CATEGORY = "wuerstchen/latent"
MAX_SIZE = 8192


def stage_b_to_comfy(latent: torch.Tensor) -> torch.Tensor:
    return latent * pipeline.STAGE_A_SCALE


def stage_b_from_comfy(samples: torch.Tensor) -> torch.Tensor:
    return samples.float() / pipeline.STAGE_A_SCALE


def stage_c_latent(samples: torch.Tensor, height: int, width: int, compression: float) -> dict:
    return {"samples": samples, H.LATENT_SIZE: (int(height), int(width)), H.LATENT_COMPRESSION: float(compression)}


def output_size(latent: dict, compression_default: float = pipeline.OFFICIAL_COMPRESSION):
    """(H, W) a Stage C latent stands for: the size it was made for, if it still fits its shape."""
    h, w = latent["samples"].shape[-2:]
    compression = float(latent.get(H.LATENT_COMPRESSION, compression_default))
    size = latent.get(H.LATENT_SIZE)
    if size is not None and pipeline.stage_c_latent_size(size[0], size[1], compression) == (h, w):
        return int(size[0]), int(size[1])
    return pipeline.output_size_from_stage_c(h, w, compression)


class WuerstchenEmptyLatent:
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("stage_c", "stage_b")
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Empty Stage C and Stage B latents for an output size. Stage C is ceil(H/compression) x "
                   "ceil(W/compression) (24x24 at 1024² with the official 42.67); Stage B is ceil(H/4) x ceil(W/4).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 1024, "min": 256, "max": MAX_SIZE, "step": 8,
                              "tooltip": "Output width in pixels (the models were trained around 1024x1024)."}),
            "height": ("INT", {"default": 1024, "min": 256, "max": MAX_SIZE, "step": 8,
                               "tooltip": "Output height in pixels."}),
            "compression": ("FLOAT", {"default": pipeline.OFFICIAL_COMPRESSION, "min": 16.0, "max": 128.0, "step": 0.01,
                                      "tooltip": "Pixels per Stage C latent cell: 42.67 is official; lower gives "
                                                 "Stage C more cells (more detail, slower), higher fewer."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
        }}

    def generate(self, width, height, compression, batch_size):
        pipeline.check_size(height, width, "WuerstchenEmptyLatent")
        h_c, w_c = pipeline.stage_c_latent_size(height, width, compression)
        h_b, w_b = pipeline.stage_b_latent_size(height, width)
        c = stage_c_latent(torch.zeros(batch_size, 16, h_c, w_c), height, width, compression)
        b = {"samples": torch.zeros(batch_size, 4, h_b, w_b)}
        return (c, b)


class WuerstchenSemanticEncode:
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_c",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes images into a Stage C latent with the EfficientNet semantic compressor, with the "
                   "official preprocessing (antialiased resize to 32x the latent size, ImageNet normalisation). "
                   "Feed it to the Stage C sampler with denoise < 1 for img2img.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "semantic_compressor": (H.EFFNET, {"tooltip": "effnet_encoder (Semantic Compressor Loader)."}),
            "image": ("IMAGE", {"tooltip": "Images to encode."}),
            "compression": ("FLOAT", {"default": pipeline.OFFICIAL_COMPRESSION, "min": 16.0, "max": 128.0,
                                      "step": 0.01, "tooltip": "Stage C compression; sets the latent size."}),
        }}

    def encode(self, semantic_compressor, image, compression):
        eff = require(semantic_compressor, "effnet", "WuerstchenSemanticEncode", "semantic_compressor")
        x = pipeline.from_image_layout(image)
        height, width = x.shape[-2:]
        latent_size = pipeline.stage_c_latent_size(height, width, compression)
        with manager().running(eff.model):
            latent = pipeline.encode_semantic(eff.module, x, latent_size)
        return (stage_c_latent(latent, height, width, compression),)


class WuerstchenStageAEncode:
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_b",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encodes images with the Stage A VQGAN into a Stage B latent (ComfyUI layout)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "stage_a": (H.STAGE_A, {"tooltip": "Stage A (VQGAN)."}),
            "image": ("IMAGE", {"tooltip": "Images to encode; sizes are cropped to a multiple of 4."}),
        }}

    def encode(self, stage_a, image):
        sa = require(stage_a, "stage_a", "WuerstchenStageAEncode", "stage_a")
        x = pipeline.from_image_layout(image)
        h, w = (x.shape[-2] // 4) * 4, (x.shape[-1] // 4) * 4
        if h == 0 or w == 0:
            raise NodeError(f"WuerstchenStageAEncode: image of {x.shape[-1]}x{x.shape[-2]} is too small")
        with manager().running(sa.model):
            latent = pipeline.encode_stage_a(sa.module, x[:, :, :h, :w])
        return ({"samples": stage_b_to_comfy(latent)},)
