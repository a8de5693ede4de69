"""Writes the example workflows in ``workflows/`` (ComfyUI's editor format) from the node definitions.

Why generate them: widget values in a saved workflow are a bare list in the order of the node's
INPUT_TYPES, so hand-edited files drift silently when a node gains or reorders an input. Here each
value is given by input name and placed by reading INPUT_TYPES, and every value not given is the
input's default, i.e. the official notebook settings.

    python tools/make_workflows.py            # rewrite workflows/*.json
    python tools/make_workflows.py --check    # exit 1 if a committed file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from tools import comfy_core_nodes as core  # noqa: E402
from tools.editor_rules import input_sockets, layout_widgets, options, widget_slots  # noqa: E402

OUT_DIR = REPO / "workflows"
EXAMPLE_IMAGE = core.EXAMPLE_IMAGE
PROMPT = "Cinematic photo of an anthropomorphic penguin sitting in a cafe reading a book and having a coffee"
SEED = 42
SEED_CONTROL = "fixed"
NOTE = "Note"  # the editor's own text box; not executed

GAP_X, GAP_Y, TITLE_H, GROUP_HEADER = 70, 40, 30, 46
SOCKET_H, WIDGET_H = 20, 24  # the editor's row heights
# Room for what the editor draws below the widgets: the size read-out of web/wuerstchen.js, and the
# Stage C sampler's live preview while it runs.
EXTRA_HEIGHT = {"WuerstchenEmptyLatent": 85, "WuerstchenStageBSampler": 85, "WuerstchenStageCSampler": 280}


def node_definition(node_type: str):
    """(INPUT_TYPES dict, ((output name, type), ...)) for one of our nodes or a known core node."""
    if node_type in NODE_CLASS_MAPPINGS:
        cls = NODE_CLASS_MAPPINGS[node_type]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        return cls.INPUT_TYPES(), tuple(zip(names, cls.RETURN_TYPES))
    return core.input_types(node_type), core.outputs(node_type)


@dataclass
class Node:
    id: int
    type: str
    column: int
    group: str
    title: Optional[str]
    width: int
    height: int
    inputs: List[dict] = field(default_factory=list)
    outputs: List[dict] = field(default_factory=list)
    widgets_values: List = field(default_factory=list)
    pos: Tuple[float, float] = (0.0, 0.0)
    color: Optional[Tuple[str, str]] = None

    def input_slot(self, name: str) -> int:
        for i, inp in enumerate(self.inputs):
            if inp["name"] == name:
                return i
        raise KeyError(f"{self.type} has no input socket {name!r}: {[i['name'] for i in self.inputs]}")

    def output_slot(self, name: str) -> int:
        for i, out in enumerate(self.outputs):
            if out["name"] == name:
                return i
        raise KeyError(f"{self.type} has no output {name!r}: {[o['name'] for o in self.outputs]}")


class Workflow:
    """Nodes placed in columns (left to right), stacked top to bottom, optionally in titled groups."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: List[Node] = []
        self.links: List[list] = []

    def add(self, node_type: str, column: int, group: str = "", title: Optional[str] = None,
            width: int = 330, extra_height: int = 0, **values) -> Node:
        node = Node(len(self.nodes) + 1, node_type, column, group, title, width, 0)
        if node_type == NOTE:
            node.widgets_values = [values.pop("text")]
            node.height = 60 + 18 * node.widgets_values[0].count("\n") + extra_height
            node.color = ("#432", "#653")
            self.nodes.append(node)
            return node
        input_types, outputs = node_definition(node_type)
        try:
            node.widgets_values = layout_widgets(input_types, values, control=SEED_CONTROL)
        except KeyError as err:
            raise KeyError(f"{node_type}: {err.args[0]}") from None
        node.inputs = [{"name": name, "type": kind, "link": None} for name, kind, _ in input_sockets(input_types)]
        slots = widget_slots(input_types)
        n_widgets = len(slots)
        multiline = any(options(s.spec).get("multiline") for s in slots if not s.editor_only)
        for slot, (name, kind) in enumerate(outputs):
            node.outputs.append({"name": name, "type": kind, "links": [], "slot_index": slot})
        sockets = max(len(node.inputs), len(node.outputs))
        node.height = (12 + SOCKET_H * sockets + WIDGET_H * n_widgets + (110 if multiline else 0)
                       + EXTRA_HEIGHT.get(node_type, 0) + extra_height)
        self.nodes.append(node)
        return node

    def note(self, column: int, text: str, group: str = "", width: int = 330) -> Node:
        return self.add(NOTE, column, group, width=width, text=text)

    def link(self, src: Node, output: str, dst: Node, input_name: str) -> None:
        out_slot, in_slot = src.output_slot(output), dst.input_slot(input_name)
        if dst.inputs[in_slot]["link"] is not None:
            raise ValueError(f"{dst.type}.{input_name} is linked twice")
        kind = src.outputs[out_slot]["type"]
        if kind != dst.inputs[in_slot]["type"]:
            raise TypeError(f"{src.type}.{output} ({kind}) cannot feed {dst.type}.{input_name} "
                            f"({dst.inputs[in_slot]['type']})")
        link_id = len(self.links) + 1
        self.links.append([link_id, src.id, out_slot, dst.id, in_slot, kind])
        src.outputs[out_slot]["links"].append(link_id)
        dst.inputs[in_slot]["link"] = link_id

    # -- layout and serialisation ---------------------------------------------------------------
    def _layout(self) -> List[dict]:
        columns = sorted({n.column for n in self.nodes})
        x = 0.0
        for col in columns:
            members = [n for n in self.nodes if n.column == col]
            y, previous_group = float(GROUP_HEADER + TITLE_H), None
            for n in members:
                if previous_group is not None and n.group != previous_group:
                    y += GROUP_HEADER + 10
                n.pos = (x, y)
                y += n.height + TITLE_H + GAP_Y
                previous_group = n.group
            x += max(n.width for n in members) + GAP_X
        groups = []
        for title in dict.fromkeys(n.group for n in self.nodes if n.group):
            members = [n for n in self.nodes if n.group == title]
            if len({n.column for n in members}) > 1:
                raise ValueError(f"{self.name}: group {title!r} spans several columns; boxes would overlap")
            left = min(n.pos[0] for n in members) - 15
            top = min(n.pos[1] for n in members) - TITLE_H - GROUP_HEADER + 6
            right = max(n.pos[0] + n.width for n in members) + 15
            bottom = max(n.pos[1] + n.height for n in members) + 15
            groups.append({"id": len(groups) + 1, "title": title, "bounding": [left, top, right - left, bottom - top],
                           "color": "#3f789e", "font_size": 24, "flags": {}})
        return groups

    def _execution_order(self) -> Dict[int, int]:
        deps = {n.id: {link[1] for link in self.links if link[3] == n.id} for n in self.nodes}
        order: Dict[int, int] = {}
        while len(order) < len(self.nodes):
            ready = [n for n in self.nodes if n.id not in order and deps[n.id] <= set(order)]
            if not ready:
                raise ValueError(f"{self.name}: the graph has a cycle")
            for n in sorted(ready, key=lambda n: (n.column, n.pos[1])):
                order[n.id] = len(order)
        return order

    def to_json(self) -> dict:
        groups = self._layout()
        order = self._execution_order()
        nodes = []
        for n in self.nodes:
            entry = {
                "id": n.id, "type": n.type, "pos": [n.pos[0], n.pos[1]], "size": [n.width, n.height],
                "flags": {}, "order": order[n.id], "mode": 0,
                "inputs": [dict(i) for i in n.inputs],
                "outputs": [dict(o, links=list(o["links"])) for o in n.outputs],
            }
            if n.title:
                entry["title"] = n.title
            entry["properties"] = {} if n.type == NOTE else {"Node name for S&R": n.type}
            entry["widgets_values"] = list(n.widgets_values)
            if n.color:
                entry["color"], entry["bgcolor"] = n.color
            nodes.append(entry)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-wuerstchen/workflows/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": [list(link) for link in self.links],
            "groups": groups,
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}},
            "version": 0.4,
        }


# ------------------------------------------------------------------------------------------------
# Building blocks shared by the examples


@dataclass
class Cascade:
    stage_c: Node
    stage_b: Node
    stage_a: Node
    clip: Node
    positive: Node
    negative: Node
    stage_c_out: str = "stage_c"
    clip_out: str = "clip"


def stage_loaders(wf: Workflow, column: int = 0, previewer: bool = False):
    c = wf.add("WuerstchenStageCLoader", column, "Models", model_name="stage_c_bf16.safetensors")
    b = wf.add("WuerstchenStageBLoader", column, "Models", model_name="stage_b_bf16.safetensors")
    a = wf.add("WuerstchenStageALoader", column, "Models", model_name="stage_a.safetensors")
    clip = wf.add("WuerstchenCLIPTextLoader", column, "Models", width=360, model_name="text_encoder/model.safetensors")
    pv = None
    if previewer:
        pv = wf.add("WuerstchenPreviewerLoader", column, "Models", model_name="previewer.safetensors")
    return c, b, a, clip, pv


def prompts(wf: Workflow, clip: Node, clip_out: str, column: int, text: str = PROMPT):
    pos = wf.add("WuerstchenTextEncode", column, "Prompt", title="Positive prompt", width=400, text=text)
    neg = wf.add("WuerstchenTextEncode", column, "Prompt", title="Negative prompt (official: empty)", width=400,
                 text="")
    wf.link(clip, clip_out, pos, "clip")
    wf.link(clip, clip_out, neg, "clip")
    return pos, neg


def empty_latent(wf: Workflow, column: int, **size) -> Node:
    return wf.add("WuerstchenEmptyLatent", column, "Size", **size)


def stage_c_sampler(wf: Workflow, column: int, stage_c: Tuple[Node, str], positive: Node, negative: Node,
                    latent: Tuple[Node, str], **settings) -> Node:
    sampler = wf.add("WuerstchenStageCSampler", column, "Stage C", seed=SEED, **settings)
    wf.link(stage_c[0], stage_c[1], sampler, "stage_c")
    wf.link(positive, "CONDITIONING", sampler, "positive")
    wf.link(negative, "CONDITIONING", sampler, "negative")
    wf.link(latent[0], latent[1], sampler, "latent")
    return sampler


def finish(wf: Workflow, column: int, stage_b: Tuple[Node, str], stage_a: Tuple[Node, str], c_sampler: Node,
           positive: Node, negative: Node, prefix: str) -> Node:
    """Stage B sampler -> Stage A decode -> Save Image, in three more columns."""
    b = wf.add("WuerstchenStageBSampler", column, "Stage B", seed=SEED)
    wf.link(stage_b[0], stage_b[1], b, "stage_b")
    wf.link(c_sampler, "stage_c", b, "stage_c")
    wf.link(positive, "CONDITIONING", b, "positive")
    wf.link(negative, "CONDITIONING", b, "negative")
    decode = wf.add("WuerstchenStageADecode", column + 1, "Stage A")
    wf.link(stage_a[0], stage_a[1], decode, "stage_a")
    wf.link(b, "stage_b", decode, "latent")
    save = wf.add("SaveImage", column + 2, "Output", width=520, extra_height=480, filename_prefix=prefix)
    wf.link(decode, "IMAGE", save, "images")
    return save


def load_image(wf: Workflow, column: int, group: str, title: str) -> Node:
    return wf.add("LoadImage", column, group, title=title, width=330, extra_height=300, image=EXAMPLE_IMAGE)


# ------------------------------------------------------------------------------------------------
# The examples


def text_to_image() -> Workflow:
    wf = Workflow("text_to_image")
    c, b, a, clip, pv = stage_loaders(wf, previewer=True)
    pos, neg = prompts(wf, clip, "clip", 1)
    lat = empty_latent(wf, 1)
    sampler = stage_c_sampler(wf, 2, (c, "stage_c"), pos, neg, (lat, "stage_c"))
    wf.link(pv, "previewer", sampler, "previewer")
    finish(wf, 3, (b, "stage_b"), (a, "stage_a"), sampler, pos, neg, "wuerstchen")
    return wf


def image_to_image() -> Workflow:
    wf = Workflow("image_to_image")
    c, b, a, clip, _ = stage_loaders(wf)
    eff = wf.add("WuerstchenSemanticCompressorLoader", 0, "Models", width=360, model_name="effnet_encoder.safetensors")
    pos, neg = prompts(wf, clip, "clip", 1)
    img = load_image(wf, 1, "Input image", "Input image")
    enc = wf.add("WuerstchenSemanticEncode", 1, "Input image")
    wf.link(eff, "semantic_compressor", enc, "semantic_compressor")
    wf.link(img, "IMAGE", enc, "image")
    sampler = stage_c_sampler(wf, 2, (c, "stage_c"), pos, neg, (enc, "stage_c"), denoise=0.6)
    wf.note(2, "denoise 0.6 = the official img2img strength;\nlower keeps more of the input image.", group="Stage C")
    finish(wf, 3, (b, "stage_b"), (a, "stage_a"), sampler, pos, neg, "wuerstchen_img2img")
    return wf


def image_variation() -> Workflow:
    wf = Workflow("image_variation")
    c, b, a, clip, _ = stage_loaders(wf)
    vision = wf.add("WuerstchenCLIPVisionLoader", 0, "Models", width=360,
                    model_name="image_encoder/model.safetensors")
    pos, neg = prompts(wf, clip, "clip", 1, text="")
    img = load_image(wf, 1, "Reference image", "Reference image")
    var = wf.add("WuerstchenImageVariation", 1, "Reference image")
    wf.link(pos, "CONDITIONING", var, "conditioning")
    wf.link(vision, "clip_vision", var, "clip_vision")
    wf.link(img, "IMAGE", var, "image")
    lat = empty_latent(wf, 2)
    sampler = stage_c_sampler(wf, 2, (c, "stage_c"), var, neg, (lat, "stage_c"))
    finish(wf, 3, (b, "stage_b"), (a, "stage_a"), sampler, pos, neg, "wuerstchen_variation")
    return wf


def lora() -> Workflow:
    wf = Workflow("lora")
    c, b, a, clip, _ = stage_loaders(wf)
    lo = wf.add("WuerstchenLoraLoader", 1, "LoRA", width=400, lora_name="wuerstchen_tiny_lora.safetensors")
    wf.link(c, "stage_c", lo, "stage_c")
    wf.link(clip, "clip", lo, "clip")
    pos, neg = prompts(wf, lo, "clip", 1)
    lat = empty_latent(wf, 1)
    sampler = stage_c_sampler(wf, 2, (lo, "stage_c"), pos, neg, (lat, "stage_c"))
    finish(wf, 3, (b, "stage_b"), (a, "stage_a"), sampler, pos, neg, "wuerstchen_lora")
    return wf


def train_lora() -> Workflow:
    wf = Workflow("train_lora")
    c, b, a, clip, _ = stage_loaders(wf)
    eff = wf.add("WuerstchenSemanticCompressorLoader", 0, "Models", width=360, model_name="effnet_encoder.safetensors")
    img = load_image(wf, 1, "Training data", "Training picture(s)")
    wf.note(1, "Several pictures: ComfyUI's Load Image and Text\nDataset from Folder (images + conditioning),\n"
               "or the folder widget of the training node\n(name.png + name.txt pairs).", group="Training data")
    tr = wf.add("WuerstchenTrainStageCLora", 2, "Train", width=400, steps=300, captions="a photo of [pet]",
                token="[pet]:^dog</w>")
    for src, out, socket in ((c, "stage_c", "stage_c"), (clip, "clip", "clip"), (eff, "semantic_compressor",
                                                                                "semantic_compressor"),
                             (img, "IMAGE", "images")):
        wf.link(src, out, tr, socket)
    apply = wf.add("WuerstchenApplyTrainedLora", 3, "LoRA", width=360)
    wf.link(c, "stage_c", apply, "stage_c")
    wf.link(tr, "lora", apply, "lora")
    wf.link(clip, "clip", apply, "clip")
    save = wf.add("WuerstchenSaveLora", 3, "LoRA", width=360, filename_prefix="wuerstchen_trained_lora")
    wf.link(tr, "lora", save, "lora")
    plot = wf.add("WuerstchenLossPlot", 3, "LoRA", width=360)
    wf.link(tr, "loss", plot, "loss")
    pos, neg = prompts(wf, apply, "clip", 4, text="a photo of [pet] in a garden")
    lat = empty_latent(wf, 4)
    shown = wf.add("PreviewImage", 4, "Loss", width=520, extra_height=260)
    wf.link(plot, "plot", shown, "images")
    sampler = stage_c_sampler(wf, 5, (apply, "stage_c"), pos, neg, (lat, "stage_c"))
    finish(wf, 6, (b, "stage_b"), (a, "stage_a"), sampler, pos, neg, "wuerstchen_trained_lora")
    return wf


def _controlnet(name: str, controlnet_file: str, prefix: str, build_hint, title: Optional[str] = None) -> Workflow:
    """Loaders, prompts and size in columns 0-1; ``build_hint`` adds the hint from column 2 on."""
    wf = Workflow(name)
    c, b, a, clip, _ = stage_loaders(wf)
    cn = wf.add("WuerstchenControlNetLoader", 0, "Models", width=420, model_name=controlnet_file)
    pos, neg = prompts(wf, clip, "clip", 1)
    lat = empty_latent(wf, 1)
    if title:
        lat.title = title
    hint, column = build_hint(wf, cn)
    sampler = stage_c_sampler(wf, column, (c, "stage_c"), pos, neg, (lat, "stage_c"))
    wf.link(hint, "control", sampler, "control")
    finish(wf, column + 1, (b, "stage_b"), (a, "stage_a"), sampler, pos, neg, prefix)
    return wf


def _apply(wf: Workflow, column: int, cn: Node, image: Tuple[Node, str]) -> Node:
    apply = wf.add("WuerstchenControlNetApply", column, "ControlNet")
    wf.link(cn, "controlnet", apply, "controlnet")
    wf.link(image[0], image[1], apply, "image")
    return apply


def controlnet_canny() -> Workflow:
    def hint(wf, cn):
        img = load_image(wf, 2, "Control image", "Control image")
        edges = wf.add("Canny", 2, "Control image", title="Canny edges")
        wf.link(img, "IMAGE", edges, "image")
        preview = wf.add("PreviewImage", 2, "Control image", title="Edge map", extra_height=260)
        wf.link(edges, "IMAGE", preview, "images")
        return _apply(wf, 3, cn, (edges, "IMAGE")), 3

    return _controlnet("controlnet_canny", "controlnet/canny.safetensors", "wuerstchen_canny", hint)


def controlnet_inpainting() -> Workflow:
    def hint(wf, cn):
        img = load_image(wf, 2, "Image and mask", "Image (mask: right-click > Open in MaskEditor)")
        img.width = 380
        apply = _apply(wf, 3, cn, (img, "IMAGE"))
        wf.link(img, "MASK", apply, "mask")
        wf.note(3, "The mask marks the area to repaint\n(painted or transparent pixels).", group="ControlNet")
        return apply, 3

    return _controlnet("controlnet_inpainting", "controlnet/inpainting.safetensors", "wuerstchen_inpainting", hint)


def super_resolution() -> Workflow:
    def hint(wf, cn):
        eff = wf.add("WuerstchenSemanticCompressorLoader", 0, "Models", width=360,
                     model_name="effnet_encoder.safetensors")
        img = load_image(wf, 2, "Low-resolution image", "Low-resolution image (512x512)")
        apply = _apply(wf, 2, cn, (img, "IMAGE"))
        apply.group = "Low-resolution image"
        wf.link(eff, "semantic_compressor", apply, "semantic_compressor")
        wf.note(2, "Super-resolution doubles the input:\nset the output size to twice the input image.",
                group="Low-resolution image")
        return apply, 3

    return _controlnet("super_resolution", "controlnet/super_resolution.safetensors", "wuerstchen_sr", hint,
                       title="Output size (2x the input image)")


def checkpoint_text_to_image() -> Workflow:
    wf = Workflow("checkpoint_text_to_image")
    ckpt_c = wf.add("WuerstchenCheckpointLoader", 0, "Checkpoints", title="Stage C checkpoint", width=360,
                    ckpt_name="stable_cascade_stage_c.safetensors")
    ckpt_b = wf.add("WuerstchenCheckpointLoader", 0, "Checkpoints", title="Stage B checkpoint", width=360,
                    ckpt_name="stable_cascade_stage_b.safetensors")
    pos, neg = prompts(wf, ckpt_c, "clip", 1)
    lat = empty_latent(wf, 1)
    sampler = stage_c_sampler(wf, 2, (ckpt_c, "stage_c"), pos, neg, (lat, "stage_c"))
    wf.link(ckpt_c, "previewer", sampler, "previewer")
    finish(wf, 3, (ckpt_b, "stage_b"), (ckpt_b, "stage_a"), sampler, pos, neg, "wuerstchen_checkpoint")
    return wf


# ------------------------------------------------------------------------------------------------
# Würstchen v2: the same nodes; the models tell them the family


V2_FILES = dict(prior="wuerstchen-prior/prior/diffusion_pytorch_model.safetensors",
                decoder="wuerstchen/decoder/diffusion_pytorch_model.safetensors",
                vqgan="wuerstchen/vqgan/diffusion_pytorch_model.safetensors",
                prior_text="wuerstchen-prior/text_encoder/model.safetensors",
                decoder_text="wuerstchen/text_encoder/model.safetensors",
                effnet="model_v2_stage_b.pt")


def _v2_models(wf: Workflow):
    prior = wf.add("WuerstchenStageCLoader", 0, "Würstchen v2 models", title="Würstchen v2 prior", width=480,
                   model_name=V2_FILES["prior"])
    decoder = wf.add("WuerstchenStageBLoader", 0, "Würstchen v2 models", title="Würstchen v2 decoder", width=480,
                     model_name=V2_FILES["decoder"])
    vqgan = wf.add("WuerstchenStageALoader", 0, "Würstchen v2 models", title="VQGAN", width=480,
                   model_name=V2_FILES["vqgan"])
    prior_clip = wf.add("WuerstchenCLIPTextLoader", 0, "Würstchen v2 models", title="Prior text encoder (bigG)",
                        width=480, model_name=V2_FILES["prior_text"])
    decoder_clip = wf.add("WuerstchenCLIPTextLoader", 0, "Würstchen v2 models", title="Decoder text encoder (ViT-H)",
                          width=480, model_name=V2_FILES["decoder_text"])
    return prior, decoder, vqgan, prior_clip, decoder_clip


def _v2_prompts(wf: Workflow, prior_clip: Node, decoder_clip: Node, column: int):
    """The prompt through both towers (the hub pipelines encode it once per stage), negatives empty."""
    encodes = []
    for clip, stage in ((prior_clip, "prior"), (decoder_clip, "decoder")):
        pos = wf.add("WuerstchenTextEncode", column, "Prompt", title=f"Prompt ({stage})", width=400, text=PROMPT)
        neg = wf.add("WuerstchenTextEncode", column, "Prompt", title=f"Negative prompt ({stage}; hub: empty)",
                     width=400, text="")
        wf.link(clip, "clip", pos, "clip")
        wf.link(clip, "clip", neg, "clip")
        encodes.append((pos, neg))
    return encodes


def _v2_sample_and_decode(wf: Workflow, column: int, models, encodes, latent: Tuple[Node, str], prefix: str,
                          denoise: float = 1.0, note: str = "") -> None:
    prior, decoder, vqgan, _, _ = models
    (prior_pos, prior_neg), (decoder_pos, decoder_neg) = encodes
    sampler = wf.add("WuerstchenStageCSampler", column, "Prior", title="Prior sampler (Würstchen v2)", seed=SEED,
                     steps=0, denoise=denoise)
    wf.link(prior, "stage_c", sampler, "stage_c")
    wf.link(prior_pos, "CONDITIONING", sampler, "positive")
    wf.link(prior_neg, "CONDITIONING", sampler, "negative")
    wf.link(latent[0], latent[1], sampler, "latent")
    wf.note(column, "steps 0 = the hub's 29-step grid (cfg 4);\nany other number: that many uniform steps.\n"
            "shift and cfg_rho are Stable Cascade\nsettings: Würstchen v2 does not use them." + note, group="Prior")
    dec = wf.add("WuerstchenStageBSampler", column + 1, "Decoder", title="Decoder sampler (Würstchen v2)", seed=SEED,
                 steps=12, cfg=0.0)
    wf.link(decoder, "stage_b", dec, "stage_b")
    wf.link(sampler, "stage_c", dec, "stage_c")
    wf.link(decoder_pos, "CONDITIONING", dec, "positive")
    wf.link(decoder_neg, "CONDITIONING", dec, "negative")
    wf.note(column + 1, "The hub decoder recipe: 12 steps,\ncfg 0 (no guidance); the output size\n"
            "follows the prior latent (width/height 0).", group="Decoder")
    decode = wf.add("WuerstchenStageADecode", column + 2, "VQGAN")
    wf.link(vqgan, "stage_a", decode, "stage_a")
    wf.link(dec, "stage_b", decode, "latent")
    save = wf.add("SaveImage", column + 3, "Output", width=520, extra_height=480, filename_prefix=prefix)
    wf.link(decode, "IMAGE", save, "images")


def wuerstchen_v2_text_to_image() -> Workflow:
    wf = Workflow("wuerstchen_v2_text_to_image")
    models = _v2_models(wf)
    encodes = _v2_prompts(wf, models[3], models[4], 1)
    lat = empty_latent(wf, 1)
    wf.note(1, "Würstchen v2 sizes: multiples of 128\n(the decoder needs a prior latent\nside divisible by 3).",
            group="Size")
    _v2_sample_and_decode(wf, 2, models, encodes, (lat, "stage_c"), "wuerstchen_v2")
    return wf


def wuerstchen_v2_image_to_image() -> Workflow:
    wf = Workflow("wuerstchen_v2_image_to_image")
    models = _v2_models(wf)
    eff = wf.add("WuerstchenSemanticCompressorLoader", 0, "Würstchen v2 models", title="v2 semantic compressor",
                 width=480, model_name=V2_FILES["effnet"])
    encodes = _v2_prompts(wf, models[3], models[4], 1)
    img = load_image(wf, 1, "Input image", "Input image")
    enc = wf.add("WuerstchenSemanticEncode", 1, "Input image")
    wf.link(eff, "semantic_compressor", enc, "semantic_compressor")
    wf.link(img, "IMAGE", enc, "image")
    _v2_sample_and_decode(wf, 2, models, encodes, (enc, "stage_c"), "wuerstchen_v2_img2img", denoise=0.6,
                          note="\ndenoise 0.6: lower keeps more\nof the input image.")
    return wf


def layer_edit() -> Workflow:
    """Layered editing (DesignEdit on Stage C): move one object, remove another, keep the rest's pixels."""
    wf = Workflow("layer_edit")
    c, b, a, clip, _ = stage_loaders(wf)
    eff = wf.add("WuerstchenSemanticCompressorLoader", 0, "Models", width=360, model_name="effnet_encoder.safetensors")
    pos, neg = prompts(wf, clip, "clip", 1, text="a photo")
    img = load_image(wf, 1, "Picture and masks", "Picture (mask: the object to move)")
    second = load_image(wf, 1, "Picture and masks", "Mask of the object to remove (MaskEditor)")
    dec = wf.add("WuerstchenLayerDecompose", 2, "Layers")
    wf.link(c, "stage_c", dec, "stage_c")
    wf.link(eff, "semantic_compressor", dec, "semantic_compressor")
    wf.link(pos, "CONDITIONING", dec, "positive")
    wf.link(img, "IMAGE", dec, "image")
    wf.link(img, "MASK", dec, "mask")
    wf.link(second, "MASK", dec, "mask_2")
    wf.note(2, "Paint each object's mask in the MaskEditor\n(right-click a Load Image node).\nLayer 0 = mask, "
               "layer 1 = mask_2.", group="Layers")
    move = wf.add("WuerstchenLayerTransform", 3, "Edit", title="Move layer 0", layer=0, dx=-64, dy=0)
    wf.link(dec, "layers", move, "layers")
    remove = wf.add("WuerstchenLayerTransform", 3, "Edit", title="Remove layer 1", layer=1, remove=True)
    wf.link(move, "layers", remove, "layers")
    wf.note(3, "Offsets snap to whole Stage C cells\n(about 42 px at 1024x1024).", group="Edit")
    fuse = wf.add("WuerstchenLayerFuse", 4, "Fuse")
    wf.link(c, "stage_c", fuse, "stage_c")
    wf.link(remove, "layers", fuse, "layers")
    source = wf.add("WuerstchenStageAEncode", 4, "Fuse", title="Source Stage B latent")
    wf.link(a, "stage_a", source, "stage_a")
    wf.link(dec, "image", source, "image")
    sb = wf.add("WuerstchenEditStageBSampler", 5, "Stage B", seed=SEED)
    wf.link(b, "stage_b", sb, "stage_b")
    wf.link(fuse, "stage_c", sb, "stage_c")
    wf.link(pos, "CONDITIONING", sb, "positive")
    wf.link(neg, "CONDITIONING", sb, "negative")
    wf.link(source, "stage_b", sb, "source")
    wf.link(fuse, "edit_mask", sb, "edit_mask")
    decode = wf.add("WuerstchenStageADecode", 6, "Stage A")
    wf.link(a, "stage_a", decode, "stage_a")
    wf.link(sb, "stage_b", decode, "latent")
    save = wf.add("SaveImage", 7, "Output", width=520, extra_height=480, filename_prefix="wuerstchen_layer_edit")
    wf.link(decode, "IMAGE", save, "images")
    return wf


WORKFLOWS = {
    "text_to_image": text_to_image,
    "image_to_image": image_to_image,
    "image_variation": image_variation,
    "lora": lora,
    "train_lora": train_lora,
    "controlnet_canny": controlnet_canny,
    "controlnet_inpainting": controlnet_inpainting,
    "super_resolution": super_resolution,
    "checkpoint_text_to_image": checkpoint_text_to_image,
    "wuerstchen_v2_text_to_image": wuerstchen_v2_text_to_image,
    "wuerstchen_v2_image_to_image": wuerstchen_v2_image_to_image,
    "layer_edit": layer_edit,
}


def render(build) -> str:
    return json.dumps(build().to_json(), indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write into (default: workflows/)")
    parser.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = parser.parse_args(argv)
    stale = []
    for name, build in WORKFLOWS.items():
        path = args.out / f"{name}.json"
        text = render(build)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if stale:
        print(f"out of date (run python tools/make_workflows.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
