"""Text and image conditioning nodes, producing ComfyUI's CONDITIONING layout (see comfy_types)."""

from __future__ import annotations

from wuerstchen.inputs import limits
from wuerstchen.pipeline import stages as pipeline

from . import comfy_types as T
from . import handles as H
from .host import NodeError, embedding_folders, manager
from .loaders import require, require_role

CATEGORY = "wuerstchen/conditioning"


class WuerstchenTextEncode:
    """Official CLIP-G conditioning: plain prompts tokenise and encode exactly like the official code.
    With a Würstchen v2 text encoder, that tower's v2 conditioning (as the hub pipelines encode)."""

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt with CLIP ViT-bigG the way the official Stable Cascade code does ('!' as pad "
                   "token, no text clean-up). Long prompts are encoded in 77-token windows; (word:1.2) weights work. "
                   "With a Würstchen v2 text encoder it gives that tower's v2 conditioning (the hub pipelines' "
                   "last_hidden_state, padded with the end token): encode the prompt once with the prior's and "
                   "once with the decoder's encoder.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": (H.CLIP_TEXT, {"tooltip": "The CLIP-G text encoder (Wuerstchen CLIP Text Loader or a checkpoint), "
                                              "or a Würstchen v2 prior or decoder text encoder."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt. Use an empty prompt for the negative, as the official notebooks."}),
        }}

    def encode(self, clip, text):
        node = "WuerstchenTextEncode"
        clip = require_role(clip, "clip_text", node, "clip")
        try:
            with manager().running(clip.model):
                if clip.model.kind != "clip_text":  # a Würstchen v2 tower
                    sequence, _ = clip.module.encode_prompts([text], embeddings=embedding_folders())
                    return (T.v2_conditioning_out(sequence.float().cpu(), clip.model.kind),)
                cond = pipeline.encode_text(clip.module, [text], clip.loras, embedding_folders())
        except ValueError as exc:
            raise NodeError(f"{node}: {exc}") from None
        return (T.conditioning_out(cond),)


class WuerstchenImageVariation:
    """Adds ViT-L/14 image embeddings (one token per image) to a conditioning."""

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Image variations: every image in the batch becomes one image token of Stage C's conditioning, "
                   "scaled by strength. Chain several nodes to mix references.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "Positive conditioning to add the image tokens to."}),
            "clip_vision": (H.CLIP_VISION, {"tooltip": "The ViT-L/14 image encoder."}),
            "image": ("IMAGE", {"tooltip": "Reference image(s); each image of the batch adds one token."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Scale of the image embedding (1.0 = official)."}),
        }}

    def apply(self, conditioning, clip_vision, image, strength):
        node = "WuerstchenImageVariation"
        vis = require(clip_vision, "clip_vision", node, "clip_vision")
        cond = T.conditioning_in(conditioning, node, "conditioning")
        x = T.images_in(image, node)
        with T.node_errors(node):
            limits.check_number(strength, f"{node}: strength", official=1.0)
            with manager().running(vis.model):
                embeds = pipeline.encode_image_embeds(vis.module, x)
            out = pipeline.with_image_embeds(cond, embeds, [strength] * embeds.shape[0])
        return (T.conditioning_out(out),)
