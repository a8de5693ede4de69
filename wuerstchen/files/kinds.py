"""One record per kind of model file the pack knows: the single table everything else reads.

Checkpoint detection (which keys identify a kind, how its config is read off the shapes, how the
module is built), the cascade's missing-weights message (titles, official file names, where to
download them), the model manager (which kinds need the fp16 overflow guard), ``tiny-models``
(which files of which variant and dtype the release has) and the ComfyUI node host (which model
folders a loader lists) all come from here, so a new kind of file is one entry in :data:`KINDS`.

Two model families share the table: Stable Cascade and Würstchen v2 (:data:`FAMILIES`). A kind's
``role`` says which place in a cascade it fills, so one loader takes both families' networks of that
place (the Stage C loader takes the v2 prior); the VQGAN is one kind for both families.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, MutableMapping, Optional, Tuple

import torch
from torch import nn

from ..models import configs
from . import layouts
from . import v2_layouts

HF_STABLE_CASCADE = "https://huggingface.co/stabilityai/stable-cascade"
HF_STABLE_CASCADE_PRIOR = "https://huggingface.co/stabilityai/stable-cascade-prior"
HF_WUERSTCHEN = "https://huggingface.co/warp-ai/wuerstchen"
HF_WUERSTCHEN_PRIOR = "https://huggingface.co/warp-ai/wuerstchen-prior"
HF_WUERSTCHEN_ORIGINAL = "https://huggingface.co/dome272/wuerstchen"

STABLE_CASCADE = "stable_cascade"
WUERSTCHEN_V2 = "wuerstchen_v2"

# Our own ComfyUI model folder, listed first by every loader; it holds any kind of file.
OWN_FOLDER = "wuerstchen"


@dataclass(frozen=True)
class OfficialFile:
    """One file of a release: its path there, the variant it holds and the dtype it is stored in.

    ``family`` and ``download``: None means the kind's own (a kind shared by two families, the
    VQGAN, lists each family's files). ``spelling``: the key spelling of the file when it is not the
    module's own (one of the kind's ``spellings``). ``container``: the key of a pickled ``.pt`` dict
    that holds the weights (the original Würstchen files), "" for a flat file.
    """

    name: str
    variant: str
    dtype: torch.dtype = torch.float32
    family: Optional[str] = None
    download: Optional[str] = None
    spelling: str = ""
    container: str = ""


@dataclass(frozen=True)
class ModelKind:
    """What the pack knows about one kind of network file.

    ``markers`` are alternative sets of keys (relative to the network's own prefix), one set per
    file layout of the kind, whose presence identifies it; ``layout`` reads ``(variant, config)``
    off the shapes (see :mod:`wuerstchen.files.layouts`); ``configs`` are the official configs by variant.
    ``build(config)`` constructs the module (on the meta device when called under it) for the
    generic meta-build-and-assign loader; kinds whose files need a key conversion (the CLIP towers)
    give ``from_state_dict(sd, dtype, device, config)`` instead. ``anywhere``: the network may sit
    under any key prefix (the CLIP towers inside other programs' checkpoints), not only under the
    known wrapper prefixes. ``siblings``: keys such files keep beside the network instead of inside
    it (ComfyUI's checkpoints keep CLIP-G's text projection next to the tower), as alternative
    spellings ``(key, transposed)``; one found beside the network is used under the first spelling.

    ``absent``: key prefixes that must NOT be there (a kind whose markers are a subset of another's
    layout). ``accepts(shapes, hints)``: a last check, with the file's metadata configs by kind.
    ``respell``: rewrites another layout's key spelling into the module's, in place (it works on
    meta tensors too, so shapes are checked before anything is read); ``spellings``: the module's
    state dict in a release's other spelling, by name (what ``tiny-models`` writes). ``role``: the
    place in a cascade the network fills (its loader and socket), shared by the families' networks
    that fill it; "" means the kind's own name.
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
    absent: Tuple[str, ...] = ()
    # Extra checks beyond the markers: some kinds share marker keys with others.
    accepts: Callable[[layouts.Shapes, Mapping[str, dict]], bool] = lambda shapes, hints: True
    respell: Optional[Callable[[MutableMapping[str, torch.Tensor]], None]] = None
    spellings: Mapping[str, Callable[[Mapping[str, torch.Tensor]], Dict[str, torch.Tensor]]] = field(
        default_factory=dict)
    role: str = ""

    def variant_title(self, variant: str) -> str:
        return self.variant_titles.get(variant) or f"{self.title} [{variant}]"

    @property
    def slot(self) -> str:
        """The role this kind fills (see ``role``)."""
        return self.role or self.name

    def family_of(self, file: OfficialFile) -> str:
        return file.family or self.family

    def files_of(self, family: Optional[str] = None) -> Tuple[OfficialFile, ...]:
        """The release files of this kind (of one family, when given)."""
        return tuple(f for f in self.files if family is None or self.family_of(f) == family)

    def file_names(self, family: Optional[str] = None) -> str:
        """The release's file names of this kind, for messages."""
        return ", ".join(f.name for f in self.files_of(family))

    def sources(self, family: Optional[str] = None) -> List[Tuple[str, List[str]]]:
        """``[(download address, [file names])]`` of this kind's release files, for messages."""
        out: Dict[str, List[str]] = {}
        for f in self.files_of(family):
            out.setdefault(f.download or self.download, []).append(f.name)
        return list(out.items())

    def folder_list(self) -> Tuple[str, ...]:
        """The ComfyUI model folders a loader of this kind lists, our own folder first."""
        return (OWN_FOLDER,) + self.folders

    def identifies(self, shapes: layouts.Shapes, hints: Optional[Mapping[str, dict]] = None) -> bool:
        if not any(layouts.has_keys(shapes, keys) for keys in self.markers):
            return False
        if self.absent and any(k.startswith(self.absent) for k in shapes):
            return False
        return self.accepts(shapes, hints or {})


def _models():
    from .. import models

    return models


def _clip_text_from_state_dict(sd, dtype, device, config):
    from ..text.encoder import CLIPTextEncoder

    return CLIPTextEncoder.from_state_dict(sd, dtype=dtype, device=device, heads=config["heads"])


def _clip_vision_from_state_dict(sd, dtype, device, config):
    from ..text.vision import CLIPVisionEncoder

    return CLIPVisionEncoder.from_state_dict(sd, dtype=dtype, device=device, heads=config["heads"])


def _sc(names_and_variants, dtype_of=lambda name: torch.bfloat16 if "bf16" in name else torch.float32):
    return tuple(OfficialFile(n, v, dtype_of(n)) for n, v in names_and_variants)


def _previewer_blocks(shapes, hints) -> bool:
    return len(shapes["blocks.0.weight"]) == 4


def _has_text_projection(shapes, hints) -> bool:
    return "text_projection.weight" in shapes or "text_projection" in shapes


def _v2(module_name):
    def build(cfg):
        return getattr(_models(), module_name)(**cfg)

    return build


def _v2_attention_fused(sd):
    from ..models.wuerstchen_v2 import fuse_attention_keys

    fuse_attention_keys(sd)


def _v2_attention_split(sd):
    from ..models.wuerstchen_v2 import split_attention_keys

    return split_attention_keys(sd)


def _v2_text_from_state_dict(sd, dtype, device, config):
    from ..text.encoder import CLIPTextEncoder

    return CLIPTextEncoder.from_state_dict(sd, dtype=dtype, device=device, heads=config["heads"], family="v2")


_V2_TEXT_ROLES = {"v2_prior_text": "prior", "v2_decoder_text": "decoder"}


def _v2_text_fits(kind_name):
    def accepts(shapes, hints):
        named = [role for name, role in _V2_TEXT_ROLES.items() if name in hints]
        return v2_layouts.text_role_fits(_V2_TEXT_ROLES[kind_name], shapes, named)

    return accepts


# Diffusers' VQGAN (Würstchen v2 hub, stable-cascade's vqgan/ folder) names the codebook differently.
_CODEBOOK = ("vquantizer.codebook.weight", "vquantizer.embedding.weight")


def _codebook_ours(sd):
    if _CODEBOOK[1] in sd and _CODEBOOK[0] not in sd:
        sd[_CODEBOOK[0]] = sd.pop(_CODEBOOK[1])


def _codebook_diffusers(sd):
    return {(_CODEBOOK[1] if k == _CODEBOOK[0] else k): v for k, v in sd.items()}


def _v2_file(name, variant="official", download=None, **kw):
    return OfficialFile(name, variant, torch.float32, WUERSTCHEN_V2, download, **kw)


_V2_PT = dict(download=HF_WUERSTCHEN_ORIGINAL)
_V2_UNET = dict(fp16_guard=True, folders=("diffusion_models", "checkpoints"), family=WUERSTCHEN_V2,
                        respell=_v2_attention_fused, spellings={"diffusers": _v2_attention_split})


_KIND_LIST = (
    ModelKind(
        "stage_c", "Stage C (text-conditional prior)",
        files=_sc([("stage_c.safetensors", "full"), ("stage_c_bf16.safetensors", "full"),
                   ("stage_c_lite.safetensors", "lite"), ("stage_c_lite_bf16.safetensors", "lite")]),
        download=HF_STABLE_CASCADE,
        markers=(("clip_txt_mapper.weight", "clip_img_mapper.weight", "embedding.1.weight"),),
        layout=layouts.stage_c, configs=configs.STAGE_C, build=lambda cfg: _models().StageC(**cfg),
        variant_titles=configs.VARIANT_TITLES["stage_c"],
        fp16_guard=True, fp8=True, folders=("diffusion_models", "checkpoints"),
    ),
    ModelKind(
        "stage_b", "Stage B (latent decoder)",
        files=_sc([("stage_b.safetensors", "full"), ("stage_b_bf16.safetensors", "full"),
                   ("stage_b_lite.safetensors", "lite"), ("stage_b_lite_bf16.safetensors", "lite")]),
        download=HF_STABLE_CASCADE,
        markers=(("effnet_mapper.0.weight", "pixels_mapper.0.weight", "clip_mapper.weight"),),
        layout=layouts.stage_b, configs=configs.STAGE_B, build=lambda cfg: _models().StageB(**cfg),
        variant_titles=configs.VARIANT_TITLES["stage_b"],
        fp16_guard=True, fp8=True, folders=("diffusion_models", "checkpoints"),
    ),
    ModelKind(
        "stage_a", "Stage A (VQGAN)",
        # Würstchen v2 has the same VQGAN (it decodes 0.3764 · x): the family comes from the cascade.
        files=_sc([("stage_a.safetensors", "official")]) + (
            _v2_file("wuerstchen/vqgan/diffusion_pytorch_model.safetensors", download=HF_WUERSTCHEN + "/tree/main/vqgan",
                     spelling="diffusers"),
            _v2_file("vqgan_f4_v1_500k.pt", container="state_dict", **_V2_PT)),
        download=HF_STABLE_CASCADE,
        markers=(("in_block.1.weight", "vquantizer.codebook.weight"),
                 ("in_block.1.weight", "vquantizer.embedding.weight")),  # ours/official, diffusers
        layout=layouts.stage_a, configs={"official": configs.STAGE_A}, build=lambda cfg: _models().StageA(**cfg), folders=("vae",),
        respell=_codebook_ours, spellings={"diffusers": _codebook_diffusers},
    ),
    ModelKind(
        "controlnet", "Stage C ControlNet",
        files=_sc([("controlnet/canny.safetensors", "canny"), ("controlnet/inpainting.safetensors", "inpainting"),
                   ("controlnet/super_resolution.safetensors", "super_resolution")]),
        download=HF_STABLE_CASCADE, purpose="ControlNets only",
        markers=(("projections.0.0.weight", "projections.0.2.weight"),),
        accepts=lambda s, hints: any(k.startswith("backbone.") for k in s),
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
        absent=("mapper.1.weight",),  # the affine BatchNorm of Würstchen v2's compressor
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
        accepts=_has_text_projection,  # Würstchen v2's towers have none
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
    # ---- Würstchen v2 (the paper's model): hub diffusers folders and the original dome272 files
    ModelKind(
        "v2_prior", "Würstchen v2 prior (stage C)",
        files=(_v2_file("wuerstchen-prior/prior/diffusion_pytorch_model.safetensors", spelling="diffusers"),
               _v2_file("model_v3_stage_c.pt", container="ema_state_dict", **_V2_PT),
               _v2_file("model_v2_stage_c.pt", container="ema_state_dict", **_V2_PT),
               _v2_file("model_v2_stage_c_finetune_interpolation.pt", container="ema_state_dict", **_V2_PT)),
        download=HF_WUERSTCHEN_PRIOR + "/tree/main/prior",
        markers=(("projection.weight", "cond_mapper.0.weight", "cond_mapper.2.weight", "out.1.weight",
                  "blocks.2.attention.to_q.weight"),  # diffusers
                 ("projection.weight", "cond_mapper.0.weight", "cond_mapper.2.weight", "out.1.weight",
                  "blocks.2.attention.attn.in_proj_weight")),  # original
        accepts=lambda s, hints: v2_layouts.detect_v2_prior(s) is not None,
        layout=v2_layouts.prior_layout, configs={"official": configs.V2_PRIOR}, build=_v2("WuerstchenPrior"),
        variant_titles={"official": "Würstchen v2 prior (stage C)"}, role="stage_c", **_V2_UNET,
    ),
    ModelKind(
        "v2_decoder", "Würstchen v2 decoder (stage B)",
        files=(_v2_file("wuerstchen/decoder/diffusion_pytorch_model.safetensors", spelling="diffusers"),
               _v2_file("model_v2_stage_b.pt", container="state_dict", **_V2_PT)),
        download=HF_WUERSTCHEN + "/tree/main/decoder",
        markers=(("clip_mapper.weight", "embedding.1.weight", "clf.1.weight", "down_blocks.0.0.depthwise.weight"),),
        absent=("effnet_mapper.", "pixels_mapper.", "down_downscalers."),  # Stable Cascade's Stage B
        accepts=lambda s, hints: v2_layouts.detect_v2_decoder(s) is not None,
        layout=v2_layouts.decoder_layout, configs={"official": configs.V2_DECODER}, build=_v2("WuerstchenDiffNeXt"),
        variant_titles={"official": "Würstchen v2 decoder (stage B)"}, role="stage_b", **_V2_UNET,
    ),
    ModelKind(
        "v2_effnet", "Würstchen v2 EfficientNet semantic compressor",
        files=(_v2_file("model_v2_stage_b.pt", container="effnet_state_dict", **_V2_PT),),
        download=HF_WUERSTCHEN_ORIGINAL, purpose="img2img only", family=WUERSTCHEN_V2,
        markers=(("backbone.0.0.weight", "mapper.0.weight", "mapper.1.weight", "mapper.1.running_var"),),
        layout=v2_layouts.effnet_layout, configs={"official": configs.V2_EFFNET},
        build=lambda cfg: _models().EfficientNetEncoder(**cfg), folders=("vae",), role="effnet",
    ),
    ModelKind(
        "v2_prior_text", "Würstchen v2 prior text encoder (CLIP ViT-bigG-14)",
        files=(_v2_file("wuerstchen-prior/text_encoder/model.safetensors", "bigG"),),
        download=HF_WUERSTCHEN_PRIOR + "/tree/main/text_encoder", family=WUERSTCHEN_V2,
        markers=(("text_model.embeddings.token_embedding.weight",),), absent=("text_projection",),
        accepts=_v2_text_fits("v2_prior_text"), layout=v2_layouts.text_layout, from_state_dict=_v2_text_from_state_dict,
        folders=("text_encoders",), anywhere=True, role="clip_text",
        siblings=(("text_projection.weight", False), ("text_projection", True)),  # found there: not v2
    ),
    ModelKind(
        "v2_decoder_text", "Würstchen v2 decoder text encoder (CLIP ViT-H-14)",
        files=(_v2_file("wuerstchen/text_encoder/model.safetensors", "ViT-H-14"),),
        download=HF_WUERSTCHEN + "/tree/main/text_encoder", family=WUERSTCHEN_V2,
        markers=(("text_model.embeddings.token_embedding.weight",),), absent=("text_projection",),
        accepts=_v2_text_fits("v2_decoder_text"), layout=v2_layouts.text_layout, from_state_dict=_v2_text_from_state_dict,
        folders=("text_encoders",), anywhere=True, role="clip_text",
        siblings=(("text_projection.weight", False), ("text_projection", True)),
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
    # The original Würstchen v2 stage B file: a pickled dict of two state dicts (read as key prefixes).
    Bundle("model_v2_stage_b.pt", {"v2_decoder": "state_dict.", "v2_effnet": "effnet_state_dict."},
           torch.float32),
)

# Prefixes under which other programs store a network in a file: the usual single-model wrappers,
# ComfyUI's combined effnet + previewer VAE file, the containers of the original Würstchen v2 .pt
# files (a file with several is read with each as a key prefix; the EMA weights first), and the
# bundles' own.
WRAPPER_PREFIXES = tuple(dict.fromkeys(
    ["", "model.diffusion_model.", "diffusion_model.", "model.", "first_stage_model.", "module.", "encoder.",
     "previewer."]
    + [c + "." for c in v2_layouts.V2_CONTAINERS]
    + [p for b in BUNDLES for k, p in b.parts.items() if not KINDS[k].anywhere]
))


@dataclass(frozen=True)
class Family:
    """A model family the cascade runs: the kinds text-to-image needs, and img2img's encoder."""

    name: str
    title: str
    short: str  # the command line's --family value
    text_to_image: Tuple[str, ...]
    img2img: str


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family(STABLE_CASCADE, "Stable Cascade (Würstchen v3)", "v3", ("stage_c", "stage_b", "stage_a", "clip_text"),
           "effnet"),
    Family(WUERSTCHEN_V2, "Würstchen v2", "v2", ("v2_prior", "v2_decoder", "stage_a", "v2_prior_text",
                                                  "v2_decoder_text"), "v2_effnet"),
)}


def kinds_of_role(role: str) -> Tuple[str, ...]:
    """The kinds (of every family) that fill one role, e.g. ``stage_c`` -> Stage C and the v2 prior."""
    return tuple(name for name, kind in KINDS.items() if kind.slot == role)


def family_title(family: str) -> str:
    return FAMILIES[family].title if family in FAMILIES else family


def get(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown model kind {name!r}; known: {', '.join(KINDS)}") from None


def title(kind: str, variant: Optional[str] = None) -> str:
    """Human name of a kind (and variant) for messages."""
    k = get(kind)
    return k.variant_title(variant) if variant else k.title

