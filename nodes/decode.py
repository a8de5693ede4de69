"""Decoding nodes: Stage A (VQGAN) to pixels, and the fast Stage C previewer."""

from __future__ import annotations

from wuerstchen.pipeline import stages as pipeline

from . import comfy_types as T
from . import handles as H
from .host import Progress, manager
from .loaders import require

CATEGORY = "wuerstchen/decode"


class WuerstchenStageADecode:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Decodes a Stage B latent to an image with the Stage A VQGAN; large images are decoded in tiles. "
                   "Würstchen v2's decoder output decodes the same way (its VQGAN is this Stage A).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "stage_a": (H.STAGE_A, {"tooltip": "Stage A (VQGAN)."}),
            "latent": ("LATENT", {"tooltip": "Stage B latent (Stage B sampler, or ComfyUI's Stable Cascade KSampler)."}),
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 1024, "step": 16,
                                  "tooltip": "Latent tile size; 0 = automatic (tiles only for large images). "
                                             "Lower it if decoding runs out of memory."}),
        }}

    def decode(self, stage_a, latent, tile_size):
        node = "WuerstchenStageADecode"
        sa = require(stage_a, "stage_a", node, "stage_a")
        samples = T.stage_b_in(latent, node)
        progress = Progress(1)
        with T.node_errors(node), manager().running(sa.model):
            images = pipeline.decode_stage_a(sa.module, samples, tile=tile_size or None,
                                             callback=lambda i, n: progress(i, n))
        return (T.images_out(pipeline.crop_to(images, T.stage_b_size(latent))),)


class WuerstchenPreviewDecode:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Fast preview of a Stage C latent with the previewer model (8x the latent size)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "previewer": (H.PREVIEWER, {"tooltip": "The Stage C previewer."}),
            "latent": ("LATENT", {"tooltip": "Stage C latent."}),
        }}

    def decode(self, previewer, latent):
        node = "WuerstchenPreviewDecode"
        pv = require(previewer, "previewer", node, "previewer")
        samples = T.stage_c_in(latent, pv.model.config.get("c_in", 16), node, "latent")
        with T.node_errors(node), manager().running(pv.model):
            images = pipeline.preview_stage_c(pv.module, samples)
        return (T.images_out(images),)
