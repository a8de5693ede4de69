"""Stage C LoRA training in the graph: train (official recipe, ComfyUI progress, Cancel), save, plot."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from wuerstchen import train as core
from wuerstchen.train.save import save_lora_file, trained_lora
from wuerstchen.train.session import encode_dataset, train

from . import comfy_types as T
from . import handles as H
from .host import IN_COMFYUI, NodeError, Progress, folder_paths, manager, state
from .loaders import require

CATEGORY = "wuerstchen/train"
LORA = "WUERSTCHEN_LORA"  # a trained LoRA in memory (TrainedLora)
LOSS_MAP = "LOSS_MAP"  # ComfyUI's own type for loss histories ({"loss": [...]})


@dataclass(frozen=True)
class TrainedLora:
    """What travels on a WUERSTCHEN_LORA socket: the parsed LoRA (our loader's LoraFile) and its history."""

    file: object
    history: List[dict] = field(default_factory=list)


def _one(value):
    """Inputs arrive as lists (INPUT_IS_LIST); settings and models are single values."""
    return value[0] if isinstance(value, list) else value


def _data_folder(name: str) -> Path:
    """A folder by absolute path, or by name inside ComfyUI's input folder (as LoadImageTextSetFromFolder)."""
    path = Path(name)
    if not path.is_absolute() and IN_COMFYUI:
        path = Path(folder_paths.get_input_directory()) / name
    return path


def _examples(node: str, folder: str, images, captions, conditioning):
    if folder:
        if images is not None:
            raise NodeError(f"{node}: give either a folder or images, not both")
        return core.read_folder(_data_folder(folder))
    if images is None:
        raise NodeError(f"{node}: nothing to train on; wire images (+ captions or the conditioning of ComfyUI's "
                        "Load Image and Text Dataset from Folder) or name a folder")
    images = images if isinstance(images, list) else [images]
    count = sum(int(i.shape[0]) if i.dim() == 4 else 1 for i in images)
    if conditioning is not None:
        entries = list(conditioning)
        if entries and isinstance(entries[0], list) and entries[0] and isinstance(entries[0][0], list):
            entries = [e for c in entries for e in c]  # one CONDITIONING per list item (INPUT_IS_LIST)
        cond = T.conditioning_in(entries, node, "conditioning")
        if cond.clip_text.shape[1] != 77:
            raise NodeError(f"{node}: 'conditioning' holds captions of {cond.clip_text.shape[1]} tokens; training "
                            "takes 77 (captions of at most 75 tokens, as the official trainer truncates them)")
        examples = core.from_tensors(images, [""] * cond.clip_text.shape[0])
        for i, e in enumerate(examples):
            e.encoded = (cond.clip_text[i], cond.clip_text_pooled[i])
        return examples
    texts = [c for c in (captions if isinstance(captions, list) else [captions]) if c is not None]
    if len(texts) == 1 and count > 1 and "\n" in texts[0].strip():
        texts = [line for line in texts[0].strip().splitlines()]
    return core.from_tensors(images, texts or [""])


class WuerstchenTrainStageCLora:
    RETURN_TYPES = (LORA, LOSS_MAP)
    RETURN_NAMES = ("lora", "loss")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    DESCRIPTION = ("Trains a Stage C LoRA on pictures and captions with the official recipe (gdf cosine schedule, "
                   "epsilon target, P2 loss weight; LoRA on the attention weights; AdamW; 5% empty captions; "
                   "official aspect buckets). The result goes straight into Wuerstchen Stage C LoRA Loader; "
                   "the base models are never changed. Cancel stops it and leaves the models as they were.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "stage_c": (H.STAGE_C, {"tooltip": "The Stage C (full or lite) to train the LoRA for."}),
                "clip": (H.CLIP_TEXT, {"tooltip": "The CLIP-G text encoder that encodes the captions."}),
                "semantic_compressor": (H.EFFNET, {"tooltip": "The EfficientNet semantic compressor that turns the "
                                                              "pictures into Stage C latents."}),
                "steps": ("INT", {"default": 500, "min": 1, "max": 100000,
                                  "tooltip": "Optimizer updates (each of batch_size x grad_accumulation pictures)."}),
                "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "LoRA rank (official: 4)."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-6,
                                            "tooltip": "AdamW learning rate (official: 1e-4)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Pictures per micro-batch (all of one aspect bucket)."}),
                "grad_accumulation": ("INT", {"default": 1, "min": 1, "max": 256,
                                              "tooltip": "Micro-batches per update (official: 4)."}),
                "resolution": ("INT", {"default": 768, "min": 64, "max": 2048, "step": 32,
                                       "tooltip": "Bucket resolution; pictures keep their shape (official: 768)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF,
                                 "tooltip": "Seed of every random draw (LoRA start, pictures, noise, dropout)."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True,
                                                       "tooltip": "Recompute Stage C block activations in the "
                                                                  "backward pass: far less memory, ~30% slower."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Training pictures (a batch or a list), e.g. from ComfyUI's Load "
                                                "Image and Text Dataset from Folder."}),
                "captions": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "One caption per picture, one per line (or a list of strings); "
                                                   "one line for all pictures."}),
                "conditioning": ("CONDITIONING", {"tooltip": "Captions already encoded with a Stable Cascade CLIP-G "
                                                             "(the conditioning of Load Image and Text Dataset from "
                                                             "Folder); used instead of captions."}),
                "folder": ("STRING", {"default": "", "tooltip": "Or a folder of name.png + name.txt pairs (absolute, "
                                                                 "or inside ComfyUI's input folder)."}),
                "token": ("STRING", {"default": "", "tooltip": "Learned tokens, comma separated: [name]:REGEX adds "
                                                               "the word [name] starting as the mean of the tokens "
                                                               "matching REGEX (e.g. [fernando]:^dog</w>)."}),
            },
        }

    def train(self, stage_c, clip, semantic_compressor, steps, rank, learning_rate, batch_size, grad_accumulation,
              resolution, seed, gradient_checkpointing, images=None, captions=None, conditioning=None,
              folder=None, token=None):
        node = "WuerstchenTrainStageCLora"
        sc = require(_one(stage_c), "stage_c", node, "stage_c")
        te = require(_one(clip), "clip_text", node, "clip")
        eff = require(_one(semantic_compressor), "effnet", node, "semantic_compressor")
        tokens = [t.strip() for t in (_one(token) or "").split(",") if t.strip()]
        with T.node_errors(node):
            config = core.TrainConfig(steps=_one(steps), rank=_one(rank), lr=_one(learning_rate),
                                      batch=_one(batch_size), accum=_one(grad_accumulation),
                                      resolution=_one(resolution), seed=_one(seed), tokens=tokens,
                                      gradient_checkpointing=_one(gradient_checkpointing))
            if tokens and conditioning is not None:
                raise NodeError(f"{node}: learned tokens need the captions as text; give captions instead of "
                                "'conditioning'")
            examples = _examples(node, _one(folder) or "", images, captions, conditioning)
            mgr = manager()
            data = encode_dataset(mgr, eff.model, examples, config.resolution)
            progress = Progress(config.steps)  # moves with the updates; raises on Cancel (models restored)
            trainer = train(mgr, sc.model, te.model, data, config,
                            on_step=lambda step, total, record: progress(step, total))
            lora = trained_lora(trainer, name=f"trained LoRA ({trainer.step} steps)", base_model=sc.model.title)
        history = [r["loss"] for r in trainer.history]
        return (TrainedLora(lora, list(trainer.history)), {"loss": history})


class WuerstchenSaveLora:
    RETURN_TYPES = ()
    FUNCTION = "save"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = "Saves a trained LoRA into models/loras (official format, with its recipe in the metadata)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA, {"tooltip": "The LoRA from Wuerstchen Train Stage-C LoRA."}),
                "filename_prefix": ("STRING", {"default": "wuerstchen_lora",
                                               "tooltip": "File name in models/loras; _00001 etc. is appended."}),
            },
        }

    def save(self, lora, filename_prefix):
        node = "WuerstchenSaveLora"
        prefix = (filename_prefix or "").strip()
        if not re.fullmatch(r"[\w .\-]+", prefix) or prefix.startswith("."):
            raise NodeError(f"{node}: filename_prefix {filename_prefix!r} must be a plain file name (letters, digits, "
                            "spaces, . _ -), no folders")
        folder = lora_folder(node)
        folder.mkdir(parents=True, exist_ok=True)
        n = 1
        while (folder / f"{prefix}_{n:05d}.safetensors").exists():
            n += 1
        path = folder / f"{prefix}_{n:05d}.safetensors"
        with T.node_errors(node):
            save_lora_file(lora.file, path)
        return {"ui": {"text": [path.name]}, "result": ()}


def lora_folder(node: str) -> Path:
    if IN_COMFYUI:
        return Path(folder_paths.get_folder_paths("loras")[0])
    root = state().models_root
    if root is None:
        raise NodeError(f"{node}: no models folder is configured (set WUERSTCHEN_MODELS_DIR)")
    return root / "loras"


class WuerstchenLossPlot:
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)
    FUNCTION = "plot"
    CATEGORY = CATEGORY
    DESCRIPTION = "Draws the loss of each training step (light) and its moving average (dark)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "loss": (LOSS_MAP, {"tooltip": "The loss history from Wuerstchen Train Stage-C LoRA (or ComfyUI's "
                                               "Train LoRA)."}),
                "width": ("INT", {"default": 512, "min": 128, "max": 2048, "tooltip": "Picture width."}),
                "height": ("INT", {"default": 256, "min": 96, "max": 2048, "tooltip": "Picture height."}),
            },
        }

    def plot(self, loss, width, height):
        from wuerstchen.train.plot import loss_plot

        values = loss.get("loss", []) if isinstance(loss, dict) else list(loss)
        image = torch.from_numpy(loss_plot(values, width, height)).unsqueeze(0)
        return (image,)


class WuerstchenApplyTrainedLora:
    RETURN_TYPES = (H.STAGE_C, H.CLIP_TEXT)
    RETURN_NAMES = ("stage_c", "clip")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a LoRA trained in this graph at sampling time, like Wuerstchen Stage C LoRA Loader "
                   "does with a file (which also takes it on its 'lora' input); its learned tokens go to the CLIP-G.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "stage_c": (H.STAGE_C, {"tooltip": "Stage C model to apply the LoRA to."}),
                "lora": (LORA, {"tooltip": "The LoRA from Wuerstchen Train Stage-C LoRA."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                             "tooltip": "Strength on Stage C."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                            "tooltip": "Strength of the learned tokens."}),
            },
            "optional": {
                "clip": (H.CLIP_TEXT, {"tooltip": "The CLIP-G text encoder, for the learned tokens."}),
            },
        }

    def apply(self, stage_c, lora, strength_model, strength_clip, clip=None):
        from .lora import WuerstchenLoraLoader

        return WuerstchenLoraLoader().load(stage_c, "", strength_model, strength_clip, clip=clip, lora=lora)
