"""A whole layered edit from a folder of weights (the CLI's engine): picture + masks + operation ->
edited picture, through semantic encode, inversion, decomposition, fusion (Stage C), edit-aware
Stage B and Stage A.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..inputs import limits
from ..pipeline import stages as pipeline
from ..pipeline.stages import StageBSettings
from . import operations
from .fusion import EditSettings, decompose, fuse
from .guidance import Guidance
from .masks import as_mask
from .stage_b import ETA, sample_stage_b_edit


@dataclass
class EditRequest:
    """What to edit: ``image`` [1, 3, H, W] in [0, 1], one pixel mask per object, the operation."""

    image: torch.Tensor
    masks: Sequence[torch.Tensor]
    op: operations.Operation
    prompt: str = ""
    negative: str = ""
    seed: int = 0
    settings: EditSettings = field(default_factory=EditSettings)
    stage_b: StageBSettings = field(default_factory=lambda: StageBSettings(sampler="ddpm"))
    feather: int = 2  # Stage B latent cells


@dataclass
class EditResult:
    image: torch.Tensor  # [1, 3, H, W]
    stage_c: torch.Tensor  # the edited Stage C latent
    edit_cells: torch.Tensor  # [h, w] bool: the Stage C cells the edit regenerated
    offset_cells: tuple  # (dx, dy) a move was snapped to, else (0, 0)


def check_request(request: EditRequest) -> EditRequest:
    """The request with its picture and masks checked (sizes, empty masks, the operation against
    them): :class:`~wuerstchen.inputs.limits.RequestError` before any model loads."""
    image = limits.check_images(request.image, "the picture to edit")
    if image.shape[0] != 1:
        raise limits.RequestError(f"edit one picture at a time, got a batch of {image.shape[0]}")
    size = tuple(image.shape[-2:])
    limits.check_size(size[0], size[1], "the picture to edit")
    masks = [as_mask(m, size, f"mask {i}") for i, m in enumerate(request.masks, start=1)]
    operations.check(request.op, masks, size)
    request.settings.check()
    request.stage_b.check()
    if request.stage_b.sampler not in ETA:
        raise limits.RequestError(f"edit-aware Stage B samples with {' or '.join(ETA)}, not {request.stage_b.sampler!r}")
    return EditRequest(image, masks, request.op, request.prompt, request.negative, request.seed, request.settings,
                       request.stage_b, request.feather)


class LayeredEditor:
    """Runs :class:`EditRequest` on a :class:`~wuerstchen.pipeline.cascade.Cascade` (Stable Cascade weights)."""

    KINDS = ("stage_c", "stage_b", "stage_a", "effnet", "clip_text")

    def __init__(self, cascade):
        self.cascade = cascade

    @torch.no_grad()
    def run(self, request: EditRequest, progress: Optional[Callable[[str, int, int], None]] = None) -> EditResult:
        request = check_request(request)
        cascade = self.cascade
        cascade.files.require(list(self.KINDS), cascade.root)
        manager = cascade.manager

        def report(stage):
            def step(i, n, _x0=None):
                manager.hooks.check_interrupt()
                if progress is not None:
                    progress(stage, i, n)
            return step

        size = tuple(request.image.shape[-2:])
        picture, uncovered = operations.picture(request.op, request.image)
        cond = cascade.encode_prompts([request.prompt])
        uncond = cascade.encode_prompts([request.negative])
        eff = cascade.model("effnet")
        with manager.running(eff):
            latent = pipeline.encode_semantic(eff.module, picture, pipeline.stage_c_latent_size(*size))
        sc = cascade.model("stage_c")
        settings = request.settings
        with manager.running(sc):
            guidance = Guidance.prepare(sc.module, cond, uncond, cfg=settings.cfg, cfg_rho=settings.cfg_rho)
            layers = decompose(sc.module, latent, request.masks, guidance, settings, size, hole=uncovered,
                               progress=report("inversion"))
            offset = operations.transform(request.op, layers)
            layers = operations.apply(request.op, layers)
            latent_c, edit = fuse(sc.module, layers, guidance, settings, progress=report("stage_c"))
        latent_c = latent_c.float().cpu()
        sa = cascade.model("stage_a")
        with manager.running(sa):
            source_b = pipeline.encode_stage_a(sa.module, picture)
        sb = cascade.model("stage_b")
        with manager.running(sb):
            latent_b = sample_stage_b_edit(sb.module, latent_c, cond.clip_text_pooled, uncond.clip_text_pooled,
                                           source_b, edit, size=size, seed=request.seed, settings=request.stage_b,
                                           feather_cells=request.feather, callback=report("stage_b"))
        with manager.running(sa):
            images = pipeline.crop_to(pipeline.decode_stage_a(sa.module, latent_b), size)
        return EditResult(images, latent_c, edit, (offset.dx, offset.dy))
