"""The Stage C and Stage B sampler nodes (official DDPM by default, with ComfyUI progress and previews)."""

from __future__ import annotations

from typing import Optional

import torch

from wuerstchen.files import kinds
from wuerstchen.inputs import limits
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.pipeline import stages_v2 as v2
from wuerstchen.sampling.samplers import SAMPLERS

from . import comfy_types as T
from . import handles as H
from .host import NodeError, Progress, manager, previews_enabled
from .loaders import require_role

CATEGORY = "wuerstchen/sampling"
SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF, "control_after_generate": True,
                "tooltip": "Noise seed; noise is drawn on the CPU, so a seed gives the same image on any device."})


def _sampler_input(default: str = "ddpm"):
    return (list(SAMPLERS), {"default": default, "tooltip": "ddpm is the official sampler; euler_ancestral is "
                                                            "ddpm on this schedule, dpmpp_2m/ddim are deterministic. "
                                                            "Würstchen v2 has only its own DDPM scheduler (ddpm)."})


def _v2_sampler(sampler: str, node: str) -> None:
    if sampler != "ddpm":
        raise NodeError(f"{node}: Würstchen v2 samples with its own DDPM scheduler only; set sampler to ddpm "
                        f"(got {sampler})")


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
                   "step's x0). denoise < 1 starts from the input latent (img2img) for int(steps*denoise) steps. "
                   "With the Würstchen v2 prior it samples the v2 prior latent as the hub pipeline does (steps 0: "
                   "its 29-step grid; cfg 4; plain CFG, no shift); denoise < 1 then runs the grid below denoise.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "stage_c": (H.STAGE_C, {"tooltip": "Stage C model (with LoRAs, if any)."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt conditioning (Wuerstchen Text Encode)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning; officially the empty prompt."}),
                "latent": ("LATENT", {"tooltip": "Empty Stage C latent (size and batch), or an encoded image for img2img."}),
                "seed": SEED,
                "steps": ("INT", {"default": 20, "min": 0, "max": limits.MAX_STEPS,
                                  "tooltip": "Official: 20. 0 = the official schedule of the model wired in (Stable "
                                             "Cascade: 20 steps; Würstchen v2 prior: the hub's 29-step grid); "
                                             "for the v2 prior any other value is that many uniform steps."}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Official: 4 (Stable Cascade and Würstchen v2)."}),
                "shift": ("FLOAT", {"default": 2.0, "min": 0.1, "max": 10.0, "step": 0.1,
                                    "tooltip": "Schedule shift in logSNR space. Official: 2. Stable Cascade only "
                                               "(Würstchen v2 has no shift)."}),
                "sampler": _sampler_input(),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 = from noise; < 1 = img2img strength (official notebook: 0.6)."}),
                "cfg_rho": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.05,
                                      "tooltip": "Official CFG rescale (0.7). 0 = plain CFG as in ComfyUI's KSampler. "
                                                 "Stable Cascade only (Würstchen v2 uses plain CFG)."}),
            },
            "optional": {
                "control": (H.CONTROL, {"tooltip": "ControlNet hint(s) from Wuerstchen ControlNet Apply."}),
                "previewer": (H.PREVIEWER, {"tooltip": "Previewer for live previews (otherwise an approximation)."}),
            },
        }

    def sample(self, stage_c, positive, negative, latent, seed, steps, cfg, shift, sampler, denoise, cfg_rho,
               control=None, previewer=None):
        node = "WuerstchenStageCSampler"
        sc = require_role(stage_c, "stage_c", node, "stage_c")
        if sc.model.kind == "v2_prior":
            return self._sample_v2(sc, positive, negative, latent, seed, steps, cfg, sampler, denoise, control,
                                   previewer)
        cond = T.conditioning_in(positive, node, "positive")
        uncond = T.conditioning_in(negative, node, "negative")
        samples = T.stage_c_in(latent, sc.model.config["c_in"], node, "latent")
        with T.node_errors(node):
            settings = pipeline.StageCSettings(steps=steps or pipeline.StageCSettings.steps, cfg=cfg, shift=shift,
                                               sampler=sampler, cfg_rho=cfg_rho, denoise=denoise)
        hints = control.chain() if control is not None else []
        models = [sc.model] + [h.controlnet for h in hints] + ([previewer.model] if previewer is not None else [])
        progress = Progress(settings.steps_to_run(img2img=denoise < 1.0), stage_c_previewer(previewer))
        with T.node_errors(node), manager().running(*models), torch.no_grad():
            x0 = pipeline.sample_stage_c(
                sc.module, cond, uncond, shape=tuple(samples.shape), init_latent=samples if denoise < 1.0 else None,
                seed=seed, settings=settings, loras=sc.loras, control=[h.hint for h in hints], callback=progress)
        size, compression = T.stage_c_size(latent)
        return (T.stage_c_out(x0, size, compression, kinds.STABLE_CASCADE),)

    def _sample_v2(self, prior, positive, negative, latent, seed, steps, cfg, sampler, denoise, control, previewer):
        """The Würstchen v2 prior: the hub recipe (pipeline_v2.sample_prior_v2) on a v2 latent."""
        node = "WuerstchenStageCSampler"
        for socket, value, what in (("control", control, "ControlNets are a Stable Cascade feature"),
                                    ("previewer", previewer, "the previewer shows Stable Cascade latents")):
            if value is not None:
                raise NodeError(f"{node}: '{socket}' is connected, but the model is the Würstchen v2 prior ({what}); "
                                f"disconnect it")
        if prior.loras:
            raise NodeError(f"{node}: LoRAs are a Stable Cascade feature; the Würstchen v2 prior takes none")
        _v2_sampler(sampler, node)
        samples = T.stage_c_in(latent, prior.model.config["c_in"], node, "latent", kinds.WUERSTCHEN_V2)
        cond = T.v2_conditioning_in(positive, "v2_prior_text", node, "positive")
        uncond = T.v2_conditioning_in(negative, "v2_prior_text", node, "negative")
        with T.node_errors(node):
            progress = Progress(v2.prior_run_steps(steps, denoise))
            with manager().running(prior.model), torch.no_grad():
                x = v2.prior_for_latent(prior.module, cond, uncond, samples, seed=seed, steps=steps, cfg=cfg,
                                        denoise=denoise, callback=lambda i, n, _x: progress(i, n))
        size, compression = T.stage_c_size(latent)
        return (T.stage_c_out(x, size, compression, kinds.WUERSTCHEN_V2),)


class WuerstchenStageBSampler:
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_b",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Samples the Stage B latent from a Stage C latent (official: 10 steps, cfg 1.1, shift 1). "
                   "The output size comes from the Stage C latent unless width/height are set. With the Würstchen "
                   "v2 decoder it decodes a v2 prior latent (×42 − 1) with the decoder text encoder's conditioning "
                   "(hub recipe: 12 steps, cfg 0) into the VQGAN latent.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "stage_b": (H.STAGE_B, {"tooltip": "Stage B model."}),
            "stage_c": ("LATENT", {"tooltip": "The Stage C latent (Stage C sampler or Semantic Encode)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt conditioning; Stage B uses its pooled embedding."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative conditioning (pooled embedding of the empty prompt)."}),
            "seed": SEED,
            "steps": ("INT", {"default": 10, "min": 1, "max": limits.MAX_STEPS,
                              "tooltip": "Official: 10 (Würstchen v2 decoder: 12)."}),
            "cfg": ("FLOAT", {"default": 1.1, "min": 0.0, "max": 30.0, "step": 0.1,
                              "tooltip": "Official: 1.1 (Würstchen v2 decoder: 0 = off; guidance needs > 1)."}),
            "shift": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1,
                                "tooltip": "Official: 1. Stable Cascade only."}),
            "sampler": _sampler_input(),
            "width": ("INT", {"default": 0, "min": 0, "max": limits.MAX_SIDE, "step": 8,
                              "tooltip": "Output width; 0 = the size the Stage C latent was made for. Würstchen v2: "
                                         "0 (its output size follows the prior latent)."}),
            "height": ("INT", {"default": 0, "min": 0, "max": limits.MAX_SIDE, "step": 8,
                               "tooltip": "Output height; 0 = the size the Stage C latent was made for. Würstchen "
                                          "v2: 0."}),
            "cfg_rho": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "Official CFG rescale (0.7). Stable Cascade only."}),
        }}

    def sample(self, stage_b, stage_c, positive, negative, seed, steps, cfg, shift, sampler, width, height, cfg_rho):
        node = "WuerstchenStageBSampler"
        sb = require_role(stage_b, "stage_b", node, "stage_b")
        if sb.model.kind == "v2_decoder":
            return self._sample_v2(sb, stage_c, positive, negative, seed, steps, cfg, sampler, width, height)
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

    def _sample_v2(self, decoder, stage_c, positive, negative, seed, steps, cfg, sampler, width, height):
        """The Würstchen v2 decoder (pipeline_v2.sample_decoder_v2) on a v2 prior latent; the result is
        the raw VQGAN latent, which Wuerstchen Stage A Decode takes as it takes Stable Cascade's."""
        node = "WuerstchenStageBSampler"
        _v2_sampler(sampler, node)
        latent = T.stage_c_in(stage_c, decoder.model.config["effnet_embd"], node, "stage_c", kinds.WUERSTCHEN_V2)
        cond = T.v2_conditioning_in(positive, "v2_decoder_text", node, "positive")
        uncond = T.v2_conditioning_in(negative, "v2_decoder_text", node, "negative")
        progress = Progress(steps)
        with T.node_errors(node), manager().running(decoder.model), torch.no_grad():
            x = v2.decoder_for_prior(decoder.module, cond, uncond, latent, seed=seed, steps=steps, cfg=cfg,
                                     size=(height, width), callback=lambda i, n, _x: progress(i, n))
        return (T.v2_decoder_out(x),)
