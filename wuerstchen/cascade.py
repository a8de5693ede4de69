"""Text-to-image with the whole cascade from a folder of weight files (the CLI's engine).

Files are found by what they contain (keys and shapes), not by their names: a folder with the
official release, ComfyUI's single-file checkpoints, or renamed files all work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import pipeline
from .checkpoints import KIND_TITLES, LoadedModel, inspect
from .management import ModelManager
from .pipeline import Conditioning, StageBSettings, StageCSettings
from .weights_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WeightFileError

HF_REPO = "https://huggingface.co/stabilityai/stable-cascade"
HF_PRIOR_REPO = "https://huggingface.co/stabilityai/stable-cascade-prior"

# Where each needed part comes from, for the missing-weights message.
NEEDED = {
    "stage_c": ("stage_c_bf16.safetensors (or stage_c_lite_bf16.safetensors)", HF_REPO),
    "stage_b": ("stage_b_bf16.safetensors (or stage_b_lite_bf16.safetensors)", HF_REPO),
    "stage_a": ("stage_a.safetensors", HF_REPO),
    "clip_text": ("text_encoder/model.safetensors", HF_REPO + "/tree/main/text_encoder"),
    "effnet": ("effnet_encoder.safetensors (img2img only)", HF_REPO),
    "clip_vision": ("image_encoder/model.safetensors (image variations only)", HF_PRIOR_REPO + "/tree/main/image_encoder"),
    "previewer": ("previewer.safetensors (previews only)", HF_REPO),
}


class MissingWeightsError(FileNotFoundError):
    pass


def scan_models(root: os.PathLike | str, skipped: Optional[list] = None) -> Dict[str, List[tuple]]:
    """Every usable network below ``root``: kind -> [(path, detection)]; symlinks are followed.

    A file that cannot be used (corrupt, truncated, a FIFO, a symlink loop, ...) never ends the
    scan: it is skipped with a logged warning naming it and why, and recorded in ``skipped`` (a
    list of :class:`~wuerstchen.model_files.SkippedFile`) when one is given, so a missing-weights
    message can say "stage_b.safetensors was found but is truncated" instead of "missing".
    """
    import logging

    from .model_files import SkippedFile, walk

    root = Path(root)
    found: Dict[str, List[tuple]] = {}
    if not root.exists():
        return found
    for path in walk(root):
        try:
            dets = inspect(path)
        except Exception as exc:  # noqa: BLE001 - one bad file must not hide the good ones
            record = SkippedFile.from_error(path, exc)
            logging.getLogger("wuerstchen").warning("skipped %s: %s", path, record.reason)
            if skipped is not None:
                skipped.append(record)
            continue
        for det in dets:
            found.setdefault(det.kind, []).append((path, det))
    return found


def _prefer(entries: List[tuple], variant: Optional[str]) -> tuple:
    """Pick a file: the requested variant, else the full model; single-purpose files first."""
    def score(entry):
        path, det = entry
        return (
            0 if variant is None or det.variant == variant else 1,
            0 if det.variant in ("full", "official", "bigG", "ViT-L-14") else 1,
            0 if det.prefix == "" else 1,
            str(path),
        )

    return sorted(entries, key=score)[0]


@dataclass
class CascadeFiles:
    parts: Dict[str, tuple] = field(default_factory=dict)  # kind -> (path, detection)

    @classmethod
    def from_dir(cls, root: os.PathLike | str, stage_c_variant: Optional[str] = None,
                 stage_b_variant: Optional[str] = None) -> "CascadeFiles":
        found = scan_models(root)
        parts = {}
        for kind, entries in found.items():
            variant = {"stage_c": stage_c_variant, "stage_b": stage_b_variant}.get(kind)
            parts[kind] = _prefer(entries, variant)
        return cls(parts)

    def require(self, kinds: Sequence[str], root: os.PathLike | str) -> None:
        missing = [k for k in kinds if k not in self.parts]
        if not missing:
            return
        lines = [f"Missing model weights in {root}:"]
        for k in missing:
            name, url = NEEDED[k]
            lines.append(f"  - {KIND_TITLES[k]}: {name}  (download from {url})")
        lines.append(f"Put the files anywhere under {root} (sub-folders are fine); they are recognised by "
                     "their contents, not their names. ComfyUI users can point --models at ComfyUI/models.")
        raise MissingWeightsError("\n".join(lines))


class Cascade:
    """Stage C -> Stage B -> Stage A from a folder of weights, with offloading between stages."""

    def __init__(self, files: CascadeFiles, manager: Optional[ModelManager] = None, root: str = "."):
        self.files = files
        self.manager = manager or ModelManager()
        self.root = root

    def model(self, kind: str) -> LoadedModel:
        self.files.require([kind], self.root)
        path, det = self.files.parts[kind]
        return self.manager.load(path, [kind])

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        te = self.model("clip_text")
        with self.manager.running(te):
            return pipeline.encode_text(te.module, prompts)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        negative: str = "",
        *,
        width: int = 1024,
        height: int = 1024,
        batch: int = 1,
        seed: int = 0,
        stage_c: StageCSettings = StageCSettings(),
        stage_b: StageBSettings = StageBSettings(),
        image: Optional[torch.Tensor] = None,
        image_mode: str = "img2img",
        compression: float = pipeline.OFFICIAL_COMPRESSION,
        progress: Optional[Callable[[str, int, int], None]] = None,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1]. ``image`` ([N, 3, H, W] in [0, 1]) is the img2img source
        (``image_mode='img2img'``, strength = ``stage_c.denoise``) or the variation reference."""
        pipeline.check_size(height, width)
        needed = ["stage_c", "stage_b", "stage_a", "clip_text"]
        if image is not None:
            needed.append("effnet" if image_mode == "img2img" else "clip_vision")
        self.files.require(needed, self.root)

        cond = self.encode_prompts([prompt])
        uncond = self.encode_prompts([negative])
        init_latent = None
        if image is not None and image_mode == "variation":
            vis = self.model("clip_vision")
            with self.manager.running(vis):
                embeds = pipeline.encode_image_embeds(vis.module, image.permute(0, 2, 3, 1))
            cond = pipeline.with_image_embeds(cond, embeds)
        elif image is not None:
            eff = self.model("effnet")
            latent_size = pipeline.stage_c_latent_size(height, width, compression)
            with self.manager.running(eff):
                init_latent = pipeline.encode_semantic(eff.module, image, latent_size)
            init_latent = init_latent[:1].expand(batch, -1, -1, -1) if init_latent.shape[0] == 1 else init_latent

        h_c, w_c = pipeline.stage_c_latent_size(height, width, compression)
        sc = self.model("stage_c")

        def report(stage):
            def step(i, n, x0):
                self.manager.hooks.check_interrupt()
                if progress is not None:
                    progress(stage, i, n)

            return step

        with self.manager.running(sc):
            latent_c = pipeline.sample_stage_c(
                sc.module, cond, uncond, shape=(batch, 16, h_c, w_c), init_latent=init_latent,
                seed=seed, settings=stage_c, callback=report("stage_c"),
            )
        sb = self.model("stage_b")
        with self.manager.running(sb):
            latent_b = pipeline.sample_stage_b(
                sb.module, latent_c, cond.clip_text_pooled, uncond.clip_text_pooled, size=(height, width),
                seed=seed, settings=stage_b, callback=report("stage_b"),
            )
        sa = self.model("stage_a")
        with self.manager.running(sa):
            images = pipeline.decode_stage_a(sa.module, latent_b)
        return images[:, :, :height, :width]
