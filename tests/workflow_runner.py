"""Loads, checks and runs ComfyUI workflows in the editor's format, without ComfyUI.

Why: the example workflows are what users drag onto the canvas first. This runner checks them the
way ComfyUI would read them (node types, widget values in INPUT_TYPES order, socket types) and then
executes the graph on real node classes, so a workflow that drifts from the nodes fails a test.

The editor's rules (which inputs are widgets, the editor-only values stored after seed widgets and
image uploads, linked widgets, editor-only and muted nodes, what is sent) come from
``tools/editor_rules.py``, the module the workflow generator uses too, which is checked against
files the real editor saved (tests/test_editor_rules.py).

The ComfyUI core nodes the examples use have small stand-ins here (LoadImage, SaveImage,
PreviewImage, Canny) with ComfyUI's inputs, outputs and widget order.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # tools/ is imported from the repository root
    sys.path.insert(0, str(REPO))

from tools import comfy_core_nodes as core  # noqa: E402
from tools.editor_rules import (  # noqa: E402
    EDITOR_ONLY_NODES, MODE_ALWAYS, MODE_MUTED, WidgetSlot, choices, is_widget, link_table, node_label, options,
    sent_inputs, widget_slots,
)

__all__ = ["WorkflowError", "WorkflowRunner", "core_nodes", "load_workflow", "value_problem", "runtime_value_problem",
           "canny_edges", "is_widget", "widget_slots", "WidgetSlot"]  # the last three: from tools/editor_rules.py

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class WorkflowError(ValueError):
    """A workflow that ComfyUI would refuse (or run wrongly); the message lists every problem."""


# ------------------------------------------------------------------------------------------------
# Stand-ins for the ComfyUI core nodes the examples use


def core_nodes(input_dir: Path, output_dir: Path) -> Dict[str, type]:
    """ComfyUI's LoadImage / SaveImage / PreviewImage / Canny, reading and writing the given folders."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)

    class LoadImage:
        RETURN_TYPES = tuple(kind for _name, kind in core.outputs("LoadImage"))
        FUNCTION = "load_image"
        CATEGORY = "image"

        @classmethod
        def INPUT_TYPES(cls):
            files = [p.name for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            return core.input_types("LoadImage", files)

        def load_image(self, image):
            from PIL import Image, ImageOps

            pil = ImageOps.exif_transpose(Image.open(input_dir / image))
            rgb = torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]
            if "A" in pil.getbands():
                alpha = torch.from_numpy(np.asarray(pil.getchannel("A"), dtype=np.float32) / 255.0)
                mask = 1.0 - alpha  # ComfyUI: transparent = masked
            else:
                mask = torch.zeros(64, 64)  # ComfyUI's placeholder when the image has no alpha
            return (rgb, mask[None])

    class SaveImage:
        RETURN_TYPES = tuple(kind for _name, kind in core.outputs("SaveImage"))
        FUNCTION = "save_images"
        OUTPUT_NODE = core.is_output_node("SaveImage")
        CATEGORY = "image"
        SUBFOLDER = ""

        @classmethod
        def INPUT_TYPES(cls):
            return core.input_types("SaveImage")

        def save_images(self, images, filename_prefix="ComfyUI"):
            from PIL import Image

            folder = output_dir / self.SUBFOLDER
            folder.mkdir(parents=True, exist_ok=True)
            if Path(filename_prefix).is_absolute() or ".." in Path(filename_prefix).parts:
                raise ValueError(f"filename_prefix {filename_prefix!r} leaves the output folder")
            saved = []
            taken = re.compile(re.escape(Path(filename_prefix).name) + r"_(\d+)_\.png$")
            start = max([int(m.group(1)) for p in (folder / filename_prefix).parent.glob("*.png")
                         if (m := taken.match(p.name))], default=0)
            for i, image in enumerate(images):
                arr = (image.float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
                path = folder / f"{filename_prefix}_{start + i + 1:05d}_.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
                saved.append(path)
            return {"ui": {"images": saved}}

    class PreviewImage(SaveImage):
        SUBFOLDER = "preview"

        @classmethod
        def INPUT_TYPES(cls):
            return core.input_types("PreviewImage")

        def save_images(self, images, filename_prefix="preview"):
            return super().save_images(images, "preview")

    class Canny:
        RETURN_TYPES = tuple(kind for _name, kind in core.outputs("Canny"))
        FUNCTION = "detect_edge"
        CATEGORY = "image/preprocessors"

        @classmethod
        def INPUT_TYPES(cls):
            return core.input_types("Canny")

        def detect_edge(self, image, low_threshold, high_threshold):
            edges = canny_edges(image.movedim(-1, 1), low_threshold, high_threshold)
            return (edges.repeat(1, 3, 1, 1).movedim(1, -1),)

    return {cls.__name__: cls for cls in (LoadImage, SaveImage, PreviewImage, Canny)}


def canny_edges(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """A plain Canny detector: [B, C, H, W] in [0, 1] -> [B, 1, H, W] edges of 0/1."""
    grey = images[:, :3].float().mean(dim=1, keepdim=True)
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    blur = (taps[:, None] * taps[None, :] / 256.0)[None, None]
    grey = F.conv2d(F.pad(grey, (2, 2, 2, 2), mode="replicate"), blur)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])[None, None]
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, sobel_x), F.conv2d(padded, sobel_x.transpose(-1, -2))
    magnitude = torch.sqrt(gx ** 2 + gy ** 2)
    # Non-maximum suppression along the gradient direction, quantised to 0/45/90/135 degrees.
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    sector = (((angle + 22.5) // 45) % 4).long()
    offsets = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    padded_mag = F.pad(magnitude, (1, 1, 1, 1))
    h, w = magnitude.shape[-2:]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, ((dy1, dx1), (dy2, dx2)) in enumerate(offsets):
        n1 = padded_mag[..., 1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        n2 = padded_mag[..., 1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep |= (sector == index) & (magnitude > n1) & (magnitude >= n2)  # ties: one pixel wide
    thin = magnitude * keep
    strong, weak = thin >= high, thin >= low
    # Hysteresis: weak edges survive when connected to a strong one.
    edges = strong
    for _ in range(max(h, w)):
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.float()


# ------------------------------------------------------------------------------------------------
# Reading a workflow


def load_workflow(path: Path) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("nodes", "links"):
        if key not in data:
            raise WorkflowError(f"{Path(path).name}: not an editor-format workflow (no {key!r}); API-format "
                                "prompts are not read by this runner")
    return data


def value_problem(name: str, spec: Sequence, value: Any) -> Optional[str]:
    """Why ``value`` does not fit the input ``spec``, or None."""
    kind, opts, listed = spec[0], options(spec), choices(spec)
    if listed is not None:
        if value not in listed:
            shown = ", ".join(map(repr, listed[:8])) + (", ..." if len(listed) > 8 else "")
            return f"widget {name!r} = {value!r} is not one of the choices ({shown})"
        return None
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"widget {name!r} = {value!r} is not an integer"
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"widget {name!r} = {value!r} is not a number"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"widget {name!r} = {value!r} is not a string"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"widget {name!r} = {value!r} is not true/false"
    if "min" in opts and value < opts["min"] - 1e-9:
        return f"widget {name!r} = {value!r} is below its minimum {opts['min']}"
    if "max" in opts and value > opts["max"] + 1e-9:
        return f"widget {name!r} = {value!r} is above its maximum {opts['max']}"
    return None


def _types_match(output_type: str, input_type) -> bool:
    if isinstance(input_type, (list, tuple)):  # a combo fed by a link
        input_type = "COMBO"
    return output_type == input_type or "*" in (output_type, input_type)


# ------------------------------------------------------------------------------------------------
# Checking and running


@dataclass
class PlannedNode:
    id: int
    type: str
    label: str
    cls: type
    widget_values: Dict[str, Any]
    linked: Dict[str, Tuple[int, int]]  # input name -> (source node id, output slot)


@dataclass
class RunResult:
    outputs: Dict[int, tuple] = field(default_factory=dict)
    images: List[Path] = field(default_factory=list)  # files written by SaveImage / PreviewImage
    order: List[int] = field(default_factory=list)


class WorkflowRunner:
    """Checks a workflow against node classes and runs it.

    ``node_classes``: type name -> class with INPUT_TYPES / RETURN_TYPES / FUNCTION (our
    NODE_CLASS_MAPPINGS merged with :func:`core_nodes`).
    """

    def __init__(self, node_classes: Mapping[str, type]):
        self.node_classes = dict(node_classes)

    def plan(self, workflow: dict, name: str = "workflow",
             overrides: Optional[Mapping[str, Any]] = None) -> List[PlannedNode]:
        """Every problem ComfyUI would complain about, raised together; else the nodes to run, in order.

        ``overrides`` replaces widget values for this run only: ``{"steps": 2}`` for every node with
        a ``steps`` widget, ``{"WuerstchenStageCSampler.steps": 2}`` for one node type; override
        values are checked like the file's.
        """
        problems: List[str] = []
        nodes = {int(n["id"]): n for n in workflow["nodes"]}
        links = link_table(workflow)
        planned: Dict[int, PlannedNode] = {}
        for node_id, node in nodes.items():
            node_type = node.get("type")
            if node_type in EDITOR_ONLY_NODES or node.get("mode", MODE_ALWAYS) == MODE_MUTED:
                continue  # never sent by the editor
            label = node_label(node, name)
            cls = self.node_classes.get(node_type)
            if cls is None:
                problems.append(f"{label}: unknown node type {node_type!r}; it is neither one of this pack's "
                                "nodes nor a ComfyUI core node the runner knows")
                continue
            input_types = cls.INPUT_TYPES()
            declared = {**input_types.get("required", {}), **input_types.get("optional", {})}
            link_types = self._check_saved_inputs(node, declared, links, label, problems)
            sent, sent_problems = sent_inputs(node, input_types, nodes, links)
            problems += [f"{label}: {p}" for p in sent_problems]
            values: Dict[str, Any] = {}
            linked: Dict[str, Tuple[int, int]] = {}
            for input_name, value in sent.items():
                spec = declared.get(input_name)
                if spec is None:
                    continue  # reported by _check_saved_inputs
                if isinstance(value, list):  # [source id, output slot]
                    linked[input_name] = (int(value[0]), int(value[1]))
                    problem = self._link_problem(nodes, int(value[0]), int(value[1]),
                                                 link_types.get(input_name, "*"), spec)
                    if problem:
                        problems.append(f"{label}: input {input_name!r} {problem}")
                    continue
                for key in (input_name, f"{node_type}.{input_name}"):
                    if overrides and key in overrides:
                        value = overrides[key]
                problem = value_problem(input_name, spec, value)
                if problem:
                    problems.append(f"{label}: {problem}")
                values[input_name] = value
            if not sent_problems:
                for input_name, spec in input_types.get("required", {}).items():
                    if input_name not in sent:
                        what = "has no value" if is_widget(spec) else "is not connected"
                        problems.append(f"{label}: required input {input_name!r} ({spec[0]}) {what}")
            planned[node_id] = PlannedNode(node_id, node_type, label, cls, values, linked)
        for link_id, (src, _s, dst, _d, _k) in links.items():
            for end in (src, dst):
                if end not in nodes:
                    problems.append(f"{name}: link {link_id} refers to node {end}, which does not exist")
        order = self._order(planned, problems, name)
        if problems:
            raise WorkflowError("\n".join(problems))
        return [planned[i] for i in order]

    @staticmethod
    def _check_saved_inputs(node, declared, links, label, problems) -> Dict[str, Any]:
        """The saved sockets exist on the node and their links end here; {input name: link type}."""
        link_types: Dict[str, Any] = {}
        for slot, inp in enumerate(node.get("inputs") or []):
            if inp["name"] not in declared:
                problems.append(f"{label}: input {inp['name']!r} does not exist on {node.get('type')} "
                                f"(inputs: {', '.join(declared)})")
                continue
            link_id = inp.get("link")
            if link_id is None:
                continue
            if int(link_id) not in links:
                problems.append(f"{label}: input {inp['name']!r} refers to link {link_id}, which is not in 'links'")
                continue
            _src, _src_slot, dst, dst_slot, kind = links[int(link_id)]
            if (dst, dst_slot) != (int(node["id"]), slot):
                problems.append(f"{label}: link {link_id} ends at node {dst} slot {dst_slot}, not here")
                continue
            link_types[inp["name"]] = kind
        return link_types

    def _link_problem(self, nodes, src, src_slot, kind, spec) -> Optional[str]:
        source = nodes.get(src)
        if source is None:
            return f"is linked to node {src}, which does not exist"
        cls = self.node_classes.get(source.get("type"))
        if cls is None:
            return None  # reported on the source node itself
        if src_slot >= len(cls.RETURN_TYPES):
            return f"is linked to output {src_slot} of {source['type']}, which has {len(cls.RETURN_TYPES)} outputs"
        out_type = cls.RETURN_TYPES[src_slot]
        if not _types_match(out_type, spec[0]):
            return f"expects {spec[0]} but is linked to {source['type']} output {src_slot} ({out_type})"
        if kind not in (out_type, "*"):
            return f"link says type {kind!r}, but {source['type']} output {src_slot} is {out_type}"
        return None

    def _order(self, planned: Dict[int, PlannedNode], problems: List[str], name: str) -> List[int]:
        """Output nodes and what they need (as ComfyUI executes), dependencies first."""
        wanted = [i for i, p in planned.items() if getattr(p.cls, "OUTPUT_NODE", False)]
        if not wanted:
            problems.append(f"{name}: no output node (SaveImage, PreviewImage, ...); ComfyUI would not run it")
        order: List[int] = []
        state: Dict[int, str] = {}

        def visit(node_id: int, chain: Tuple[int, ...]) -> None:
            if state.get(node_id) == "done":
                return
            if state.get(node_id) == "visiting":
                problems.append(f"{name}: the graph has a cycle through nodes {list(chain)}")
                return
            node = planned.get(node_id)
            if node is None:
                return  # missing, muted or unknown: reported where it is linked or declared
            state[node_id] = "visiting"
            for src, _slot in node.linked.values():
                if src not in planned:
                    problems.append(f"{node.label}: needs node {src}, which is muted, unknown or missing")
                    continue
                visit(src, chain + (src,))
            state[node_id] = "done"
            order.append(node_id)

        for node_id in sorted(wanted):
            visit(node_id, (node_id,))
        return order

    def run(self, workflow: dict, name: str = "workflow",
            overrides: Optional[Mapping[str, Any]] = None) -> RunResult:
        result = RunResult()
        for node in self.plan(workflow, name, overrides):
            kwargs = dict(node.widget_values)
            for input_name, (src, slot) in node.linked.items():
                kwargs[input_name] = result.outputs[src][slot]
            instance = node.cls()
            out = getattr(instance, node.cls.FUNCTION)(**kwargs)
            if isinstance(out, dict):  # output nodes: {"ui": ..., "result": (...)}
                result.images.extend(out.get("ui", {}).get("images", []))
                out = tuple(out.get("result", ()))
            if not isinstance(out, tuple) or len(out) != len(node.cls.RETURN_TYPES):
                raise WorkflowError(f"{node.label}: returned {type(out).__name__} of length "
                                    f"{len(out) if hasattr(out, '__len__') else '?'}, expected a tuple of "
                                    f"{len(node.cls.RETURN_TYPES)} ({', '.join(node.cls.RETURN_TYPES)})")
            for kind, value in zip(node.cls.RETURN_TYPES, out):
                problem = runtime_value_problem(kind, value)
                if problem:
                    raise WorkflowError(f"{node.label}: output {kind} {problem}")
            result.outputs[node.id] = out
            result.order.append(node.id)
        return result


def runtime_value_problem(kind: str, value: Any) -> Optional[str]:
    """ComfyUI's layouts for the core socket types (custom types may be None when a part is absent)."""
    if kind == "IMAGE":
        if not (isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] == 3):
            return f"is not a [B, H, W, 3] tensor: {getattr(value, 'shape', type(value))}"
        if not torch.isfinite(value).all():
            return "has non-finite values"
    elif kind == "MASK":
        if not (isinstance(value, torch.Tensor) and value.dim() == 3):
            return f"is not a [B, H, W] tensor: {getattr(value, 'shape', type(value))}"
    elif kind == "LATENT":
        if not (isinstance(value, dict) and isinstance(value.get("samples"), torch.Tensor)):
            return "is not a dict with 'samples'"
        if not torch.isfinite(value["samples"]).all():
            return "has non-finite samples"
    elif kind == "CONDITIONING":
        if not (isinstance(value, list) and value and all(len(e) == 2 and isinstance(e[1], dict) for e in value)):
            return "is not a list of [tensor, dict] pairs"
    return None
