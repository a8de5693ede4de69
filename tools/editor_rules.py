"""The ComfyUI editor's rules for saved workflows, written once.

Why one module: ``tools/make_workflows.py`` writes workflows the editor must read back exactly, and
``tests/workflow_runner.py`` reads them the way the editor and server would; if each kept its own
copy of these rules, a wrong rule could agree with itself on both sides. Both import this module,
and ``tests/test_editor_rules.py`` checks it against files the real editor saved
(``tests/fixtures/editor``, made by ``tools/save_editor_fixture.py``; ComfyUI 0.3.64, frontend
1.27.10). Plain Python: no ComfyUI, no torch.

The rules, as the editor applies them:
- Widgets: INT, FLOAT, STRING, BOOLEAN and combos (a list of choices, or "COMBO" with ``options``)
  are widgets unless ``forceInput``; every other type is a socket. ``widgets_values`` holds one
  value per widget in declaration order (required, then optional).
- Editor-only values in ``widgets_values``, never sent to the server: the control choice after an
  INT widget with ``control_after_generate`` (or, when that option is absent, named seed /
  noise_seed); after a combo with ``control_after_generate``, the control and its filter text; and
  for the first required combo with ``image_upload`` / ``video_upload`` / ``animated_image_upload``,
  the upload button's value ("image"), placed after ALL required widgets.
- Sockets are saved in ``inputs`` in declaration order; a widget fed by a link is saved after every
  socket (with ``"widget": {"name": ...}``) and keeps its stored value; the link wins when sent.
- Sent prompt (the API format): one entry per node, except editor-only nodes (Note, MarkdownNote,
  PrimitiveNode, Reroute) and muted ones; a widget fed by a PrimitiveNode gets the primitive's value,
  an input fed by a muted node is left out, and STRING widgets with ``dynamicPrompts`` are sent with
  comments removed and {a|b} choices made.
The fixture shows each of these except the ones read from the frontend's source alone: combo
controls and their filter text, video/animated upload flags, forceInput, "COMBO" specs, Reroute.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_WIDGET_NAMES = ("seed", "noise_seed")  # INT widgets that get a control without asking
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
COMBO_CONTROL_VALUES = CONTROL_VALUES + ("increment-wrap",)
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
UPLOAD_WIDGET, UPLOAD_VALUE = "upload", "image"
CONTROL_WIDGET, FILTER_WIDGET = "control_after_generate", "control_filter_list"
PRIMITIVE_NODE, REROUTE_NODE = "PrimitiveNode", "Reroute"
EDITOR_ONLY_NODES = ("Note", "MarkdownNote", PRIMITIVE_NODE, REROUTE_NODE)  # never sent to the server
MODE_ALWAYS, MODE_MUTED, MODE_BYPASS = 0, 2, 4  # LiteGraph's ALWAYS, NEVER ("mute") and BYPASS


class EditorRuleError(ValueError):
    """A workflow this module cannot translate the way the editor would."""


# ------------------------------------------------------------------------------------------------
# Input specs: ("INT", {...}), (["a", "b"], {...}), ("COMBO", {"options": [...]}), ("IMAGE",)


def options(spec: Sequence) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def choices(spec: Sequence) -> Optional[list]:
    """The choices of a combo input, or None when the input is not a combo."""
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        return list(kind)
    if kind == "COMBO":
        return list(options(spec).get("options", []))
    return None


def is_widget(spec: Sequence) -> bool:
    if options(spec).get("forceInput"):
        return False
    return choices(spec) is not None or spec[0] in WIDGET_TYPES


def widget_type(spec: Sequence) -> str:
    return "COMBO" if choices(spec) is not None else spec[0]


def default_value(spec: Sequence) -> Any:
    """The value a new node's widget starts with."""
    opts = options(spec)
    if "default" in opts:
        return opts["default"]
    listed = choices(spec)
    if listed is not None:
        return listed[0] if listed else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]


def has_control(name: str, spec: Sequence) -> bool:
    """Whether the editor adds a "control after generate" widget after this one."""
    kind, flag = widget_type(spec), options(spec).get("control_after_generate")
    if kind == "INT":
        return bool(flag) if flag is not None else name in SEED_WIDGET_NAMES
    return kind == "COMBO" and bool(flag)


# ------------------------------------------------------------------------------------------------
# widgets_values


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of ``widgets_values``: input ``name``'s own value, or an editor-only value
    (``editor_only``: control_after_generate, control_filter_list or upload; ``name`` None, ``spec``
    the input it follows)."""

    name: Optional[str]
    spec: Sequence
    editor_only: str = ""

    @property
    def label(self) -> str:
        return self.editor_only or self.name


def widget_slots(input_types: Mapping) -> List[WidgetSlot]:
    """What ``widgets_values`` holds for a node with these INPUT_TYPES, in order."""
    slots: List[WidgetSlot] = []
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            if not is_widget(spec):
                continue
            slots.append(WidgetSlot(name, spec))
            if has_control(name, spec):
                slots.append(WidgetSlot(None, spec, CONTROL_WIDGET))
                if widget_type(spec) == "COMBO":
                    slots.append(WidgetSlot(None, spec, FILTER_WIDGET))
        if section == "required":
            upload = _upload_slot(input_types.get("required") or {})
            if upload:  # the editor adds the upload button as one more required input, i.e. last
                slots.append(upload)
    return slots


def _upload_slot(required: Mapping) -> Optional[WidgetSlot]:
    """The upload button of the first required combo asking for one, as the editor finds it."""
    for spec in required.values():
        if widget_type(spec) == "COMBO" and any(options(spec).get(flag) is True for flag in UPLOAD_FLAGS):
            return WidgetSlot(None, spec, UPLOAD_WIDGET)
    return None


def layout_widgets(input_types: Mapping, values: Mapping[str, Any], control: str = "fixed") -> list:
    """``widgets_values`` for a node: the given values by input name, defaults for the rest.

    ``control`` is stored after seed-like widgets. Raises on a name that is not a widget."""
    slots = widget_slots(input_types)
    unknown = set(values) - {s.name for s in slots if not s.editor_only}
    if unknown:
        raise KeyError(f"no widget(s) {sorted(unknown)}; widgets: {[s.name for s in slots if not s.editor_only]}")
    stored = []
    for slot in slots:
        if slot.editor_only == CONTROL_WIDGET:
            stored.append(control)
        elif slot.editor_only == FILTER_WIDGET:
            stored.append("")
        elif slot.editor_only == UPLOAD_WIDGET:
            stored.append(UPLOAD_VALUE)
        else:
            stored.append(values[slot.name] if slot.name in values else default_value(slot.spec))
    return stored


def read_widgets(input_types: Mapping, stored: Optional[Sequence]) -> Tuple[Dict[str, Any], List[str]]:
    """({input name: stored value}, problems) for a node's ``widgets_values``.

    Editor-only values are checked, not returned. A count that does not match the node's widgets
    is one problem (and no values): the file was saved for other inputs."""
    slots = widget_slots(input_types)
    stored = list(stored or [])
    if len(stored) != len(slots):
        return {}, [f"{len(stored)} widget values for {len(slots)} widgets "
                    f"({', '.join(s.label for s in slots) or 'none'}); the file does not match this node's inputs"]
    values: Dict[str, Any] = {}
    problems: List[str] = []
    for slot, value in zip(slots, stored):
        if slot.editor_only == CONTROL_WIDGET:
            allowed = COMBO_CONTROL_VALUES if widget_type(slot.spec) == "COMBO" else CONTROL_VALUES
            if value not in allowed:
                problems.append(f"control_after_generate = {value!r} is not one of {allowed}")
        elif not slot.editor_only:
            values[slot.name] = value
    return values, problems


def input_sockets(input_types: Mapping, linked_widgets: Sequence[str] = ()) -> List[Tuple[str, Any, bool]]:
    """The node's saved ``inputs``: (name, type, is a widget), sockets first, then the linked widgets."""
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            if not is_widget(spec):
                sockets.append((name, spec[0], False))
            elif name in linked_widgets:
                widgets.append((name, widget_type(spec), True))
    return sockets + widgets


# ------------------------------------------------------------------------------------------------
# Dynamic prompts (STRING widgets declared with dynamicPrompts)

_COMMENT = re.compile(r"/\*[\s\S]*?\*/|//.*")
_ESCAPED = re.compile(r"\\([{}|])")


def dynamic_prompt(text: str, choose: Callable[[list], str] = random.choice) -> str:
    """The text the editor sends for a dynamicPrompts widget: comments (// to the end of the line,
    /* ... */) removed, each {a|b|c} replaced by one choice (``choose``; nested blocks allowed),
    and \\{ \\} \\| unescaped."""
    text = _COMMENT.sub("", text)
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            out.append(text[i:i + 2])
            i += 2
        elif char == "{":
            options_, i = _choice_block(text, i + 1)
            out.append(dynamic_prompt(choose(options_), choose))
        else:
            out.append(char)
            i += 1
    return _ESCAPED.sub(r"\1", "".join(out))


def _choice_block(text: str, i: int) -> Tuple[List[str], int]:
    found, current, depth = [], "", 0
    while i < len(text):
        char = text[i]
        i += 1
        if char == "\\":
            current += text[i - 1:i + 1]
            i += 1
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            if not depth:
                break
            depth -= 1
        elif char == "|" and not depth:
            found.append(current)
            current = ""
            continue
        current += char
    found.append(current)
    return found, i


# ------------------------------------------------------------------------------------------------
# UI format -> API format (what the editor sends when queueing)


@dataclass(frozen=True)
class NodeDefinition:
    input_types: Mapping
    display_name: str


def definitions_from_object_info(object_info: Mapping) -> Dict[str, NodeDefinition]:
    """Node definitions as the server's /object_info lists them."""
    return {name: NodeDefinition(info["input"], info.get("display_name") or name) for name, info in object_info.items()}


def definitions_from_classes(classes: Mapping[str, type],
                             display_names: Mapping[str, str] = ()) -> Dict[str, NodeDefinition]:
    """Node definitions from node classes (INPUT_TYPES) and ComfyUI's display-name table."""
    display_names = dict(display_names)
    return {name: NodeDefinition(cls.INPUT_TYPES(), display_names.get(name, name)) for name, cls in classes.items()}


def link_table(workflow: Mapping) -> Dict[int, Tuple[int, int, int, int, Any]]:
    """link id -> (source node, output slot, target node, input slot, type)."""
    table = {}
    for link in workflow.get("links") or []:
        link_id, src, src_slot, dst, dst_slot, kind = link[:6]
        table[int(link_id)] = (int(src), int(src_slot), int(dst), int(dst_slot), kind)
    return table


def node_label(node: Mapping, workflow_name: str = "workflow") -> str:
    """How errors name a node: ``name: node 9 (Type 'title')``."""
    title = f" '{node['title']}'" if node.get("title") else ""
    return f"{workflow_name}: node {node.get('id')} ({node.get('type')}{title})"


def is_sent(node: Mapping) -> bool:
    """Whether the editor sends this node (editor-only and muted nodes stay behind; a bypassed
    node is rewired around, which this module refuses: see sent_inputs)."""
    return node.get("type") not in EDITOR_ONLY_NODES and node.get("mode", MODE_ALWAYS) not in (MODE_MUTED, MODE_BYPASS)


class _Dropped:
    """A linked input the editor leaves out of the prompt."""


DROPPED = _Dropped()


def resolve_link(nodes: Mapping[int, Mapping], links: Mapping[int, tuple], link_id) -> Any:
    """What a linked input is sent as: [source id, output slot], the value of the PrimitiveNode
    feeding it, or DROPPED (the source is muted, missing, or editor-only with nothing behind it).
    A Reroute node is followed to its own source."""
    seen = set()
    while link_id is not None and int(link_id) in links and int(link_id) not in seen:
        seen.add(int(link_id))
        src, src_slot = links[int(link_id)][:2]
        source = nodes.get(src)
        if source is None:
            break
        if source.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            raise EditorRuleError(f"{node_label(source)} is bypassed; rewiring around bypassed nodes is not supported")
        if source.get("type") == PRIMITIVE_NODE:
            values = source.get("widgets_values") or []
            return values[0] if values else DROPPED
        if source.get("type") == REROUTE_NODE:
            link_id = ((source.get("inputs") or [{}])[0]).get("link")
            continue
        if is_sent(source):
            return [str(src), src_slot]
        break
    return DROPPED


def sent_inputs(node: Mapping, input_types: Mapping, nodes: Mapping[int, Mapping], links: Mapping[int, tuple],
                choose: Callable[[list], str] = random.choice) -> Tuple[Dict[str, Any], List[str]]:
    """(the node's ``inputs`` as the editor sends them, problems).

    Widget values first (dynamic prompts made, lists wrapped as {"__value__": [...]}), then each
    linked input as [source id, slot]: a link replaces a widget's value; an input whose link is
    dropped is left out, its widget value too."""
    if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
        return {}, ["bypassed nodes are not supported (the editor rewires around them)"]
    values, problems = read_widgets(input_types, node.get("widgets_values"))
    declared = {**(input_types.get("required") or {}), **(input_types.get("optional") or {})}
    inputs: Dict[str, Any] = {}
    for name, value in values.items():
        spec = declared[name]
        if widget_type(spec) == "STRING" and options(spec).get("dynamicPrompts") and isinstance(value, str):
            value = dynamic_prompt(value, choose)
        inputs[name] = {"__value__": value} if isinstance(value, list) else value
    for inp in node.get("inputs") or []:
        if inp.get("link") is None:
            continue
        try:
            sent = resolve_link(nodes, links, inp["link"])
        except EditorRuleError as err:
            problems.append(f"input {inp.get('name')!r}: {err}")
            continue
        if sent is DROPPED:
            inputs.pop(inp.get("name"), None)
        else:
            inputs[inp.get("name")] = sent
    return inputs, problems


def to_api_prompt(workflow: Mapping, definitions: Mapping[str, NodeDefinition], name: str = "workflow",
                  choose: Callable[[list], str] = random.choice) -> Dict[str, dict]:
    """The API prompt the editor builds from a UI-format workflow (``app.graphToPrompt().output``).

    Raises EditorRuleError listing every node whose type is unknown, whose widget values do not fit
    its definition, or that is bypassed."""
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = link_table(workflow)
    prompt: Dict[str, dict] = {}
    problems: List[str] = []
    for node_id, node in nodes.items():
        if node.get("type") in EDITOR_ONLY_NODES or node.get("mode", MODE_ALWAYS) == MODE_MUTED:
            continue
        definition = definitions.get(node.get("type"))
        if definition is None:
            problems.append(f"{node_label(node, name)}: unknown node type {node.get('type')!r}")
            continue
        inputs, node_problems = sent_inputs(node, definition.input_types, nodes, links, choose)
        problems += [f"{node_label(node, name)}: {p}" for p in node_problems]
        prompt[str(node_id)] = {"inputs": inputs, "class_type": node["type"],
                                "_meta": {"title": node.get("title") or definition.display_name}}
    if problems:
        raise EditorRuleError("\n".join(problems))
    return prompt
