"""Latent nodes: empty latents for a size, and images encoded into Stage C and Stage B latents."""

from __future__ import annotations

import torch

from wuerstchen.files import kinds
from wuerstchen.inputs import limits
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.pipeline import stages_v2 as pipeline_v2

from . import comfy_types as T
from . import handles as H
from .host import manager
from .loaders import require, require_role

CATEGORY = "wuerstchen/latent"
MAX_SIZE = limits.MAX_SIDE


class WuerstchenEmptyLatent:
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("stage_c", "stage_b")
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Empty Stage C and Stage B latents for an output size. Stage C is ceil(H/compression) x "
                   "ceil(W/compression) (24x24 at 1024² with the official 42.67); Stage B is ceil(H/4) x ceil(W/4) "
                   "rounded up to even sides, which Stage B needs (the decode crops back to the size asked for).")

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
            "batch_size": ("INT", {"default": 1, "min": 1, "max": limits.MAX_BATCH, "tooltip": "Images per run."}),
        }}

    def generate(self, width, height, compression, batch_size):
        node = "WuerstchenEmptyLatent"
        with T.node_errors(node):
            height, width = pipeline.check_size(height, width, node)
            batch_size = limits.check_batch(batch_size, f"{node}: batch_size")
            compression = limits.check_compression(compression, f"{node}: compression")
        h_c, w_c = pipeline.stage_c_latent_size(height, width, compression)
        h_b, w_b = pipeline.stage_b_latent_size(height, width)
        c = T.stage_c_out(torch.zeros(batch_size, 16, h_c, w_c), (height, width), compression)
        b = T.stage_b_out(torch.zeros(batch_size, 4, h_b, w_b), (height, width))
        return (c, b)


class WuerstchenSemanticEncode:
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_c",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes images into a Stage C latent with the EfficientNet semantic compressor, with the "
                   "official preprocessing (antialiased resize to 32x the latent size, ImageNet normalisation). "
                   "Feed it to the Stage C sampler with denoise < 1 for img2img. With Würstchen v2's compressor "
                   "it makes a v2 prior latent, for the Stage C sampler with the v2 prior (its sides rounded to a "
                   "multiple of 3 latent cells, which the v2 decoder needs).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "semantic_compressor": (H.EFFNET, {"tooltip": "effnet_encoder (Semantic Compressor Loader)."}),
            "image": ("IMAGE", {"tooltip": "Images to encode."}),
            "compression": ("FLOAT", {"default": pipeline.OFFICIAL_COMPRESSION, "min": 16.0, "max": 128.0,
                                      "step": 0.01, "tooltip": "Stage C compression; sets the latent size."}),
        }}

    def encode(self, semantic_compressor, image, compression):
        node = "WuerstchenSemanticEncode"
        eff = require_role(semantic_compressor, "effnet", node, "semantic_compressor")
        x = T.images_in(image, node)
        with T.node_errors(node):
            compression = limits.check_compression(compression, f"{node}: compression")
            with manager().running(eff.model):
                if eff.model.kind == "v2_effnet":  # Würstchen v2: a prior latent, (y + 1)/42, of a size the decoder takes
                    size = pipeline_v2.nearest_working_latent(*pipeline.stage_c_latent_size(x.shape[-2], x.shape[-1],
                                                                                          compression))
                    return (T.stage_c_out(pipeline_v2.encode_semantic_v2(eff.module, x, size), x.shape[-2:],
                                          compression, kinds.WUERSTCHEN_V2),)
                latent = pipeline.encode_semantic(eff.module, x, compression=compression)
        return (T.stage_c_out(latent, x.shape[-2:], compression, kinds.STABLE_CASCADE),)


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
        node = "WuerstchenStageAEncode"
        sa = require(stage_a, "stage_a", node, "stage_a")
        x = T.images_in(image, node)
        with T.node_errors(node), manager().running(sa.model):
            latent = pipeline.encode_stage_a(sa.module, x)
        return (T.stage_b_out(latent),)
