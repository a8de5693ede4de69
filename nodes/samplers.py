"""The Stage C and Stage B sampler nodes (official DDPM by default, with ComfyUI progress and previews)."""

from __future__ import annotations

import contextlib
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from wuerstchen import lora as lora_lib
from wuerstchen import pipeline
from wuerstchen.sampling import SAMPLERS
from wuerstchen.schedule import img2img_steps

from . import handles as H
from .conditioning import from_comfy
from .host import NodeError, Progress, manager, previews_enabled
from .latents import output_size, stage_b_to_comfy, stage_c_latent
from .loaders import require

CATEGORY = "wuerstchen/sampling"
SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF, "control_after_generate": True,
                "tooltip": "Noise seed; noise is drawn on the CPU, so a seed gives the same image on any device."})


def _sampler_input(default: str = "ddpm"):
    return (list(SAMPLERS), {"default": default, "tooltip": "ddpm is the official sampler; euler_ancestral is "
                                                            "ddpm on this schedule, dpmpp_2m/ddim are deterministic."})


def _to_pil(images: torch.Tensor):
    from PIL import Image

    arr = (images[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    return Image.fromarray(arr)


def stage_c_previewer(previewer: Optional[H.ModelHandle]):
    """x0 -> PIL preview: the previewer model when given, else a model-free approximation."""
    if not previews_enabled():
        return None

    def show(x0: torch.Tensor):
        if previewer is not None:
            rgb = pipeline.preview_stage_c(previewer.module, x0[:1])
        else:
            rgb = F.interpolate(pipeline.latent_rgb_preview(x0[:1].float().cpu()), scale_factor=8, mode="nearest")
        return _to_pil(rgb)

    return show


class _ControlledStageC(torch.nn.Module):
    """Stage C with ControlNet maps added only inside each hint's step range."""

    def __init__(self, stage_c, hints: List[H.ControlHint], maps: List[List[Optional[torch.Tensor]]]):
        super().__init__()
        self.stage_c = stage_c
        self.hints, self.maps = hints, maps

    def parameters(self, recurse: bool = True):
        return self.stage_c.parameters(recurse)

    @property
    def clip_img_mapper(self):
        return self.stage_c.clip_img_mapper

    def forward(self, x, r, **kwargs):
        # r runs from ~1 (start) to 0 (end); a hint is active while progress is in [start, end].
        progress = 1.0 - float(r.flatten()[0])
        total: Optional[List[Optional[torch.Tensor]]] = None
        for hint, maps in zip(self.hints, self.maps):
            if not (hint.start - 1e-6 <= progress <= hint.end + 1e-6):
                continue
            scaled = [None if m is None else m * hint.strength for m in maps]
            total = scaled if total is None else _add_maps(total, scaled)
        if total is not None:
            batch = x.shape[0]
            kwargs["cnet"] = [None if m is None else _fit_batch(m, batch) for m in total]
        return self.stage_c(x, r, **kwargs)


def _add_maps(a: List[Optional[torch.Tensor]], b: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """Sum two hints' per-ResBlock maps; maps of other sizes are resized as Stage C would resize them."""
    n = max(len(a), len(b))
    a, b = a + [None] * (n - len(a)), b + [None] * (n - len(b))
    out = []
    for p, q in zip(a, b):
        if p is None or q is None:
            out.append(p if q is None else q)
            continue
        if p.shape[-2:] != q.shape[-2:]:
            q = F.interpolate(q, size=p.shape[-2:], mode="bilinear", align_corners=True)
        if p.shape[0] != q.shape[0]:
            batch = max(p.shape[0], q.shape[0])
            p, q = _fit_batch(p, batch), _fit_batch(q, batch)
        out.append(p + q)
    return out


def _fit_batch(m: torch.Tensor, batch: int) -> torch.Tensor:
    """Tile control maps over the model batch, which is [cond; uncond] (the same maps for both)."""
    if m.shape[0] == batch:
        return m
    if batch % m.shape[0] == 0:
        return m.repeat(batch // m.shape[0], 1, 1, 1)
    return m[:1].expand(batch, -1, -1, -1)


@contextlib.contextmanager
def stage_c_loras(handle: H.ModelHandle):
    stack = [(lf, s_model) for lf, s_model, _s_clip in handle.loras if lf.stage_c or lf.stage_c_indexed]
    if not stack:
        yield
        return
    with lora_lib.apply_loras(handle.module, stack, part="stage_c"):
        yield


class WuerstchenStageCSampler:
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_c",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Samples the Stage C latent exactly like the official code (gdf DDPM, cfg_rho 0.7, the last "
                   "step's x0). denoise < 1 starts from the input latent (img2img) for int(steps*denoise) steps.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "stage_c": (H.STAGE_C, {"tooltip": "Stage C model (with LoRAs, if any)."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt conditioning (Wuerstchen Text Encode)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning; officially the empty prompt."}),
                "latent": ("LATENT", {"tooltip": "Empty Stage C latent (size and batch), or an encoded image for img2img."}),
                "seed": SEED,
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Official: 20."}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Official: 4."}),
                "shift": ("FLOAT", {"default": 2.0, "min": 0.1, "max": 10.0, "step": 0.1,
                                    "tooltip": "Schedule shift in logSNR space. Official: 2."}),
                "sampler": _sampler_input(),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 = from noise; < 1 = img2img strength (official notebook: 0.6)."}),
                "cfg_rho": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.05,
                                      "tooltip": "Official CFG rescale (0.7). 0 = plain CFG as in ComfyUI's KSampler."}),
            },
            "optional": {
                "control": (H.CONTROL, {"tooltip": "ControlNet hint(s) from Wuerstchen ControlNet Apply."}),
                "previewer": (H.PREVIEWER, {"tooltip": "Previewer for live previews (otherwise an approximation)."}),
            },
        }

    def sample(self, stage_c, positive, negative, latent, seed, steps, cfg, shift, sampler, denoise, cfg_rho,
               control=None, previewer=None):
        node = "WuerstchenStageCSampler"
        sc = require(stage_c, "stage_c", node, "stage_c")
        cond = from_comfy(positive, node, "positive")
        uncond = from_comfy(negative, node, "negative")
        samples = latent["samples"]
        if samples.dim() != 4 or samples.shape[1] != sc.model.config["c_in"]:
            raise NodeError(f"{node}: 'latent' must be a Stage C latent with {sc.model.config['c_in']} channels, got "
                            f"shape {list(samples.shape)} (use Wuerstchen Empty Latent's stage_c output)")
        _check_widths(node, sc.model.config, cond)
        settings = pipeline.StageCSettings(steps=steps, cfg=cfg, shift=shift, sampler=sampler, cfg_rho=cfg_rho,
                                           denoise=denoise)
        real_steps = img2img_steps(steps, denoise) if denoise < 1.0 else steps
        mgr = manager()
        hints = control.chain() if control is not None else []
        models = [sc.model] + [h.controlnet for h in hints] + ([previewer.model] if previewer is not None else [])
        progress = Progress(real_steps, stage_c_previewer(previewer))
        with mgr.running(*models), torch.no_grad():
            model = sc.module
            if hints:
                maps = [_control_maps(h) for h in hints]
                model = _ControlledStageC(sc.module, hints, maps)
            try:
                with stage_c_loras(sc):
                    x0 = pipeline.sample_stage_c(
                        model, cond, uncond, shape=tuple(samples.shape),
                        init_latent=samples if denoise < 1.0 else None, seed=seed, settings=settings,
                        callback=progress,
                    )
            except lora_lib.LoraError as exc:
                raise NodeError(f"{node}: {exc}") from None
        height, width = output_size(latent)
        compression = float(latent.get(H.LATENT_COMPRESSION, pipeline.OFFICIAL_COMPRESSION))
        return (stage_c_latent(x0, height, width, compression),)


def _check_widths(node: str, config: dict, cond: pipeline.Conditioning) -> None:
    if cond.clip_text.shape[-1] != config["c_clip_text"] or cond.clip_text_pooled.shape[-1] != config["c_clip_text_pooled"]:
        raise NodeError(f"{node}: the conditioning has width {cond.clip_text.shape[-1]} but this Stage C expects "
                        f"{config['c_clip_text']}: encode the prompt with the CLIP-G (ViT-bigG) text encoder")
    if cond.clip_img is not None and cond.clip_img.shape[-1] != config["c_clip_img"]:
        raise NodeError(f"{node}: image tokens are {cond.clip_img.shape[-1]} wide, this Stage C expects "
                        f"{config['c_clip_img']} (the ViT-L/14 image encoder)")


def _control_maps(hint: H.ControlHint) -> List[Optional[torch.Tensor]]:
    net = hint.controlnet.module
    param = next(net.parameters())
    return [None if m is None else m.float() for m in net(hint.control_input.to(param.device, param.dtype))]


class WuerstchenStageBSampler:
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_b",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Samples the Stage B latent from a Stage C latent (official: 10 steps, cfg 1.1, shift 1). "
                   "The output size comes from the Stage C latent unless width/height are set.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "stage_b": (H.STAGE_B, {"tooltip": "Stage B model."}),
            "stage_c": ("LATENT", {"tooltip": "The Stage C latent (Stage C sampler or Semantic Encode)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt conditioning; Stage B uses its pooled embedding."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative conditioning (pooled embedding of the empty prompt)."}),
            "seed": SEED,
            "steps": ("INT", {"default": 10, "min": 1, "max": 1000, "tooltip": "Official: 10."}),
            "cfg": ("FLOAT", {"default": 1.1, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Official: 1.1."}),
            "shift": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1, "tooltip": "Official: 1."}),
            "sampler": _sampler_input(),
            "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                              "tooltip": "Output width; 0 = the size the Stage C latent was made for."}),
            "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                               "tooltip": "Output height; 0 = the size the Stage C latent was made for."}),
            "cfg_rho": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "Official CFG rescale (0.7)."}),
        }}

    def sample(self, stage_b, stage_c, positive, negative, seed, steps, cfg, shift, sampler, width, height, cfg_rho):
        node = "WuerstchenStageBSampler"
        sb = require(stage_b, "stage_b", node, "stage_b")
        latent_c = stage_c["samples"]
        if latent_c.dim() != 4 or latent_c.shape[1] != sb.model.config["c_effnet"]:
            raise NodeError(f"{node}: 'stage_c' must be a Stage C latent with {sb.model.config['c_effnet']} channels, "
                            f"got shape {list(latent_c.shape)}")
        auto_h, auto_w = output_size(stage_c)
        size = (height or auto_h, width or auto_w)
        pipeline.check_size(size[0], size[1], node)
        cond = from_comfy(positive, node, "positive")
        uncond = from_comfy(negative, node, "negative")
        if cond.clip_text_pooled.shape[-1] != sb.model.config["c_clip"]:
            raise NodeError(f"{node}: pooled text embedding is {cond.clip_text_pooled.shape[-1]} wide, Stage B expects "
                            f"{sb.model.config['c_clip']}")
        settings = pipeline.StageBSettings(steps=steps, cfg=cfg, shift=shift, sampler=sampler, cfg_rho=cfg_rho)
        progress = Progress(steps)
        with manager().running(sb.model), torch.no_grad():
            x0 = pipeline.sample_stage_b(sb.module, latent_c, cond.clip_text_pooled, uncond.clip_text_pooled,
                                         size=size, seed=seed, settings=settings, callback=progress)
        return ({"samples": stage_b_to_comfy(x0)},)
