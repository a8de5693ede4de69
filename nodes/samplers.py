"""The Stage C and Stage B sampler nodes (official DDPM by default, with ComfyUI progress and previews)."""

from __future__ import annotations

from typing import Optional

import torch

from wuerstchen import limits, pipeline
from wuerstchen.sampling import SAMPLERS

from . import comfy_types as T
from . import handles as H
from .host import Progress, manager, previews_enabled
from .loaders import require

CATEGORY = "wuerstchen/sampling"
SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF, "control_after_generate": True,
                "tooltip": "Noise seed; noise is drawn on the CPU, so a seed gives the same image on any device."})


def _sampler_input(default: str = "ddpm"):
    return (list(SAMPLERS), {"default": default, "tooltip": "ddpm is the official sampler; euler_ancestral is "
                                                            "ddpm on this schedule, dpmpp_2m/ddim are deterministic."})


def stage_c_previewer(previewer: Optional[H.ModelHandle]):
    """x0 -> PIL preview for the progress bar, when ComfyUI shows previews."""
    if not previews_enabled():
        return None
    module = previewer.module if previewer is not None else None
    return lambda x0: T.to_pil(pipeline.preview_x0(x0, module))


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
                "steps": ("INT", {"default": 20, "min": 1, "max": limits.MAX_STEPS, "tooltip": "Official: 20."}),
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
        cond = T.conditioning_in(positive, node, "positive")
        uncond = T.conditioning_in(negative, node, "negative")
        samples = T.stage_c_in(latent, sc.model.config["c_in"], node, "latent")
        with T.node_errors(node):
            settings = pipeline.StageCSettings(steps=steps, cfg=cfg, shift=shift, sampler=sampler, cfg_rho=cfg_rho,
                                               denoise=denoise)
        hints = control.chain() if control is not None else []
        models = [sc.model] + [h.controlnet for h in hints] + ([previewer.model] if previewer is not None else [])
        progress = Progress(settings.steps_to_run(img2img=denoise < 1.0), stage_c_previewer(previewer))
        with T.node_errors(node), manager().running(*models), torch.no_grad():
            x0 = pipeline.sample_stage_c(
                sc.module, cond, uncond, shape=tuple(samples.shape), init_latent=samples if denoise < 1.0 else None,
                seed=seed, settings=settings, loras=sc.loras, control=[h.hint for h in hints], callback=progress)
        size, compression = T.stage_c_size(latent)
        return (T.stage_c_out(x0, size, compression),)


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
            "steps": ("INT", {"default": 10, "min": 1, "max": limits.MAX_STEPS, "tooltip": "Official: 10."}),
            "cfg": ("FLOAT", {"default": 1.1, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Official: 1.1."}),
            "shift": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1, "tooltip": "Official: 1."}),
            "sampler": _sampler_input(),
            "width": ("INT", {"default": 0, "min": 0, "max": limits.MAX_SIDE, "step": 8,
                              "tooltip": "Output width; 0 = the size the Stage C latent was made for."}),
            "height": ("INT", {"default": 0, "min": 0, "max": limits.MAX_SIDE, "step": 8,
                               "tooltip": "Output height; 0 = the size the Stage C latent was made for."}),
            "cfg_rho": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "Official CFG rescale (0.7)."}),
        }}

    def sample(self, stage_b, stage_c, positive, negative, seed, steps, cfg, shift, sampler, width, height, cfg_rho):
        node = "WuerstchenStageBSampler"
        sb = require(stage_b, "stage_b", node, "stage_b")
        latent_c = T.stage_c_in(stage_c, sb.model.config["c_effnet"], node, "stage_c")
        (auto_h, auto_w), _compression = T.stage_c_size(stage_c)
        cond = T.conditioning_in(positive, node, "positive")
        uncond = T.conditioning_in(negative, node, "negative")
        with T.node_errors(node):
            size = pipeline.check_size(height or auto_h, width or auto_w, node)
            settings = pipeline.StageBSettings(steps=steps, cfg=cfg, shift=shift, sampler=sampler, cfg_rho=cfg_rho)
        with T.node_errors(node), manager().running(sb.model), torch.no_grad():
            x0 = pipeline.sample_stage_b(sb.module, latent_c, cond.clip_text_pooled, uncond.clip_text_pooled,
                                         size=size, seed=seed, settings=settings, callback=Progress(steps))
        return (T.stage_b_out(x0, size),)
