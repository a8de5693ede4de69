"""What travels along our custom sockets: a loaded model plus what is applied on top of it.

Handles are immutable: a LoRA node returns a new handle with one more LoRA, so the cached base
model (shared by every graph that loaded the same file) is never changed by a node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from wuerstchen.files.checkpoints import LoadedModel
from wuerstchen.pipeline.control import Hint
from wuerstchen.pipeline.stages import LoraUse

STAGE_C = "WUERSTCHEN_STAGE_C"
STAGE_B = "WUERSTCHEN_STAGE_B"
STAGE_A = "WUERSTCHEN_STAGE_A"
EFFNET = "WUERSTCHEN_EFFNET"
PREVIEWER = "WUERSTCHEN_PREVIEWER"
CLIP_TEXT = "WUERSTCHEN_CLIP"
CLIP_VISION = "WUERSTCHEN_CLIP_VISION"
CONTROLNET = "WUERSTCHEN_CONTROLNET"
CONTROL = "WUERSTCHEN_CONTROL"


@dataclass(frozen=True)
class ModelHandle:
    model: LoadedModel
    loras: Tuple[LoraUse, ...] = ()  # applied by the core while the model runs

    @property
    def module(self):
        return self.model.module

    def with_lora(self, use: LoraUse) -> "ModelHandle":
        return ModelHandle(self.model, self.loras + (use,))


@dataclass(frozen=True)
class ControlHint:
    """One ControlNet application (the core's prepared hint) and the loaded net it needs on the device."""

    controlnet: LoadedModel
    hint: Hint
    previous: Optional["ControlHint"] = None

    @property
    def control_input(self):
        return self.hint.control_input

    def chain(self) -> List["ControlHint"]:
        link, out = self, []
        while link is not None:
            out.append(link)
            link = link.previous
        return list(reversed(out))
