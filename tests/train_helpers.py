"""Tiny models and pictures shared by the training test files (imported by them, not a test module)."""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wuerstchen.files.checkpoints import build_module
from wuerstchen.text.encoder import CLIPTextEncoder
from wuerstchen.files.tiny import EFFNET, STAGE_C, TEXT, text_encoder_state, tiny_state


def tiny_stage_c(seed: int = 0):
    model = build_module("stage_c", STAGE_C)
    model.load_state_dict(tiny_state("stage_c", "full", seed))
    return model.eval()


def tiny_text_encoder(seed: int = 0):
    return CLIPTextEncoder.from_state_dict(text_encoder_state(seed), heads=TEXT["num_attention_heads"])


def tiny_effnet(seed: int = 0):
    model = build_module("effnet", EFFNET)
    model.load_state_dict(tiny_state("effnet", "official", seed))
    return model.eval()


def picture(i: int, size=(128, 128)) -> np.ndarray:
    """A smooth coloured pattern, different for each i (uint8 [H, W, 3])."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = [0.5 + 0.5 * np.sin(2 * math.pi * (x * (1 + i % 3) + y * (1 + i // 3) + c / 3 + i / 7)) for c in range(3)]
    return (np.stack(rgb, -1) * 255).astype(np.uint8)


def write_pictures(folder: Path, n: int = 8, size=(128, 128), caption="a photo of a [dog] number {i}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(picture(i, size)).save(folder / f"pic{i}.png")
        (folder / f"pic{i}.txt").write_text(caption.format(i=i), encoding="utf-8")
    return folder


def picture_tensor(i: int, size=(128, 128)) -> torch.Tensor:
    return torch.from_numpy(picture(i, size)).permute(2, 0, 1).float() / 255
