"""The Stable Cascade networks (official constructor keywords and state-dict layout) and the
Würstchen v2 prior and decoder (diffusers constructor keywords; both key spellings load)."""

from .stage_a import StageA
from .stage_b import StageB
from .stage_c import StageC
from .effnet import EfficientNetEncoder
from .previewer import Previewer
from .controlnet import ControlNet
from .wuerstchen_v2 import WuerstchenDiffNeXt, WuerstchenPrior

__all__ = ["StageA", "StageB", "StageC", "EfficientNetEncoder", "Previewer", "ControlNet",
           "WuerstchenPrior", "WuerstchenDiffNeXt"]
