"""Text and image conditioning nodes, producing ComfyUI's CONDITIONING layout.

``[[clip_text [1, L, 1280], {"pooled_output": [1, 1280], ...}]]``, as ComfyUI's own Stable
Cascade text encoding, so conditioning utility nodes (concat, zero out, …) keep working. Image
variation tokens ride along under our own key.
"""

from __future__ import annotations

from typing import List

import torch

from wuerstchen import lora as lora_lib
from wuerstchen import pipeline
from wuerstchen.pipeline import Conditioning

from . import handles as H
from .host import NodeError, manager
from .loaders import require

CATEGORY = "wuerstchen/conditioning"


def text_conditioning(clip: H.ModelHandle, prompts: List[str]) -> Conditioning:
    """Encode prompts with the CLIP-G handle's LoRA text parts (and learned tokens) applied."""
    model = clip.model
    mgr = manager()
    with mgr.running(model), torch.no_grad():
        stack = [(lf, s_clip) for lf, _s_model, s_clip in clip.loras if lf.text or lf.embeddings]
        if stack:
            with lora_lib.apply_loras(model.module, stack, part="text"):
                return pipeline.encode_text(model.module, prompts)
        return pipeline.encode_text(model.module, prompts)


def to_comfy(cond: Conditioning) -> list:
    out = []
    for i in range(cond.clip_text.shape[0]):
        extras = {"pooled_output": cond.clip_text_pooled[i:i + 1, 0]}
        if cond.clip_img is not None:
            extras[H.COND_IMAGE_TOKENS] = cond.clip_img[i:i + 1]
        out.append([cond.clip_text[i:i + 1], extras])
    return out


def from_comfy(conditioning, node: str, socket: str) -> Conditioning:
    """Our Conditioning from a CONDITIONING socket (ours, or ComfyUI's Stable Cascade encoding)."""
    if not conditioning:
        raise NodeError(f"{node}: '{socket}' is empty; wire a Wuerstchen Text Encode (an empty prompt for the negative)")
    texts, pooled, images = [], [], []
    for entry in conditioning:
        tensor, extras = entry[0], entry[1]
        p = extras.get("pooled_output")
        if p is None:
            raise NodeError(f"{node}: '{socket}' has no pooled text embedding; encode it with Wuerstchen Text Encode "
                            "(or ComfyUI's CLIP Text Encode with a Stable Cascade CLIP)")
        texts.append(tensor.float())
        pooled.append(p.float().reshape(tensor.shape[0], 1, -1))
        images.append(extras.get(H.COND_IMAGE_TOKENS))
    if len({t.shape[1] for t in texts}) > 1:
        n = max(t.shape[1] for t in texts)
        texts = [pipeline.repeat_tokens(t, n) for t in texts]
    clip_text = torch.cat(texts)
    clip_pooled = torch.cat(pooled)
    clip_img = None
    if any(i is not None for i in images):
        n = max(i.shape[1] for i in images if i is not None)
        width = next(i.shape[-1] for i in images if i is not None)
        filled = [pipeline.pad_tokens(i.float(), n) if i is not None else torch.zeros(1, n, width) for i in images]
        clip_img = torch.cat(filled)
    return Conditioning(clip_text, clip_pooled, clip_img)


class WuerstchenTextEncode:
    """Official CLIP-G conditioning: plain prompts tokenise and encode exactly like the official code."""

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt with CLIP ViT-bigG the way the official Stable Cascade code does ('!' as pad "
                   "token, no text clean-up). Long prompts are encoded in 77-token windows; (word:1.2) weights work.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": (H.CLIP_TEXT, {"tooltip": "The CLIP-G text encoder (Wuerstchen CLIP Text Loader or a checkpoint)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt. Use an empty prompt for the negative, as the official notebooks."}),
        }}

    def encode(self, clip, text):
        clip = require(clip, "clip_text", "WuerstchenTextEncode", "clip")
        try:
            cond = text_conditioning(clip, [text])
        except (lora_lib.LoraError, ValueError) as exc:
            raise NodeError(f"WuerstchenTextEncode: {exc}") from None
        return (to_comfy(cond),)


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
        vis = require(clip_vision, "clip_vision", "WuerstchenImageVariation", "clip_vision")
        cond = from_comfy(conditioning, "WuerstchenImageVariation", "conditioning")
        with manager().running(vis.model), torch.no_grad():
            embeds = pipeline.encode_image_embeds(vis.module, image)
        out = pipeline.with_image_embeds(cond, embeds, [strength] * embeds.shape[0])
        return (to_comfy(out),)
