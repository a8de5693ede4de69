"""Loader nodes: pick a file from ComfyUI's model folders; it is identified by its contents."""

from __future__ import annotations

from pathlib import Path

from wuerstchen.files import kinds
from wuerstchen.files.checkpoints import CheckpointError, inspect
from wuerstchen.files.management import WEIGHT_DTYPES

from . import handles as H
from .host import NodeError, list_models, manager, resolve_model

CATEGORY = "wuerstchen/loaders"
DTYPES = WEIGHT_DTYPES
DTYPE_TIP = ("Weights dtype. auto: bf16 on GPUs that support it, fp16 (with the overflow guard) on older GPUs, "
             "fp32 on CPU. fp8_e4m3fn / fp8_e5m2: Stage B/C matrix weights stored in 8 bits (about half the "
             "memory of bf16, slightly less accurate; e4m3fn is the more precise), computed in the auto dtype; "
             "other networks load in the auto dtype.")


def load_kind(node: str, role: str, name: str, kind, dtype: str = "auto"):
    """Load the network of ``kind`` (a kind name, or the kinds that may fill the loader's role) from a
    listed file; a file of another kind gets a message saying what it is and which loader takes it."""
    wanted = [kind] if isinstance(kind, str) else list(kind)
    path = resolve_model(role, name)
    try:
        return manager().load(path, wanted, DTYPES[dtype])
    except CheckpointError as exc:
        raise NodeError(f"{node}: {exc}{_loader_hint(path, node)}") from None


def _loader_hint(path, node: str) -> str:
    """' Load it with X.' for a file that another of our loaders takes."""
    from . import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    try:
        found = {d.kind for d in inspect(path)}
    except Exception:  # unreadable: the error above already says why
        return ""
    roles = {kinds.get(k).slot for k in found}
    takers = [name for name, cls in NODE_CLASS_MAPPINGS.items()
              if getattr(cls, "ROLE", None) in roles and name != node]
    if len(found) > 1 and node != "WuerstchenCheckpointLoader":
        takers.append("WuerstchenCheckpointLoader")
    if not takers:
        return ""
    return " Load it with " + " or ".join(f"{NODE_DISPLAY_NAME_MAPPINGS[t]} ({t})" for t in takers) + "."


def _file_input(role: str, tip: str):
    return (list_models(role), {"tooltip": tip})


class _SingleLoader:
    """One file -> one network of a kind that fills the loader's ``ROLE`` (for several roles, a
    Stable Cascade network or its Würstchen v2 counterpart: the model tells the samplers which)."""

    ROLE = OUTPUT = NOTE = ""
    WITH_DTYPE = False
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        accepted = "; or ".join(f"{kinds.get(k).title}: {kinds.get(k).file_names()}" for k in kinds.kinds_of_role(cls.ROLE))
        tip = f"{accepted} of the releases, or any file holding one (found by content). {cls.NOTE}"
        required = {"model_name": _file_input(cls.ROLE, tip.strip())}
        if cls.WITH_DTYPE:
            required["dtype"] = (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TIP})
        return {"required": required}

    def load(self, model_name, dtype="auto"):
        node = type(self).__name__
        return (H.ModelHandle(load_kind(node, self.ROLE, model_name, kinds.kinds_of_role(self.ROLE), dtype)),)


class WuerstchenStageCLoader(_SingleLoader):
    ROLE = "stage_c"
    RETURN_TYPES = (H.STAGE_C,)
    RETURN_NAMES = ("stage_c",)
    WITH_DTYPE = True
    DESCRIPTION = ("Loads Stable Cascade's Stage C, the text-conditional prior (3.6B or 1B lite), or the Würstchen v2 "
                   "prior (hub prior/ folder or the original model_v*_stage_c.pt).")


class WuerstchenStageBLoader(_SingleLoader):
    ROLE = "stage_b"
    RETURN_TYPES = (H.STAGE_B,)
    RETURN_NAMES = ("stage_b",)
    WITH_DTYPE = True
    DESCRIPTION = ("Loads Stable Cascade's Stage B, which turns a Stage C latent into a VQGAN latent, or the "
                   "Würstchen v2 decoder (hub decoder/ folder or the original model_v2_stage_b.pt).")


class WuerstchenStageALoader(_SingleLoader):
    ROLE = "stage_a"
    RETURN_TYPES = (H.STAGE_A,)
    RETURN_NAMES = ("stage_a",)
    DESCRIPTION = ("Loads Stage A, the VQGAN that decodes Stage B latents to pixels (Würstchen v2 uses the same "
                   "VQGAN: its vqgan/ folder or vqgan_f4_v1_500k.pt).")


class WuerstchenSemanticCompressorLoader(_SingleLoader):
    ROLE = "effnet"
    RETURN_TYPES = (H.EFFNET,)
    RETURN_NAMES = ("semantic_compressor",)
    NOTE = "Also found inside ComfyUI's combined effnet+previewer VAE file."
    DESCRIPTION = ("Loads the EfficientNetV2-S semantic compressor that encodes images into Stage C latents, or "
                   "Würstchen v2's (inside model_v2_stage_b.pt), which encodes them into v2 prior latents.")


class WuerstchenPreviewerLoader(_SingleLoader):
    ROLE = "previewer"
    RETURN_TYPES = (H.PREVIEWER,)
    RETURN_NAMES = ("previewer",)
    NOTE = "Also found inside ComfyUI's combined effnet+previewer VAE file."
    DESCRIPTION = "Loads the Stage C previewer for fast previews of Stage C latents."


class WuerstchenCLIPTextLoader(_SingleLoader):
    ROLE = "clip_text"
    RETURN_TYPES = (H.CLIP_TEXT,)
    RETURN_NAMES = ("clip",)
    WITH_DTYPE = True
    NOTE = "Hugging Face or open_clip layout."
    DESCRIPTION = ("Loads the CLIP-G text encoder with the official tokenizer behaviour, or one of Würstchen v2's "
                   "two text encoders (the prior's bigG, the decoder's ViT-H-14).")


class WuerstchenCLIPVisionLoader(_SingleLoader):
    ROLE = "clip_vision"
    RETURN_TYPES = (H.CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)
    NOTE = "From stable-cascade-prior; the same file as ComfyUI's clip_vision."
    DESCRIPTION = "Loads the ViT-L/14 image encoder used for image variations."


class WuerstchenControlNetLoader(_SingleLoader):
    ROLE = "controlnet"
    RETURN_TYPES = (H.CONTROLNET,)
    RETURN_NAMES = ("controlnet",)
    DESCRIPTION = "Loads a Stage C ControlNet (canny, inpainting/outpainting, super-resolution)."


CHECKPOINT_PARTS = ("stage_c", "stage_b", "stage_a", "effnet", "previewer", "clip_text", "clip_vision")  # roles


class WuerstchenCheckpointLoader:
    """Files that hold several networks (ComfyUI's single-file Stable Cascade checkpoints, the
    original Würstchen v2 stage B file); return them all."""

    RETURN_TYPES = (H.STAGE_C, H.STAGE_B, H.STAGE_A, H.EFFNET, H.PREVIEWER, H.CLIP_TEXT, H.CLIP_VISION)
    RETURN_NAMES = ("stage_c", "stage_b", "stage_a", "semantic_compressor", "previewer", "clip", "clip_vision")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads stable_cascade_stage_c.safetensors / stable_cascade_stage_b.safetensors (the release's "
                   "ComfyUI checkpoints) or Würstchen v2's model_v2_stage_b.pt (decoder + semantic compressor). "
                   "Outputs that the file does not contain stay unconnected-empty.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": _file_input("checkpoint", "A file holding several networks: "
                                     + ", ".join(Path(b.name).name for b in kinds.BUNDLES) + "."),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TIP}),
        }}

    def load(self, ckpt_name, dtype="auto"):
        node = "WuerstchenCheckpointLoader"
        path = resolve_model("checkpoint", ckpt_name)
        wanted = [k for role in CHECKPOINT_PARTS for k in kinds.kinds_of_role(role)]
        try:
            parts = manager().load_parts(path, wanted, DTYPES[dtype])
        except CheckpointError as exc:
            raise NodeError(f"{node}: {exc}{_loader_hint(path, node)}") from None
        by_role = {}
        for kind, model in parts.items():
            by_role.setdefault(kinds.get(kind).slot, model)
        return tuple(H.ModelHandle(by_role[r]) if r in by_role else None for r in CHECKPOINT_PARTS)


def _family_mismatch(got: str, want: str, node: str, socket: str):
    """The message for a network of the right role but the other family, or None."""
    got_kind, want_kind = kinds.get(got), kinds.get(want)
    if got_kind.slot != want_kind.slot or got_kind.family == want_kind.family:
        return None
    return (f"{node}: '{socket}' got {got_kind.title}, a {kinds.family_title(got_kind.family)} model, but {node} "
            f"works with {kinds.family_title(want_kind.family)} only ({want_kind.title})")


def require(handle, kind: str, node: str, socket: str):
    """The model behind a socket, or a clear message when a checkpoint output was empty, or when
    the network there is another kind (or the other family's network of the same role)."""
    if handle is None:
        raise NodeError(f"{node}: nothing arrives at '{socket}'. The checkpoint wired there has no "
                        f"{kinds.title(kind)}; load one with its own loader.")
    if handle.model.kind != kind:
        raise NodeError(_family_mismatch(handle.model.kind, kind, node, socket)
                        or f"{node}: '{socket}' expects {kinds.title(kind)}, got {handle.model.title}")
    return handle


def require_role(handle, role: str, node: str, socket: str):
    """The model behind a socket that takes any family's network of ``role`` (``handle.model.kind``
    says which)."""
    if handle is None:
        raise NodeError(f"{node}: nothing arrives at '{socket}'. The checkpoint wired there has no "
                        f"{' or '.join(kinds.title(k) for k in kinds.kinds_of_role(role))}; load one with its own loader.")
    if kinds.get(handle.model.kind).slot != role:
        raise NodeError(f"{node}: '{socket}' expects "
                        f"{' or '.join(kinds.title(k) for k in kinds.kinds_of_role(role))}, got {handle.model.title}")
    return handle
