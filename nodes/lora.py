"""Stage-C LoRA loader: official, kohya, OneTrainer, diffusers/peft, ComfyUI and LyCORIS files; stacks;
never alters the cache."""

from __future__ import annotations

from wuerstchen import lora as lora_lib
from wuerstchen.pipeline.stages import LoraUse

from . import comfy_types as T
from . import handles as H
from .host import list_models, resolve_model
from .loaders import require

CATEGORY = "wuerstchen/loaders"


class WuerstchenLoraLoader:
    RETURN_TYPES = (H.STAGE_C, H.CLIP_TEXT)
    RETURN_NAMES = ("stage_c", "clip")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a Stage C LoRA (and its CLIP-G part and learned tokens) at sampling time. Reads the "
                   "official trainer's format, kohya, OneTrainer, diffusers/peft and ComfyUI files, LoRA, LoCon, "
                   "LoHa, LoKr, DoRA and full diffs. Chain loaders to stack. What a file holds that this model "
                   "does not have is left out and named in the log.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "stage_c": (H.STAGE_C, {"tooltip": "Stage C model to apply the LoRA to."}),
                "lora_name": (list_models("lora"), {"tooltip": "LoRA file from models/loras (or models/wuerstchen)."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                             "tooltip": "Strength on Stage C."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                            "tooltip": "Strength on the CLIP-G text encoder (if the LoRA has a text part)."}),
            },
            "optional": {
                "clip": (H.CLIP_TEXT, {"tooltip": "The CLIP-G text encoder, for LoRAs with a text part or learned tokens."}),
                "lora": ("WUERSTCHEN_LORA", {"tooltip": "A LoRA trained in this graph (Wuerstchen Train Stage-C "
                                                        "LoRA); used instead of lora_name."}),
            },
        }

    def load(self, stage_c, lora_name, strength_model, strength_clip, clip=None, lora=None):
        node = "WuerstchenLoraLoader"
        sc = require(stage_c, "stage_c", node, "stage_c")
        text = require(clip, "clip_text", node, "clip") if clip is not None else None
        path = resolve_model("lora", lora_name) if lora is None else None
        with T.node_errors(node):
            use = LoraUse(lora.file if lora is not None else lora_lib.load_lora(path), strength_model, strength_clip)
            use.check(sc.module, text.module if text is not None else None, who=node)
        return (sc.with_lora(use), text.with_lora(use) if text is not None else None)
