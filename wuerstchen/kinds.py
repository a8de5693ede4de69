"""One record per kind of model file the pack knows: the single table everything else reads.

Checkpoint detection (which keys identify a kind, how its config is read off the shapes, how the
module is built), the cascade's missing-weights message (titles, official file names, where to
download them), the model manager (which kinds need the fp16 overflow guard), ``tiny-models``
(which files of which variant and dtype the release has) and the ComfyUI node host (which model
folders a loader lists) all come from here, so a new kind of file is one entry in :data:`KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from . import configs, layouts

HF_STABLE_CASCADE = "https://huggingface.co/stabilityai/stable-cascade"
HF_STABLE_CASCADE_PRIOR = "https://huggingface.co/stabilityai/stable-cascade-prior"

STABLE_CASCADE = "stable_cascade"

# Our own ComfyUI model folder, listed first by every loader; it holds any kind of file.
OWN_FOLDER = "wuerstchen"


@dataclass(frozen=True)
class OfficialFile:
    """One file of a release: its path there, the variant it holds and the dtype it is stored in."""

    name: str
    variant: str
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class ModelKind:
    """What the pack knows about one kind of network file.

    ``markers`` are alternative sets of keys (relative to the network's own prefix), one set per
    file layout of the kind, whose presence identifies it; ``layout`` reads ``(variant, config)``
    off the shapes (see :mod:`wuerstchen.layouts`); ``configs`` are the official configs by variant.
    ``build(config)`` constructs the module (on the meta device when called under it) for the
    generic meta-build-and-assign loader; kinds whose files need a key conversion (the CLIP towers)
    give ``from_state_dict(sd, dtype, device, config)`` instead. ``anywhere``: the network may sit
    under any key prefix (the CLIP towers inside other programs' checkpoints), not only under the
    known wrapper prefixes. ``siblings``: keys such files keep beside the network instead of inside
    it (ComfyUI's checkpoints keep CLIP-G's text projection next to the tower), as alternative
    spellings ``(key, transposed)``; one found beside the network is used under the first spelling.
    """

    name: str
    title: str
    files: Tuple[OfficialFile, ...]
    download: str
    markers: Tuple[Tuple[str, ...], ...]
    layout: Callable[[layouts.Shapes, Optional[dict]], layouts.Layout]
    build: Optional[Callable[[dict], nn.Module]] = None
    from_state_dict: Optional[Callable[..., nn.Module]] = None
    configs: Mapping[str, dict] = field(default_factory=dict)
    variant_titles: Mapping[str, str] = field(default_factory=dict)
    purpose: str = ""
    family: str = STABLE_CASCADE
    fp16_guard: bool = False
    fp8: bool = False  # may store its matrix weights in fp8: its layers upcast them as they run (models/ops.py)
    folders: Tuple[str, ...] = ()
    anywhere: bool = False
    siblings: Tuple[Tuple[str, bool], ...] = ()
    # Extra checks beyond the markers: some kinds share marker keys with others.
    accepts: Callable[[layouts.Shapes], bool] = lambda shapes: True

    def variant_title(self, variant: str) -> str:
        return self.variant_titles.get(variant) or f"{self.title} [{variant}]"

    def file_names(self) -> str:
        """The release's file names of this kind, for messages."""
        return ", ".join(f.name for f in self.files)

    def folder_list(self) -> Tuple[str, ...]:
        """The ComfyUI model folders a loader of this kind lists, our own folder first."""
        return (OWN_FOLDER,) + self.folders

    def identifies(self, shapes: layouts.Shapes) -> bool:
        return any(layouts.has_keys(shapes, keys) for keys in self.markers) and self.accepts(shapes)


def _models():
    from . import models

    return models


def _clip_text_from_state_dict(sd, dtype, device, config):
    from .text import CLIPTextEncoder

    return CLIPTextEncoder.from_state_dict(sd, dtype=dtype, device=device, heads=config["heads"])


def _clip_vision_from_state_dict(sd, dtype, device, config):
    from .vision import CLIPVisionEncoder

    return CLIPVisionEncoder.from_state_dict(sd, dtype=dtype, device=device, heads=config["heads"])


def _sc(names_and_variants, dtype_of=lambda name: torch.bfloat16 if "bf16" in name else torch.float32):
    return tuple(OfficialFile(n, v, dtype_of(n)) for n, v in names_and_variants)


def _previewer_blocks(shapes) -> bool:
    return len(shapes["blocks.0.weight"]) == 4


_KIND_LIST = (
    ModelKind(
        "stage_c", "Stage C (text-conditional prior)",
        files=_sc([("stage_c.safetensors", "full"), ("stage_c_bf16.safetensors", "full"),
                   ("stage_c_lite.safetensors", "lite"), ("stage_c_lite_bf16.safetensors", "lite")]),
        download=HF_STABLE_CASCADE,
        markers=(("clip_txt_mapper.weight", "clip_img_mapper.weight", "embedding.1.weight"),),
        layout=layouts.stage_c, configs=configs.STAGE_C, build=lambda cfg: _models().StageC(**cfg),
        variant_titles={"full": "Stage C (3.6B)", "lite": "Stage C lite (1B)"},
        fp16_guard=True, fp8=True, folders=("diffusion_models", "checkpoints"),
    ),
    ModelKind(
        "stage_b", "Stage B (latent decoder)",
        files=_sc([("stage_b.safetensors", "full"), ("stage_b_bf16.safetensors", "full"),
                   ("stage_b_lite.safetensors", "lite"), ("stage_b_lite_bf16.safetensors", "lite")]),
        download=HF_STABLE_CASCADE,
        markers=(("effnet_mapper.0.weight", "pixels_mapper.0.weight", "clip_mapper.weight"),),
        layout=layouts.stage_b, configs=configs.STAGE_B, build=lambda cfg: _models().StageB(**cfg),
        variant_titles={"full": "Stage B (3B / 1.5B params)", "lite": "Stage B lite (700M)"},
        fp16_guard=True, fp8=True, folders=("diffusion_models", "checkpoints"),
    ),
    ModelKind(
        "stage_a", "Stage A (VQGAN)",
        files=_sc([("stage_a.safetensors", "official")]), download=HF_STABLE_CASCADE,
        markers=(("in_block.1.weight", "vquantizer.codebook.weight"),
                 ("in_block.1.weight", "vquantizer.embedding.weight")),  # ours/official, diffusers
        layout=layouts.stage_a, configs={"official": configs.STAGE_A}, build=lambda cfg: _models().StageA(**cfg), folders=("vae",),
    ),
    ModelKind(
        "controlnet", "Stage C ControlNet",
        files=_sc([("controlnet/canny.safetensors", "canny"), ("controlnet/inpainting.safetensors", "inpainting"),
                   ("controlnet/super_resolution.safetensors", "super_resolution")]),
        download=HF_STABLE_CASCADE, purpose="ControlNets only",
        markers=(("projections.0.0.weight", "projections.0.2.weight"),),
        accepts=lambda s: any(k.startswith("backbone.") for k in s),
        layout=layouts.controlnet, configs=configs.CONTROLNET, build=lambda cfg: _models().ControlNet(**cfg),
        variant_titles={"canny": "Stage C ControlNet (canny)", "inpainting": "Stage C ControlNet (inpainting)",
                        "super_resolution": "Stage C ControlNet (super-resolution)"},
        folders=("controlnet",),
    ),
    ModelKind(
        "effnet", "EfficientNet semantic compressor (effnet_encoder)",
        files=_sc([("effnet_encoder.safetensors", "official")]), download=HF_STABLE_CASCADE,
        purpose="img2img only",
        markers=(("backbone.0.0.weight", "mapper.0.weight", "mapper.1.running_var"),),
        layout=layouts.effnet, configs={"official": configs.EFFNET}, build=lambda cfg: _models().EfficientNetEncoder(**cfg), folders=("vae",),
    ),
    ModelKind(
        "previewer", "Stage C previewer",
        files=_sc([("previewer.safetensors", "official")]), download=HF_STABLE_CASCADE, purpose="previews only",
        markers=(("blocks.0.weight", "blocks.2.running_mean"),), accepts=_previewer_blocks,
        layout=layouts.previewer, configs={"official": configs.PREVIEWER}, build=lambda cfg: _models().Previewer(**cfg), folders=("vae", "vae_approx"),
    ),
    ModelKind(
        "clip_text", "CLIP ViT-bigG-14 text encoder",
        files=_sc([("text_encoder/model.safetensors", "bigG")]), download=HF_STABLE_CASCADE + "/tree/main/text_encoder",
        markers=(("text_model.embeddings.token_embedding.weight",),  # Hugging Face
                 ("token_embedding.weight", "ln_final.weight")),  # open_clip
        layout=layouts.clip_text, from_state_dict=_clip_text_from_state_dict,
        folders=("text_encoders",), anywhere=True,
        siblings=(("text_projection.weight", False), ("text_projection", True)),
    ),
    ModelKind(
        "clip_vision", "CLIP ViT-L/14 image encoder",
        files=_sc([("image_encoder/model.safetensors", "ViT-L-14")]),
        download=HF_STABLE_CASCADE_PRIOR + "/tree/main/image_encoder", purpose="image variations only",
        markers=(("vision_model.embeddings.class_embedding",),),
        layout=layouts.clip_vision, from_state_dict=_clip_vision_from_state_dict,
        folders=("clip_vision",), anywhere=True,
    ),
)

KINDS: Dict[str, ModelKind] = {k.name: k for k in _KIND_LIST}
"""Every known kind by name, in detection order."""

@dataclass(frozen=True)
class Bundle:
    """A single file holding several networks under key prefixes: ComfyUI's checkpoints, which the
    release ships in its ``comfyui_checkpoints/`` folder."""

    name: str
    parts: Mapping[str, str]  # kind -> key prefix
    dtype: torch.dtype = torch.bfloat16


BUNDLES = (
    Bundle("stable_cascade_stage_c.safetensors",
           {"stage_c": "model.diffusion_model.", "effnet": "vae.encoder.", "previewer": "vae.previewer.",
            "clip_text": "text_encoder.", "clip_vision": "clip_l_vision."}),
    Bundle("stable_cascade_stage_b.safetensors",
           {"stage_b": "model.diffusion_model.", "stage_a": "vae.", "clip_text": "text_encoder."}),
)

# Prefixes under which other programs store a network in a file: the bundles' own, the usual
# single-model wrappers, and ComfyUI's combined effnet + previewer VAE file.
WRAPPER_PREFIXES = tuple(dict.fromkeys(
    ["", "model.diffusion_model.", "diffusion_model.", "model.", "first_stage_model.", "module.", "encoder.",
     "previewer."]
    + [p for b in BUNDLES for k, p in b.parts.items() if not KINDS[k].anywhere]
))


def get(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown model kind {name!r}; known: {', '.join(KINDS)}") from None


def title(kind: str, variant: Optional[str] = None) -> str:
    """Human name of a kind (and variant) for messages."""
    k = get(kind)
    return k.variant_title(variant) if variant else k.title

