"""Loader nodes: pick a file from ComfyUI's model folders; it is identified by its contents."""

from __future__ import annotations

from pathlib import Path

from wuerstchen import kinds
from wuerstchen.checkpoints import CheckpointError
from wuerstchen.management import WEIGHT_DTYPES

from . import handles as H
from .host import NodeError, list_models, manager, resolve_model

CATEGORY = "wuerstchen/loaders"
DTYPES = WEIGHT_DTYPES
DTYPE_TIP = ("Weights dtype. auto: bf16 on GPUs that support it, fp16 (with the overflow guard) on older GPUs, "
             "fp32 on CPU. fp8_e4m3fn / fp8_e5m2: Stage B/C matrix weights stored in 8 bits (about half the "
             "memory of bf16, slightly less accurate; e4m3fn is the more precise), computed in the auto dtype; "
             "other networks load in the auto dtype.")


def load_kind(node: str, role: str, name: str, kind: str, dtype: str = "auto"):
    path = resolve_model(role, name)
    try:
        return manager().load(path, [kind], DTYPES[dtype])
    except CheckpointError as exc:
        raise NodeError(f"{node}: {exc}") from None


def _file_input(role: str, tip: str):
    return (list_models(role), {"tooltip": tip})


class _SingleLoader:
    """One file -> one network of ``KIND``."""

    ROLE = KIND = OUTPUT = NOTE = ""
    WITH_DTYPE = False
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        kind = kinds.get(cls.KIND)
        tip = f"{kind.title}: {kind.file_names()} of the release, or any file holding one (found by content). {cls.NOTE}"
        required = {"model_name": _file_input(cls.ROLE, tip.strip())}
        if cls.WITH_DTYPE:
            required["dtype"] = (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TIP})
        return {"required": required}

    def load(self, model_name, dtype="auto"):
        return (H.ModelHandle(load_kind(type(self).__name__, self.ROLE, model_name, self.KIND, dtype)),)


class WuerstchenStageCLoader(_SingleLoader):
    ROLE = KIND = "stage_c"
    RETURN_TYPES = (H.STAGE_C,)
    RETURN_NAMES = ("stage_c",)
    WITH_DTYPE = True
    DESCRIPTION = "Loads Stable Cascade's Stage C, the text-conditional prior (3.6B or 1B lite)."


class WuerstchenStageBLoader(_SingleLoader):
    ROLE = KIND = "stage_b"
    RETURN_TYPES = (H.STAGE_B,)
    RETURN_NAMES = ("stage_b",)
    WITH_DTYPE = True
    DESCRIPTION = "Loads Stable Cascade's Stage B, which turns a Stage C latent into a VQGAN latent."


class WuerstchenStageALoader(_SingleLoader):
    ROLE = KIND = "stage_a"
    RETURN_TYPES = (H.STAGE_A,)
    RETURN_NAMES = ("stage_a",)
    DESCRIPTION = "Loads Stage A, the VQGAN that decodes Stage B latents to pixels."


class WuerstchenSemanticCompressorLoader(_SingleLoader):
    ROLE = KIND = "effnet"
    RETURN_TYPES = (H.EFFNET,)
    RETURN_NAMES = ("semantic_compressor",)
    NOTE = "Also found inside ComfyUI's combined effnet+previewer VAE file."
    DESCRIPTION = "Loads the EfficientNetV2-S semantic compressor that encodes images into Stage C latents."


class WuerstchenPreviewerLoader(_SingleLoader):
    ROLE = KIND = "previewer"
    RETURN_TYPES = (H.PREVIEWER,)
    RETURN_NAMES = ("previewer",)
    NOTE = "Also found inside ComfyUI's combined effnet+previewer VAE file."
    DESCRIPTION = "Loads the Stage C previewer for fast previews of Stage C latents."


class WuerstchenCLIPTextLoader(_SingleLoader):
    ROLE = KIND = "clip_text"
    RETURN_TYPES = (H.CLIP_TEXT,)
    RETURN_NAMES = ("clip",)
    WITH_DTYPE = True
    NOTE = "Hugging Face or open_clip layout."
    DESCRIPTION = "Loads the CLIP-G text encoder with the official tokenizer behaviour."


class WuerstchenCLIPVisionLoader(_SingleLoader):
    ROLE = KIND = "clip_vision"
    RETURN_TYPES = (H.CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)
    NOTE = "From stable-cascade-prior; the same file as ComfyUI's clip_vision."
    DESCRIPTION = "Loads the ViT-L/14 image encoder used for image variations."


class WuerstchenControlNetLoader(_SingleLoader):
    ROLE = KIND = "controlnet"
    RETURN_TYPES = (H.CONTROLNET,)
    RETURN_NAMES = ("controlnet",)
    DESCRIPTION = "Loads a Stage C ControlNet (canny, inpainting/outpainting, super-resolution)."


CHECKPOINT_PARTS = ("stage_c", "stage_b", "stage_a", "effnet", "previewer", "clip_text", "clip_vision")


class WuerstchenCheckpointLoader:
    """ComfyUI's single-file Stable Cascade checkpoints hold several networks; return them all."""

    RETURN_TYPES = (H.STAGE_C, H.STAGE_B, H.STAGE_A, H.EFFNET, H.PREVIEWER, H.CLIP_TEXT, H.CLIP_VISION)
    RETURN_NAMES = ("stage_c", "stage_b", "stage_a", "semantic_compressor", "previewer", "clip", "clip_vision")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads stable_cascade_stage_c.safetensors / stable_cascade_stage_b.safetensors (the release's "
                   "ComfyUI checkpoints). Outputs that the file does not contain stay unconnected-empty.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": _file_input("checkpoint", "A single-file checkpoint: "
                                     + ", ".join(Path(b.name).name for b in kinds.BUNDLES) + "."),
            "dtype": (list(DTYPES), {"default": "auto", "tooltip": DTYPE_TIP}),
        }}

    def load(self, ckpt_name, dtype="auto"):
        path = resolve_model("checkpoint", ckpt_name)
        try:
            parts = manager().load_parts(path, CHECKPOINT_PARTS, DTYPES[dtype])
        except CheckpointError as exc:
            raise NodeError(f"WuerstchenCheckpointLoader: {exc}") from None
        return tuple(H.ModelHandle(parts[k]) if k in parts else None for k in CHECKPOINT_PARTS)


def require(handle, kind: str, node: str, socket: str):
    """The model behind a socket, or a clear message when a checkpoint output was empty."""
    if handle is None:
        raise NodeError(f"{node}: nothing arrives at '{socket}'. The checkpoint wired there has no "
                        f"{kinds.title(kind)}; load one with its own loader.")
    if handle.model.kind != kind:
        raise NodeError(f"{node}: '{socket}' expects {kinds.title(kind)}, got {handle.model.title}")
    return handle
