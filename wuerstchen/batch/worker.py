"""The worker: loads the models once (through the model manager, which keeps them resident) and
runs jobs, one :class:`Result` each. The same class runs in this process and as a Ray actor; it
imports no Ray.

Each job's images depend only on the job (its own seed draws its noise), so a job gives the same
picture whichever worker runs it and whatever ran before. A job that fails (a LoRA that does not
fit the model, out of memory, a missing ControlNet) comes back with its error; the worker goes on.
"""

from __future__ import annotations

import io
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..pipeline.cascade import Cascade, CascadeFiles
from ..pipeline.cascade_v2 import CascadeV2
from ..options.generate import FAMILY_FLAGS, _load_image, parse_control, parse_lora
from ..files.management import WEIGHT_DTYPES, ModelManager
from ..pipeline.stages import StageBSettings, StageCSettings
from ..pipeline.stages_v2 import DecoderSettings, PriorSettings
from .jobs import Job, control_spec, lora_spec


@dataclass
class Result:
    """What a worker made of one job: PNG bytes per image, or the error that stopped it."""

    name: str
    images: List[bytes] = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None
    worker: str = ""


def png_bytes(image: torch.Tensor) -> bytes:
    """[3, H, W] in [0, 1] -> PNG bytes (rounded to 8 bits as ``generate`` writes them)."""
    from PIL import Image

    arr = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


class Worker:
    """Runs jobs of one model family from ``models``, the models loaded once and kept resident."""

    def __init__(self, models: str, family: str, *, dtype: str = "auto", device: Optional[str] = None,
                 vram_budget: Optional[int] = None, embeddings: Optional[str] = None,
                 stage_c_variant: Optional[str] = None, stage_b_variant: Optional[str] = None,
                 threads: Optional[int] = None):
        if threads:
            torch.set_num_threads(threads)
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        if not Path(models).is_dir():
            raise FileNotFoundError(f"{self.id}: the models folder {models!r} is not here (every worker needs it at "
                                    "the same path)")
        self.family = family
        self.manager = ModelManager(dtype=WEIGHT_DTYPES[dtype], device=device, memory_budget=vram_budget)
        files = CascadeFiles.from_dir(models, stage_c_variant, stage_b_variant)
        kind = CascadeV2 if family == FAMILY_FLAGS["v2"] else Cascade
        self.cascade = kind(files, self.manager, root=models, embeddings=embeddings or str(Path(models) / "embeddings"))
        self.loras: Dict[str, object] = {}  # --lora spec -> LoraUse, each file read once

    def run(self, job: Job) -> Result:
        start = time.perf_counter()
        try:
            images = self.generate(job)
            pngs = [png_bytes(image) for image in images]
            return Result(job.name, pngs, time.perf_counter() - start, None, self.id)
        except Exception as exc:  # noqa: BLE001 - one job's failure is recorded; the others go on
            if self.manager.device.type == "cuda":
                torch.cuda.empty_cache()
            return Result(job.name, [], time.perf_counter() - start, f"{exc.__class__.__name__}: {exc}", self.id)

    def run_group(self, jobs: List[Job]) -> List[Result]:
        """Jobs that share size and settings, one after another on the resident models."""
        return [self.run(job) for job in jobs]

    def ready(self) -> str:
        return self.id

    def _lora(self, lora: dict):
        spec = lora_spec(lora)
        if spec not in self.loras:
            self.loras[spec] = parse_lora(spec)
        return self.loras[spec]

    def generate(self, job: Job) -> torch.Tensor:
        s = job.settings
        image = _load_image(s["image"]) if s["image"] else None
        common = dict(width=s["width"], height=s["height"], batch=s["batch"], seed=s["seed"], image=image)
        if job.family == FAMILY_FLAGS["v2"]:
            return self.cascade.generate(job.prompt, s["negative"], prior=PriorSettings(**s["prior"]),
                                         decoder=DecoderSettings(**s["decoder"]), denoise=s["denoise"], **common)
        mask = _load_image(s["mask"], "L", "--mask") if s["mask"] else None
        controls = [parse_control(control_spec(c), mask) for c in s["control"]]
        return self.cascade.generate(
            job.prompt, s["negative"], stage_c=StageCSettings(**s["stage_c"]), stage_b=StageBSettings(**s["stage_b"]),
            image_mode="variation" if s["variation"] else "img2img", compression=s["compression"],
            loras=[self._lora(x) for x in s["lora"]], controls=controls, **common)
