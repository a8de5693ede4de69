"""Layered editing nodes (DesignEdit's method on Stage C): decompose a picture into layers, transform
them, fuse them into a Stage C latent, and an edit-aware Stage B that keeps the source outside the
edit. The work is done by :mod:`wuerstchen.editing`; these classes translate sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from wuerstchen.files import kinds
from wuerstchen.inputs import limits
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.editing import operations
from wuerstchen.editing.fusion import EditSettings, decompose, edit_pixels, fuse, with_objects_from
from wuerstchen.editing.guidance import Guidance
from wuerstchen.editing.layers import Layers, Transform
from wuerstchen.editing.masks import as_mask
from wuerstchen.editing.stage_b import ETA, sample_stage_b_edit
from wuerstchen.pipeline.stages import Conditioning

from . import comfy_types as T
from . import handles as H
from .host import NodeError, Progress, manager
from .loaders import require

CATEGORY = "wuerstchen/editing"
LAYERS = "WUERSTCHEN_LAYERS"
CANVAS = ("none", "pan", "zoomout")


@dataclass(frozen=True)
class LayerStack:
    """What travels along a LAYERS socket: the layers, the settings and conditioning they were
    inverted with (fusion must use the same), and the picture they came from."""

    layers: Layers
    settings: EditSettings
    positive: Conditioning
    image: torch.Tensor  # [1, 3, H, W]


def _masks(node, size, sockets):
    out = []
    for socket, mask in sockets:
        if mask is None:
            continue
        m = T.mask_in(mask, node, socket)
        for i in range(m.shape[0]):
            what = f"{node}: '{socket}'" + (f" [{i}]" if m.shape[0] > 1 else "")
            try:
                out.append(as_mask(m[i, 0], size, what))
            except limits.RequestError as exc:
                raise NodeError(str(exc)) from None
    return out


class WuerstchenLayerDecompose:
    RETURN_TYPES = (LAYERS, "IMAGE")
    RETURN_NAMES = ("layers", "image")
    FUNCTION = "decompose"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Splits a picture into object layers (one per mask; every picture of a MASK batch is one "
                   "object) and a background whose holes Layer Fuse fills, by DDIM-inverting its Stage C latent. "
                   "canvas pan / zoomout first moves or shrinks the whole picture and fills what appears. The "
                   "image output is the picture the layers came from: encode it with Stage A Encode for the "
                   "edit-aware Stage B.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "stage_c": (H.STAGE_C, {"tooltip": "Stage C model (Stable Cascade)."}),
            "semantic_compressor": (H.EFFNET, {"tooltip": "effnet_encoder (Semantic Compressor Loader)."}),
            "positive": ("CONDITIONING", {"tooltip": "What the picture shows; the inversion and the fusion use it."}),
            "image": ("IMAGE", {"tooltip": "The picture to edit (the first of a batch)."}),
            "steps": ("INT", {"default": 20, "min": 2, "max": 200,
                              "tooltip": "Inversion and edit steps; more steps invert more exactly."}),
            "refine": ("INT", {"default": 3, "min": 0, "max": 50,
                               "tooltip": "Fixed-point iterations per inversion step (0 = plain DDIM inversion)."}),
            "dilate": ("INT", {"default": 1, "min": 0, "max": 16,
                               "tooltip": "Stage C cells (about 42 px at 1024²) added around each hole."}),
            "canvas": (list(CANVAS), {"default": "none",
                                      "tooltip": "pan: move the whole picture by pan_x, pan_y; zoomout: shrink it to "
                                                 "zoom; the area that appears is filled. none: keep it."}),
            "pan_x": ("INT", {"default": 0, "min": -limits.MAX_SIDE, "max": limits.MAX_SIDE,
                              "tooltip": "Pan: pixels to move the picture right (negative: left)."}),
            "pan_y": ("INT", {"default": 0, "min": -limits.MAX_SIDE, "max": limits.MAX_SIDE,
                              "tooltip": "Pan: pixels to move the picture down (negative: up)."}),
            "zoom": ("FLOAT", {"default": 0.75, "min": 0.05, "max": 0.99, "step": 0.01,
                               "tooltip": "Zoom out: the picture's new size as a fraction of the canvas."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Object masks (white = the object), one object per mask of the batch."}),
            "mask_2": ("MASK", {"tooltip": "More objects."}),
            "mask_3": ("MASK", {"tooltip": "More objects."}),
        }}

    def decompose(self, stage_c, semantic_compressor, positive, image, steps, refine, dilate, canvas, pan_x, pan_y,
                  zoom, mask=None, mask_2=None, mask_3=None):
        node = "WuerstchenLayerDecompose"
        sc = require(stage_c, "stage_c", node, "stage_c")
        eff = require(semantic_compressor, "effnet", node, "semantic_compressor")
        cond = T.conditioning_in(positive, node, "positive")
        picture = T.images_in(image, node)[:1]
        size = tuple(picture.shape[-2:])
        masks = _masks(node, size, (("mask", mask), ("mask_2", mask_2), ("mask_3", mask_3)))
        with T.node_errors(node):
            settings = EditSettings(steps=steps, refine=refine, dilate=dilate)
            uncovered = None
            if canvas != "none":
                op = (operations.Operation("pan", dx=pan_x, dy=pan_y) if canvas == "pan"
                      else operations.Operation("zoomout", factor=zoom))
                if canvas == "pan" and pan_x == 0 and pan_y == 0:
                    raise NodeError(f"{node}: canvas pan with pan_x = pan_y = 0 moves nothing")
                operations.check(op, [], size)
                picture, uncovered = operations.picture(op, picture)
            with manager().running(eff.model):
                latent = pipeline.encode_semantic(eff.module, picture, pipeline.stage_c_latent_size(*size))
            progress = Progress(steps)
            with manager().running(sc.model), torch.no_grad():
                guidance = Guidance.prepare(sc.module, cond)
                layers = decompose(sc.module, latent, masks, guidance, settings, size, hole=uncovered,
                                   progress=progress)
        return (LayerStack(layers, settings, cond, picture), T.images_out(picture))


class WuerstchenLayerTransform:
    RETURN_TYPES = (LAYERS,)
    RETURN_NAMES = ("layers",)
    FUNCTION = "transform"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Moves, scales, flips, reorders or removes one object layer. Offsets are snapped to whole "
                   "Stage C cells (about 42 px at 1024²) and move the layer's inverted latents exactly; scaling "
                   "resamples the object's latent and inverts it again. Chain nodes to edit several layers.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "layers": (LAYERS, {"tooltip": "Layers from Layer Decompose (or another Layer Transform)."}),
            "layer": ("INT", {"default": 0, "min": 0, "max": 63,
                              "tooltip": "Which object: 0 = the first mask's, in the order of the masks."}),
            "dx": ("INT", {"default": 0, "min": -limits.MAX_SIDE, "max": limits.MAX_SIDE,
                           "tooltip": "Pixels to move right (negative: left), snapped to whole cells."}),
            "dy": ("INT", {"default": 0, "min": -limits.MAX_SIDE, "max": limits.MAX_SIDE,
                           "tooltip": "Pixels to move down (negative: up), snapped to whole cells."}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 8.0, "step": 0.05,
                                "tooltip": "Size factor about the object's centre."}),
            "flip_h": ("BOOLEAN", {"default": False, "tooltip": "Mirror the object left-right in its box."}),
            "flip_v": ("BOOLEAN", {"default": False, "tooltip": "Mirror the object upside down in its box."}),
            "depth": ("INT", {"default": 0, "min": -64, "max": 64,
                              "tooltip": "Paste order: a higher depth lies on top of lower ones."}),
            "remove": ("BOOLEAN", {"default": False,
                                   "tooltip": "Remove the object: only the filled background stays there."}),
        }}

    def transform(self, layers, layer, dx, dy, scale, flip_h, flip_v, depth, remove):
        node = "WuerstchenLayerTransform"
        stack = _stack(layers, node)
        objects = stack.layers.objects
        if not 0 <= layer < len(objects):
            raise NodeError(f"{node}: there is no layer {layer}; these layers hold {len(objects)} object(s) "
                            f"(0..{len(objects) - 1}); connect more masks to Layer Decompose")
        if remove:
            return (replace(stack, layers=stack.layers.replace_objects(objects[:layer] + objects[layer + 1:])),)
        cdx, cdy = stack.layers.snap(dx, dy)
        with T.node_errors(node):
            moved = stack.layers.transformed(layer, Transform(dx=cdx, dy=cdy, scale=scale, flip_h=flip_h,
                                                              flip_v=flip_v, depth=depth))
        if moved.objects[layer].off_canvas():
            raise NodeError(f"{node}: dx {dx}, dy {dy} ({cdx}, {cdy} cells) moves layer {layer} off the canvas; "
                            "move it less")
        return (replace(stack, layers=moved),)


class WuerstchenLayerFuse:
    RETURN_TYPES = ("LATENT", "MASK")
    RETURN_NAMES = ("stage_c", "edit_mask")
    FUNCTION = "fuse"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Fills the background's holes with key-masked self-attention, pastes the placed layers in depth "
                   "order at fuse_at of the steps and denoises the canvas to the end: the edited Stage C latent, "
                   "for a Stage B sampler. edit_mask marks what changed, for the edit-aware Stage B.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "stage_c": (H.STAGE_C, {"tooltip": "The Stage C model the layers were decomposed with."}),
            "layers": (LAYERS, {"tooltip": "The layers to fuse."}),
            "fuse_at": ("FLOAT", {"default": 0.8, "min": 0.05, "max": 0.95, "step": 0.05,
                                  "tooltip": "Fraction of the steps after which the layers are pasted (the paper: "
                                             "0.8); lower blends more, higher keeps the objects more exactly."}),
            "preserve": ("BOOLEAN", {"default": True,
                                     "tooltip": "Keep the source latent outside the edit (holes and placed layers)."}),
            "hole_seed": ("INT", {"default": -1, "min": -1, "max": 0xFFFF_FFFF,
                                  "tooltip": "-1: fill holes from the inverted noise (the paper); else fresh noise of "
                                             "this seed."}),
        }, "optional": {
            "more_layers": (LAYERS, {"tooltip": "Objects of another picture (its Layer Decompose, same size and "
                                                "steps) to add on top; its background is not used."}),
        }}

    def fuse(self, stage_c, layers, fuse_at, preserve, hole_seed, more_layers=None):
        node = "WuerstchenLayerFuse"
        sc = require(stage_c, "stage_c", node, "stage_c")
        stack = _stack(layers, node)
        with T.node_errors(node):
            settings = replace(stack.settings, fuse_at=fuse_at, preserve=preserve,
                               hole_seed=None if hole_seed < 0 else hole_seed)
            combined = stack.layers
            if more_layers is not None:
                combined = with_objects_from(combined, _stack(more_layers, node).layers)
            progress = Progress(settings.steps)
            with manager().running(sc.model), torch.no_grad():
                guidance = Guidance.prepare(sc.module, stack.positive)
                latent, edit = fuse(sc.module, combined, guidance, settings, progress=progress)
        size = combined.image_size
        latent_out = T.stage_c_out(latent.float().cpu(), size, pipeline.OFFICIAL_COMPRESSION, kinds.STABLE_CASCADE)
        return (latent_out, edit_pixels(edit, size)[None])


class WuerstchenEditStageBSampler:
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("stage_b",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Stage B for an edit: samples from the edited Stage C latent, but keeps the source picture's "
                   "Stage B latent (Stage A Encode of Layer Decompose's image) outside edit_mask, blending the seam "
                   "over feather cells, so untouched pixels stay the source's.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "stage_b": (H.STAGE_B, {"tooltip": "Stage B model."}),
            "stage_c": ("LATENT", {"tooltip": "The edited Stage C latent (Layer Fuse)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt conditioning; Stage B uses its pooled embedding."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative conditioning (officially the empty prompt)."}),
            "source": ("LATENT", {"tooltip": "The source picture's Stage B latent (Stage A Encode)."}),
            "edit_mask": ("MASK", {"tooltip": "What changed (Layer Fuse's edit_mask); the rest stays the source's."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF, "control_after_generate": True,
                             "tooltip": "Noise seed (CPU noise: the same on any device)."}),
            "steps": ("INT", {"default": 10, "min": 1, "max": limits.MAX_STEPS, "tooltip": "Official: 10."}),
            "cfg": ("FLOAT", {"default": 1.1, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Official: 1.1."}),
            "sampler": (list(ETA), {"default": "ddpm", "tooltip": "ddpm is the official sampler; ddim has no noise."}),
            "feather": ("INT", {"default": 2, "min": 0, "max": 32,
                                "tooltip": "Stage B cells (4 px) over which the edit blends into the source."}),
        }}

    def sample(self, stage_b, stage_c, positive, negative, source, edit_mask, seed, steps, cfg, sampler, feather):
        node = "WuerstchenEditStageBSampler"
        sb = require(stage_b, "stage_b", node, "stage_b")
        latent_c = T.stage_c_in(stage_c, sb.model.config["c_effnet"], node, "stage_c")
        size, _compression = T.stage_c_size(stage_c)
        cond = T.conditioning_in(positive, node, "positive")
        uncond = T.conditioning_in(negative, node, "negative")
        src = T.stage_b_in(source, node, "source")
        mask = T.mask_in(edit_mask, node, "edit_mask")
        if mask is None or tuple(mask.shape[-2:]) != tuple(size):
            raise NodeError(f"{node}: 'edit_mask' must be the {size[1]}x{size[0]} mask of the edit (Layer Fuse)")
        with T.node_errors(node):
            settings = pipeline.StageBSettings(steps=steps, cfg=cfg, sampler=sampler)
            with manager().running(sb.model), torch.no_grad():
                x0 = sample_stage_b_edit(sb.module, latent_c, cond.clip_text_pooled, uncond.clip_text_pooled, src,
                                         mask[0, 0], size=size, seed=seed, settings=settings, feather_cells=feather,
                                         callback=Progress(steps))
        return (T.stage_b_out(x0, size),)


def _stack(layers, node: str) -> LayerStack:
    if not isinstance(layers, LayerStack):
        raise NodeError(f"{node}: 'layers' must come from Wuerstchen Layer Decompose, got {type(layers).__name__}")
    return layers
