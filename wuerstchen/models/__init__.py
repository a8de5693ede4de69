"""The Stable Cascade networks, with the official constructor keywords and state-dict layout."""

from .stage_a import StageA
from .stage_b import StageB
from .stage_c import StageC
from .effnet import EfficientNetEncoder
from .previewer import Previewer
from .controlnet import ControlNet

__all__ = ["StageA", "StageB", "StageC", "EfficientNetEncoder", "Previewer", "ControlNet"]
