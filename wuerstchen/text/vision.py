"""CLIP image encoder for Stable Cascade's image conditioning (OpenAI ViT-L/14 by default).

Stage C's ``clip_img`` is ``image_embeds.unsqueeze(1)`` of the ViT-L/14 tower (768 wide), or
zeros [B, 1, 768] when no image is used.  The tower is open_clip's ``VisionTransformer`` (held
as ``self.visual``, so open_clip checkpoints load as they are): patch conv without bias, class
token first, position embedding, ``ln_pre``, pre-LN blocks with quick_gelu, ``ln_post`` on the
class token, projection without bias.  The released ``image_encoder/model.safetensors`` uses the
Hugging Face names (``pre_layrnorm`` sic, split q/k/v, ``visual_projection`` [proj, width]);
they are converted on load.
"""

from __future__ import annotations

import functools
import math
from types import MappingProxyType
from typing import Mapping, NamedTuple

import torch
from torch import nn

from open_clip.transformer import VisionTransformer

from .clip_transformer import (ACTIVATIONS, assemble, build_transformer, find_prefix,
                               hf_layer_key_to_param, place, run_blocks, unknown_keys_error)
from ..inputs.preprocess import clip_preprocess

__all__ = [
    "VITL14_VISION_CONFIG", "CLIPVisionEncoder", "VisionEncoding",
    "convert_vision_state_dict", "vision_config_from_state_dict",
]

VITL14_VISION_CONFIG = MappingProxyType(dict(
    image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_width=4096,
    projection_dim=768, activation="quick_gelu", layer_norm_eps=1e-5,
))

_HF_ANCHOR = "vision_model.embeddings.patch_embedding.weight"
_OPEN_CLIP_ANCHOR = "conv1.weight"
_HF_RENAMES = {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
_HF_LAYER_HEAD = "vision_model.encoder.layers."
_FOREIGN_HF = ("text_model.", "text_projection.", "logit_scale", "logit_bias")
_OPEN_CLIP_NAMES = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.",
                    "transformer.", "ln_post.", "proj")
# Widths whose released towers do not use 64-wide heads.
_KNOWN_HEADS = {1664: 16}


class VisionEncoding(NamedTuple):
    image_embeds: torch.Tensor       # [B, P] projected class token = Stage C clip_img[:, 0]
    pooled_output: torch.Tensor      # [B, W] ln_post(class token)
    last_hidden_state: torch.Tensor  # [B, T, W] last block output (not normalised)
    hidden_states: tuple[torch.Tensor, ...] | None  # ln_pre(embeddings), then each block


def convert_vision_state_dict(sd: Mapping[str, torch.Tensor], prefix: str | None = None,
                              dtype: torch.dtype | None = None,
                              device=None) -> dict[str, torch.Tensor]:
    """HF (``vision_model.*``) or open_clip (``visual.*``) layout -> this module's state dict.

    The tower is found by its patch-embedding key (``prefix`` overrides); keys outside it, text
    towers, ``logit_scale`` and ``position_ids`` are ignored; anything else unknown raises.
    """
    if prefix is None:
        prefix, _ = find_prefix(sd.keys(), (_HF_ANCHOR, _OPEN_CLIP_ANCHOR), "CLIP vision")
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    pieces: dict[str, list[tuple[slice | None, torch.Tensor]]] = {}
    unknown = []
    if _HF_ANCHOR in own:
        width = own[_HF_ANCHOR].shape[0]
        for key, tensor in own.items():
            if key.endswith("position_ids") or key.startswith(_FOREIGN_HF):
                continue
            rows = None
            if key in _HF_RENAMES:
                name = _HF_RENAMES[key]
            elif key == "visual_projection.weight":  # [proj, width] -> open_clip proj [width, proj]
                name, tensor = "proj", tensor.t().contiguous()
            elif key.startswith(_HF_LAYER_HEAD):
                try:
                    name, rows = hf_layer_key_to_param(key[len(_HF_LAYER_HEAD):], width)
                except KeyError:
                    unknown.append(prefix + key)
                    continue
            else:
                unknown.append(prefix + key)
                continue
            pieces.setdefault("visual." + name, []).append((rows, place(tensor, dtype, device)))
    else:
        width = own[_OPEN_CLIP_ANCHOR].shape[0]
        for key, tensor in own.items():
            if not key.startswith(_OPEN_CLIP_NAMES):
                unknown.append(prefix + key)
                continue
            pieces["visual." + key] = [(None, place(tensor, dtype, device))]
    if unknown:
        raise unknown_keys_error("CLIP vision", unknown)
    return assemble(pieces, width, "CLIP vision")


def vision_config_from_state_dict(sd: Mapping[str, torch.Tensor], prefix: str | None = None,
                                  heads: int | None = None, activation: str = "quick_gelu") -> dict:
    """Constructor kwargs from tensor shapes.  Heads default to width // 64 (16 for ViT-L/14);
    the activation cannot be seen in shapes and defaults to OpenAI's quick_gelu."""
    ours = convert_vision_state_dict(sd, prefix=prefix, device="meta")
    width, _, patch, _ = ours["visual.conv1.weight"].shape
    grid = math.isqrt(ours["visual.positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != ours["visual.positional_embedding"].shape[0]:
        raise ValueError("non-square position embedding: only square CLIP image towers are "
                         "supported")
    layers = 0
    while f"visual.transformer.resblocks.{layers}.ln_1.weight" in ours:
        layers += 1
    return dict(
        image_size=grid * patch, patch_size=patch, width=width, layers=layers,
        heads=heads or _KNOWN_HEADS.get(width, max(1, width // 64)),
        mlp_width=ours["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=ours["visual.proj"].shape[1], activation=activation,
    )


class CLIPVisionEncoder(nn.Module):
    """CLIP image tower giving ``image_embeds`` (default config: OpenAI ViT-L/14)."""

    def __init__(self, image_size: int = 224, patch_size: int = 14, width: int = 1024,
                 layers: int = 24, heads: int = 16, mlp_width: int = 4096,
                 projection_dim: int = 768, activation: str = "quick_gelu",
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.image_size = image_size
        norm = functools.partial(nn.LayerNorm, eps=layer_norm_eps)
        # open_clip sizes the MLP by ratio; the stack is replaced below by one of exact width.
        self.visual = VisionTransformer(
            image_size=image_size, patch_size=patch_size, width=width, layers=0, heads=heads,
            mlp_ratio=4.0, output_dim=projection_dim, act_layer=ACTIVATIONS[activation],
            norm_layer=norm,
        )
        self.visual.transformer = build_transformer(width, layers, heads, mlp_width, activation,
                                                    layer_norm_eps)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device=None, *, prefix: str | None = None, heads: int | None = None,
                        activation: str = "quick_gelu") -> "CLIPVisionEncoder":
        """Build on meta and fill with the converted tensors directly, in ``dtype``."""
        config = vision_config_from_state_dict(sd, prefix=prefix, heads=heads,
                                               activation=activation)
        ours = convert_vision_state_dict(sd, prefix=prefix, dtype=dtype, device=device)
        with torch.device("meta"):
            model = cls(**config)
        model.load_state_dict(ours, strict=True, assign=True)
        return model.eval()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False
                ) -> VisionEncoding:
        visual = self.visual
        weight = visual.conv1.weight
        x = visual.conv1(pixel_values.to(device=weight.device, dtype=weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, patches, W], row-major patch order
        cls_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        last, hidden = run_blocks(visual.transformer, x, None, collect=output_hidden_states)
        pooled = visual.ln_post(last[:, 0])
        return VisionEncoding(
            image_embeds=pooled @ visual.proj,
            pooled_output=pooled,
            last_hidden_state=last,
            hidden_states=(x, *hidden) if output_hidden_states else None,
        )

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``image_embeds`` [B, P] of preprocessed ``pixel_values`` [B, 3, S, S]."""
        return self.forward(pixel_values).image_embeds

    def encode_images(self, images, pipeline: str = "official_notebook") -> torch.Tensor:
        """Raw images (PIL, uint8 HWC, or ComfyUI float [B, H, W, 3]) -> Stage C ``clip_img``
        [B, 1, P], preprocessed the official way (see ``wuerstchen.inputs.preprocess``)."""
        if self.image_size != 224:
            raise ValueError(f"the CLIP preprocessing makes 224x224 images; this tower takes "
                             f"{self.image_size}x{self.image_size}")
        return self.encode(clip_preprocess(images, pipeline)).unsqueeze(1)
