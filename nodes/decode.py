"""Decoding nodes: Stage A (VQGAN) to pixels, and the fast Stage C previewer."""

from __future__ import annotations

from wuerstchen import pipeline

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
        sa = require(stage_a, "stage_a", "WuerstchenStageADecode", "stage_a")
        progress = Progress(1)
        with manager().running(sa.model):
            images = pipeline.decode_stage_a(sa.module, T.stage_b_in(latent), tile=tile_size or None,
                                             callback=lambda i, n: progress(i, n))
        return (T.images_out(images),)


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
        pv = require(previewer, "previewer", "WuerstchenPreviewDecode", "previewer")
        samples = T.stage_c_in(latent, pv.model.config["c_in"], "WuerstchenPreviewDecode", "latent")
        with manager().running(pv.model):
            images = pipeline.preview_stage_c(pv.module, samples)
        return (T.images_out(images),)
