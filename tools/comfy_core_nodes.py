"""The ComfyUI core nodes our example workflows use, declared as ComfyUI declares them.

Why here: the workflow generator places their widget values and the test runner's stand-ins
execute them; both read these declarations instead of restating them, and
``tests/test_editor_rules.py`` checks them against the real server's /object_info saved in
``tests/fixtures/editor/object_info.json`` (tooltips aside). Plain Python: no ComfyUI.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

EXAMPLE_IMAGE = "example.png"  # the picture a ComfyUI install ships in input/

_THRESHOLD = {"min": 0.01, "max": 0.99, "step": 0.01}

# name -> (display name, outputs as ((name, type), ...), output node?)
_NODES: Dict[str, Tuple[str, Tuple[Tuple[str, str], ...], bool]] = {
    "LoadImage": ("Load Image", (("IMAGE", "IMAGE"), ("MASK", "MASK")), False),
    "SaveImage": ("Save Image", (), True),
    "PreviewImage": ("Preview Image", (), True),
    "Canny": ("Canny", (("IMAGE", "IMAGE"),), False),
}
CORE_NODE_TYPES = tuple(_NODES)


def input_types(node_type: str, input_files: Sequence[str] = (EXAMPLE_IMAGE,)) -> dict:
    """INPUT_TYPES of a core node; ``input_files`` are LoadImage's choices (the input folder)."""
    if node_type == "LoadImage":
        return {"required": {"image": (sorted(input_files), {"image_upload": True})}}
    if node_type == "SaveImage":
        return {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}
    if node_type == "PreviewImage":
        return {"required": {"images": ("IMAGE",)}}
    if node_type == "Canny":
        return {"required": {"image": ("IMAGE", {}),
                             "low_threshold": ("FLOAT", dict(_THRESHOLD, default=0.4)),
                             "high_threshold": ("FLOAT", dict(_THRESHOLD, default=0.8))}}
    raise KeyError(f"{node_type!r} is not one of the declared core nodes {CORE_NODE_TYPES}")


def outputs(node_type: str) -> Tuple[Tuple[str, str], ...]:
    """((output name, type), ...) of a core node."""
    return _NODES[node_type][1]


def display_name(node_type: str) -> str:
    return _NODES[node_type][0]


def is_output_node(node_type: str) -> bool:
    return _NODES[node_type][2]


def core_definitions(input_files: Sequence[str] = (EXAMPLE_IMAGE,)):
    """editor_rules.NodeDefinition for each declared core node."""
    from tools.editor_rules import NodeDefinition

    return {name: NodeDefinition(input_types(name, input_files), display_name(name)) for name in _NODES}
