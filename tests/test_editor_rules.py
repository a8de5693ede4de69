"""tools/editor_rules.py checked against files the REAL ComfyUI editor saved.

tests/fixtures/editor/ was made by tools/save_editor_fixture.py: the graph was built node by node in
ComfyUI 0.3.64's editor (frontend 1.27.10), and the editor wrote the UI workflow, the API prompt it
sends, its widget list per node and the server's node definitions. Nothing in those files comes
from our rules, so a rule that is wrong in both the generator and the runner still fails here.
The node definitions are the saved ones, not today's node classes: these tests check the rules,
and keep passing when a node gains an input.
"""

import json
import random
from pathlib import Path

import pytest

from tools import comfy_core_nodes as core
from tools.editor_rules import (
    CONTROL_WIDGET, FILTER_WIDGET, UPLOAD_WIDGET, EditorRuleError, definitions_from_object_info, dynamic_prompt,
    input_sockets, layout_widgets, read_widgets, to_api_prompt, widget_slots,
)
from workflow_runner import WorkflowRunner

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "editor"


def _load(name):
    return json.loads((FIXTURE / name).read_text(encoding="utf-8"))


WORKFLOW, PROMPT, WIDGETS, OBJECT_INFO, EDITOR = (
    _load(f"{name}.json") for name in ("workflow", "prompt", "widgets", "object_info", "editor"))
DEFINITIONS = definitions_from_object_info(OBJECT_INFO)
NODES = {n["id"]: n for n in WORKFLOW["nodes"]}
DEFINED = [n for n in WORKFLOW["nodes"] if n["type"] in DEFINITIONS]


def _node(key):
    return NODES[EDITOR["node_ids"][key]]


def _editor_widgets(node):
    """[(name, value, sent)] as the editor stored them: its widget names zipped with widgets_values."""
    stored = [(name, sent) for name, in_file, sent in WIDGETS[str(node["id"])] if in_file]
    values = node.get("widgets_values") or []
    assert len(values) == len(stored), node["type"]
    return [(name, value, sent) for (name, sent), value in zip(stored, values)]


# ------------------------------------------------------------------------------------------------
# The fixture still holds every case the rules cover


def test_the_fixture_covers_the_rules():
    assert (EDITOR["comfyui_version"], EDITOR["frontend_version"]) == ("0.3.64", "1.27.10")
    by_type = {}
    for node in WORKFLOW["nodes"]:
        by_type.setdefault(node["type"], []).append(node)
    # a control value after a seed widget (declared) and after an INT value widget (PrimitiveInt)
    assert [n for n, _v, _s in _editor_widgets(_node("sampler_c"))][:2] == ["seed", CONTROL_WIDGET]
    assert _editor_widgets(_node("sampler_b"))[1][1] == "increment"
    assert [n for n, _v, _s in _editor_widgets(_node("width"))] == ["value", CONTROL_WIDGET]
    # image upload: right after the combo on LoadImage, after ALL required widgets on LoadImageMask
    assert [n for n, _v, _s in _editor_widgets(_node("image"))] == ["image", UPLOAD_WIDGET]
    assert [n for n, _v, _s in _editor_widgets(_node("mask"))] == ["image", "channel", UPLOAD_WIDGET]
    # widgets fed by links: a real node (three targets, one a seed) and the editor-only PrimitiveNode
    linked = {(n["type"], i["name"]) for n in WORKFLOW["nodes"] for i in n.get("inputs") or []
              if i.get("widget") and i.get("link") is not None}
    assert {("WuerstchenEmptyLatent", "width"), ("WuerstchenEmptyLatent", "height"),
            ("WuerstchenStageCSampler", "seed"), ("WuerstchenControlNetApply", "strength")} <= linked
    assert "PrimitiveNode" in by_type and "Note" in by_type
    assert _node("muted")["mode"] == 2 and _node("previewer")["mode"] == 2
    fed_by_muted = [i["name"] for i in _node("sampler_c")["inputs"] if i["link"] is not None
                    and NODES[next(link[1] for link in WORKFLOW["links"] if link[0] == i["link"])]["mode"] == 2]
    assert fed_by_muted == ["previewer"] and "previewer" not in PROMPT[str(_node("sampler_c")["id"])]["inputs"]
    # optional sockets left unconnected, combos, floats, booleans, multiline strings, dynamic prompts
    unconnected = {i["name"] for i in _node("apply")["inputs"] if i["link"] is None}
    assert unconnected == {"mask", "semantic_compressor", "previous"}
    text_spec = OBJECT_INFO["WuerstchenTextEncode"]["input"]["required"]["text"][1]
    assert text_spec["multiline"] and text_spec["dynamicPrompts"]
    assert "//" in _node("positive")["widgets_values"][0] and "/*" in _node("positive")["widgets_values"][0]
    assert _node("flag")["widgets_values"] == [True]
    assert isinstance(_node("canny")["widgets_values"][0], float)
    assert _node("stage_c")["widgets_values"] == ["stage_c.safetensors", "fp32"]


# ------------------------------------------------------------------------------------------------
# The rules against the editor


def test_our_ui_to_api_mapping_equals_the_editors_export():
    def only_choice(options):  # the fixture's {penguin} has one option, so the editor's choice is known
        assert len(options) == 1, options
        return options[0]

    ours = to_api_prompt(WORKFLOW, DEFINITIONS, "editor fixture", choose=only_choice)
    assert ours == PROMPT
    for node_id, entry in PROMPT.items():  # and the same input order, as the editor builds it
        assert list(ours[node_id]["inputs"]) == list(entry["inputs"]), node_id


@pytest.mark.parametrize("node", DEFINED, ids=lambda n: f"{n['id']}-{n['type']}")
def test_our_widget_layout_equals_the_editors(node):
    """Slot names and editor-only flags, and widgets_values rebuilt from the editor's own names."""
    input_types = DEFINITIONS[node["type"]].input_types
    editor = _editor_widgets(node)
    slots = widget_slots(input_types)
    assert [s.label for s in slots] == [name for name, _v, _s in editor]
    assert [not s.editor_only for s in slots] == [sent for _n, _v, sent in editor]
    values = {name: value for name, value, sent in editor if sent}
    controls = {value for name, value, _s in editor if name == CONTROL_WIDGET}
    assert len(controls) <= 1
    rebuilt = layout_widgets(input_types, values, control=controls.pop() if controls else "fixed")
    assert rebuilt == (node.get("widgets_values") or [])
    read, problems = read_widgets(input_types, node.get("widgets_values"))
    assert read == values and not problems


@pytest.mark.parametrize("node", DEFINED, ids=lambda n: f"{n['id']}-{n['type']}")
def test_our_socket_layout_equals_the_editors(node):
    """Sockets in declaration order, then the linked widgets (unlinked widgets are not saved)."""
    linked = [i["name"] for i in node.get("inputs") or [] if i.get("widget")]
    ours = input_sockets(DEFINITIONS[node["type"]].input_types, linked)
    saved = [(i["name"], i["type"], bool(i.get("widget"))) for i in node.get("inputs") or []]
    assert ours == saved


def test_the_runner_plans_what_the_editor_sends(tmp_path):
    """The test runner, given classes declared like the saved definitions, reads the editor's file
    into exactly the inputs the editor sends (links as (source, slot))."""
    def declared(name, info):
        return type(name, (), {"INPUT_TYPES": classmethod(lambda cls: info["input"]),
                               "RETURN_TYPES": tuple(info["output"]), "OUTPUT_NODE": info["output_node"],
                               "FUNCTION": "run"})

    runner = WorkflowRunner({name: declared(name, info) for name, info in OBJECT_INFO.items()})
    planned = {str(p.id): p for p in runner.plan(WORKFLOW, "editor fixture")}
    assert planned  # only what the output node needs, as ComfyUI executes
    for node_id, p in planned.items():
        sent = dict(p.widget_values, **{k: [str(src), slot] for k, (src, slot) in p.linked.items()})
        assert sent == PROMPT[node_id]["inputs"], p.label


# ------------------------------------------------------------------------------------------------
# Rules the fixture shows in one case, spelled out


def test_dynamic_prompts():
    first = lambda options: options[0]  # noqa: E731
    last = lambda options: options[-1]  # noqa: E731
    assert dynamic_prompt("a {red|blue} car", first) == "a red car"
    assert dynamic_prompt("a {red|blue} car", last) == "a blue car"
    assert dynamic_prompt("{a {x|y}|b}", first) == "a x"  # nested blocks choose again
    assert dynamic_prompt("keep \\{this\\} and \\| that", first) == "keep {this} and | that"
    assert dynamic_prompt("one // gone\ntwo /* gone\ntoo */three", first) == "one \ntwo three"
    assert dynamic_prompt("https://example.com", first) == "https:"  # the editor's rule, surprising as it is
    seen = {dynamic_prompt("{a|b|c}", random.Random(seed).choice) for seed in range(40)}
    assert seen == {"a", "b", "c"}


def test_seed_control_rules():
    spec_int = ("INT", {"default": 0})
    assert [s.label for s in widget_slots({"required": {"seed": spec_int, "noise_seed": spec_int, "n": spec_int}})] \
        == ["seed", CONTROL_WIDGET, "noise_seed", CONTROL_WIDGET, "n"]
    # an explicit control_after_generate wins over the name, both ways
    off = {"required": {"seed": ("INT", {"control_after_generate": False}),
                        "value": ("INT", {"control_after_generate": True})}}
    assert [s.label for s in widget_slots(off)] == ["seed", "value", CONTROL_WIDGET]
    # a combo with a control also stores its filter text; a float never gets one
    combo = {"required": {"pick": (["a", "b"], {"control_after_generate": True}), "x": ("FLOAT", {})}}
    assert [s.label for s in widget_slots(combo)] == ["pick", CONTROL_WIDGET, FILTER_WIDGET, "x"]
    assert layout_widgets(combo, {"pick": "b"}, control="randomize") == ["b", "randomize", "", 0.0]


def test_widget_kinds_and_v3_combos():
    input_types = {"required": {"image": ("IMAGE",), "forced": ("INT", {"forceInput": True}),
                                "mode": ("COMBO", {"options": ["x", "y"]}), "flag": ("BOOLEAN", {})},
                   "optional": {"text": ("STRING", {"multiline": True})}}
    assert [s.label for s in widget_slots(input_types)] == ["mode", "flag", "text"]
    assert layout_widgets(input_types, {}) == ["x", False, ""]
    assert input_sockets(input_types, ["flag"]) == [("image", "IMAGE", False), ("forced", "INT", False),
                                                     ("flag", "BOOLEAN", True)]
    with pytest.raises(KeyError, match="no widget"):
        layout_widgets(input_types, {"image": 1})


def test_unknown_bypassed_and_mismatched_nodes_are_refused():
    workflow = json.loads(json.dumps(WORKFLOW))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    nodes[EDITOR["node_ids"]["canny"]]["mode"] = 4
    nodes[EDITOR["node_ids"]["decode"]]["type"] = "NoSuchNode"
    nodes[EDITOR["node_ids"]["latent"]]["widgets_values"].pop()
    with pytest.raises(EditorRuleError) as err:
        to_api_prompt(workflow, DEFINITIONS, "broken.json")
    message = str(err.value)
    assert "(Canny): bypassed nodes are not supported" in message
    assert "unknown node type 'NoSuchNode'" in message
    assert "(WuerstchenEmptyLatent): 3 widget values for 4 widgets (width, height, compression, batch_size)" in message


def test_core_node_declarations_match_comfyui():
    """tools/comfy_core_nodes.py against the real server's /object_info (tooltips aside)."""
    def plain(input_types):
        return {section: {name: [list(spec[0]) if isinstance(spec[0], (list, tuple)) else spec[0],
                                 {k: v for k, v in (spec[1] if len(spec) > 1 else {}).items() if k != "tooltip"}]
                          for name, spec in specs.items()}
                for section, specs in input_types.items() if section != "hidden"}

    for name in core.CORE_NODE_TYPES:
        info = OBJECT_INFO[name]
        files = info["input"]["required"]["image"][0] if name == "LoadImage" else ()
        assert plain(core.input_types(name, files)) == plain(info["input"]), name
        assert [kind for _n, kind in core.outputs(name)] == info["output"], name
        assert [n for n, _k in core.outputs(name)] == info["output_name"], name
        assert core.display_name(name) == (info["display_name"] or name)
        assert core.is_output_node(name) == info["output_node"], name
