"""ControlNet apply: the core's official input recipe for the loaded ControlNet, as a chainable hint.

The recipe follows the ControlNet (see :mod:`wuerstchen.pipeline.control`): canny takes a picture (edges are
computed as the official CannyFilter does) or an edge map such as ComfyUI's Canny node makes (used
as it is); inpainting takes the image and a mask; super-resolution the low-resolution image and
the semantic compressor.
"""

from __future__ import annotations

from wuerstchen.pipeline import control

from . import comfy_types as T
from . import handles as H
from .host import NodeError, manager
from .loaders import require

CATEGORY = "wuerstchen/controlnet"
SOCKETS = {"mask": "mask", "effnet": "semantic_compressor"}  # what a recipe lacks -> where to connect it


class WuerstchenControlNetApply:
    RETURN_TYPES = (H.CONTROL,)
    RETURN_NAMES = ("control",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Prepares a Stable Cascade ControlNet hint for the Stage C sampler: canny (a picture, or an edge "
                   "image from a Canny node), inpainting (image + mask) or super-resolution (low-res image + "
                   "semantic compressor). Chain several with 'previous'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "controlnet": (H.CONTROLNET, {"tooltip": "A loaded ControlNet."}),
                "image": ("IMAGE", {"tooltip": "Canny: a picture (edges are computed the official way) or a "
                                               "black-and-white edge image (used as it is). Inpainting: the image "
                                               "to repaint. Super-resolution: the low-resolution image."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Scale of the ControlNet's contribution (1.0 = official)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Fraction of the sampling steps where the hint starts "
                                                       "(img2img: of the steps actually run)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Fraction of the sampling steps where the hint ends: 0.5 of "
                                                     "20 steps = the first 10."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Inpainting only: 1/white = repaint."}),
                "semantic_compressor": (H.EFFNET, {"tooltip": "Super-resolution only: the effnet encoder."}),
                "previous": (H.CONTROL, {"tooltip": "Another hint to combine with."}),
            },
        }

    def apply(self, controlnet, image, strength, start_percent, end_percent, mask=None, semantic_compressor=None,
              previous=None):
        node = "WuerstchenControlNetApply"
        cn = require(controlnet, "controlnet", node, "controlnet")
        eff = require(semantic_compressor, "effnet", node, "semantic_compressor") if semantic_compressor else None
        images, masks = T.images_in(image, node), T.mask_in(mask, node)
        try:
            control.check_range(strength, start_percent, end_percent)
            with manager().running(*([eff.model] if eff else [])):
                inp = control.control_input(control.kind_of(cn.model.config), images, masks,
                                            eff.module if eff else None)
            hint = control.Hint(cn.module, inp, float(strength), float(start_percent), float(end_percent))
        except control.ControlInputError as exc:
            raise NodeError(f"{node}: {exc}; connect '{SOCKETS[exc.missing]}'") from None
        except ValueError as exc:
            raise NodeError(f"{node}: {exc}") from None
        return (H.ControlHint(cn.model, hint, previous),)
