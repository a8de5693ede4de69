"""ControlNet apply: turns an image (and mask) into the input the official ControlNet expects.

* canny (1 channel): the edge map in [0, 1] (wire an edge image, e.g. from ComfyUI's Canny node);
* inpainting (4 channels): the image with the masked area set to white, then the mask, as the
  official InpaintFilter builds it;
* super-resolution (16 channels): the semantic-compressor latent of the low-resolution image,
  upscaled 2x (nearest), as the official SREffnetFilter; sample Stage C at twice the size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wuerstchen import pipeline

from . import handles as H
from .host import NodeError, manager
from .loaders import require

CATEGORY = "wuerstchen/controlnet"


def _mask_tensor(mask: torch.Tensor, batch: int, size) -> torch.Tensor:
    m = mask.float()
    if m.dim() == 2:
        m = m[None]
    m = m[:, None]
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="nearest")
    if m.shape[0] != batch:
        m = m[:1].expand(batch, -1, -1, -1)
    return (m > 0.5).float()


def control_input(node: str, controlnet: H.ModelHandle, image: torch.Tensor, mask=None, effnet=None) -> torch.Tensor:
    cfg = controlnet.model.config
    x = pipeline.from_image_layout(image)
    c_in = cfg["c_in"]
    if cfg["bottleneck_mode"] == "large" or c_in == 16:
        if effnet is None:
            raise NodeError(f"{node}: the super-resolution ControlNet needs the semantic compressor; connect "
                            "'semantic_compressor'")
        eff = require(effnet, "effnet", node, "semantic_compressor")
        size = (max(1, round(x.shape[-2] / 32)), max(1, round(x.shape[-1] / 32)))
        with manager().running(eff.model):
            latent = pipeline.encode_semantic(eff.module, x, size)
        return F.interpolate(latent, scale_factor=2, mode="nearest")
    if c_in == 1:
        return x.mean(dim=1, keepdim=True)
    if c_in == 4:
        if mask is None:
            raise NodeError(f"{node}: the inpainting ControlNet needs a mask (white = area to repaint); connect 'mask'")
        m = _mask_tensor(mask, x.shape[0], x.shape[-2:])
        return torch.cat([torch.where(m > 0.5, torch.ones_like(x), x), m], dim=1)
    if c_in == 3:
        return x
    raise NodeError(f"{node}: a ControlNet with {c_in} input channels is not supported")


class WuerstchenControlNetApply:
    RETURN_TYPES = (H.CONTROL,)
    RETURN_NAMES = ("control",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Prepares a Stable Cascade ControlNet hint for the Stage C sampler: canny (edge image), "
                   "inpainting (image + mask) or super-resolution (low-res image + semantic compressor). Chain "
                   "several with 'previous'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "controlnet": (H.CONTROLNET, {"tooltip": "A loaded ControlNet."}),
                "image": ("IMAGE", {"tooltip": "Canny: the edge image. Inpainting: the image to repaint. "
                                               "Super-resolution: the low-resolution image."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Scale of the ControlNet's contribution (1.0 = official)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Fraction of the sampling run where the hint starts."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Fraction of the sampling run where the hint ends."}),
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
        if end_percent < start_percent:
            raise NodeError(f"{node}: end_percent ({end_percent}) is before start_percent ({start_percent})")
        inp = control_input(node, cn, image, mask, semantic_compressor)
        return (H.ControlHint(cn.model, inp, float(strength), float(start_percent), float(end_percent), previous),)
