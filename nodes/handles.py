"""What travels along our custom sockets: a loaded model plus what is applied on top of it.

Handles are immutable: a LoRA node returns a new handle with one more LoRA, so the cached base
model (shared by every graph that loaded the same file) is never changed by a node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from wuerstchen.checkpoints import LoadedModel

STAGE_C = "WUERSTCHEN_STAGE_C"
STAGE_B = "WUERSTCHEN_STAGE_B"
STAGE_A = "WUERSTCHEN_STAGE_A"
EFFNET = "WUERSTCHEN_EFFNET"
PREVIEWER = "WUERSTCHEN_PREVIEWER"
CLIP_TEXT = "WUERSTCHEN_CLIP"
CLIP_VISION = "WUERSTCHEN_CLIP_VISION"
CONTROLNET = "WUERSTCHEN_CONTROLNET"
CONTROL = "WUERSTCHEN_CONTROL"

# Keys we add to ComfyUI CONDITIONING / LATENT dicts (other nodes copy dicts and keep them).
COND_IMAGE_TOKENS = "wuerstchen_clip_img"  # [1, N, 768] image embeddings, strength applied
LATENT_SIZE = "wuerstchen_size"  # (height, width) the Stage C latent was made for
LATENT_COMPRESSION = "wuerstchen_compression"


@dataclass(frozen=True)
class ModelHandle:
    model: LoadedModel
    loras: Tuple = ()  # ((lora_file, strength_model, strength_clip), ...), applied at run time

    @property
    def module(self):
        return self.model.module

    def with_lora(self, lora, strength_model: float, strength_clip: float) -> "ModelHandle":
        return ModelHandle(self.model, self.loras + ((lora, float(strength_model), float(strength_clip)),))


@dataclass(frozen=True)
class ControlHint:
    """One ControlNet application: the net, its input map, strength and active step range."""

    controlnet: LoadedModel
    control_input: torch.Tensor  # [B, c_in, H, W] as the ControlNet expects it
    strength: float = 1.0
    start: float = 0.0  # fraction of the sampling run
    end: float = 1.0
    previous: Optional["ControlHint"] = None

    def chain(self):
        hint, out = self, []
        while hint is not None:
            out.append(hint)
            hint = hint.previous
        return list(reversed(out))
