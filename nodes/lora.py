"""Stage-C LoRA loader: official, kohya, OneTrainer, diffusers/peft, ComfyUI and LyCORIS files; stacks;
never alters the cache."""

from __future__ import annotations

import logging
import math

from wuerstchen import lora as lora_lib
from wuerstchen.weights_io import WeightFileError

from . import handles as H
from .host import NodeError, resolve_model, list_models
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
            },
        }

    def load(self, stage_c, lora_name, strength_model, strength_clip, clip=None):
        node = "WuerstchenLoraLoader"
        sc = require(stage_c, "stage_c", node, "stage_c")
        for name, value in (("strength_model", strength_model), ("strength_clip", strength_clip)):
            if not math.isfinite(float(value)):
                raise NodeError(f"{node}: {name} is {value}; set a finite number such as 1.0")
        path = resolve_model("lora", lora_name)
        try:
            lf = lora_lib.load_lora(path)
            matches = []
            if lf.stage_c or lf.stage_c_indexed:
                matches.append(lora_lib.check_lora(sc.module, lf, "stage_c"))
            if clip is not None and (lf.text or lf.embeddings):
                matches.append(lora_lib.check_lora(require(clip, "clip_text", node, "clip").module, lf, "text"))
        except (lora_lib.LoraError, WeightFileError) as exc:
            raise NodeError(f"{node}: {exc}") from None
        if not (lf.stage_c or lf.stage_c_indexed) and not (lf.text or lf.embeddings):
            raise NodeError(f"{node}: {lora_name} holds no Stage C or CLIP-G weights ({lf.summary()})")
        summary = lora_lib.describe_match(lf, matches)
        complete = not lf.unused and all(m.matched == m.total for m in matches)
        if clip is None and (lf.text or lf.embeddings):
            summary, complete = summary + "; its text-encoder part needs the clip input", False
        logging.getLogger("wuerstchen.lora").log(logging.INFO if complete else logging.WARNING,
                                                 "%s: %s", node, summary)
        new_c = sc.with_lora(lf, strength_model, strength_clip)
        new_clip = clip.with_lora(lf, strength_model, strength_clip) if clip is not None else None
        return (new_c, new_clip)
