"""Builds a workflow with this pack's nodes in the REAL ComfyUI editor and saves what the editor writes.

Why: ``tools/editor_rules.py`` restates the editor's widget rules (which inputs are widgets, the
values stored after seed widgets and image uploads, linked widgets, virtual and muted nodes, dynamic
prompts). A test that only compares our generator with our runner would pass a rule that is wrong on
both sides, so ``tests/test_editor_rules.py`` checks the rules against files the editor itself wrote.
This script makes those files; it is a dev tool (needs a running ComfyUI and playwright with
Debian's chromium, see ../shared/tools/comfy/README.md), never run by the tests.

    python tools/save_editor_fixture.py --url http://127.0.0.1:8188 [--out tests/fixtures/editor] [--queue]

The graph is built node by node through the editor's own API (LiteGraph.createNode, connect, widget
values set by name), not loaded from one of our files, so nothing in it comes from our rules. It
writes, under --out:
  workflow.json     graphToPrompt().workflow: the UI-format JSON that the editor's Save/Export writes
  prompt.json       graphToPrompt().output: the API prompt the editor sends when queueing (Export (API))
  widgets.json      per node id, the editor's widgets in order: [name, stored in widgets_values, sent]
  object_info.json  the server's definitions of every node type used (what the editor built them from)
  editor.json       ComfyUI and frontend versions
--queue also runs the prompt (through the editor) and fails unless it succeeds, so the fixture is a
workflow that ComfyUI accepts and executes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

# Each entry: (key, node type, column, {widget: value}). Values are distinct and mostly not the
# defaults, so a widget read from the wrong slot cannot match by accident.
NODES = [
    ("stage_c", "WuerstchenStageCLoader", 0, {"model_name": "stage_c.safetensors", "dtype": "fp32"}),
    ("stage_b", "WuerstchenStageBLoader", 0, {"model_name": "stage_b_lite.safetensors", "dtype": "bf16"}),
    ("stage_a", "WuerstchenStageALoader", 0, {"model_name": "stage_a.safetensors"}),
    ("clip", "WuerstchenCLIPTextLoader", 0, {"model_name": "text_encoder/model.safetensors", "dtype": "fp32"}),
    ("cnet", "WuerstchenControlNetLoader", 0, {"model_name": "controlnet/canny.safetensors"}),
    ("previewer", "WuerstchenPreviewerLoader", 0, {"model_name": "previewer.safetensors"}),  # muted below
    ("note", "Note", 0, {"text": "A note: the editor keeps it in the workflow and never sends it."}),
    # dynamicPrompts: the editor strips // and /* */ comments, resolves {a|b} choices (one option
    # here, so the result is fixed) and unescapes \{ \}.
    ("positive", "WuerstchenTextEncode", 1, {"text": "a {penguin} in a cafe, reading // the rest of this line goes\n"
                                                     "having a coffee /* a block comment */ with \\{braces\\}"}),
    ("negative", "WuerstchenTextEncode", 1, {"text": ""}),
    ("width", "PrimitiveInt", 2, {"value": 320, "control_after_generate": "fixed"}),
    ("latent", "WuerstchenEmptyLatent", 2, {"width": 512, "height": 256, "compression": 42.67, "batch_size": 1}),
    ("image", "LoadImage", 3, {"image": "example.png"}),
    # its upload button comes after ALL required widgets, not right after the file combo
    ("mask", "LoadImageMask", 3, {"image": "example.png", "channel": "red"}),
    ("flag", "PrimitiveBoolean", 4, {"value": True}),  # unconnected: sent, never run
    ("strength", "PrimitiveFloat", 4, {"value": 0.85}),
    ("canny", "Canny", 4, {"low_threshold": 0.25, "high_threshold": 0.75}),
    ("muted", "PreviewImage", 4, {}),
    ("apply", "WuerstchenControlNetApply", 5, {"strength": 0.9, "start_percent": 0.1, "end_percent": 0.6}),
    ("sampler_c", "WuerstchenStageCSampler", 5, {"seed": 123, "control_after_generate": "fixed", "steps": 3,
                                                 "cfg": 3.5, "shift": 1.5, "sampler": "ddim", "denoise": 0.95,
                                                 "cfg_rho": 0.65}),
    ("sampler_b", "WuerstchenStageBSampler", 6, {"seed": 7, "control_after_generate": "increment", "steps": 2,
                                                 "cfg": 1.2, "shift": 1.1, "sampler": "ddpm", "width": 0,
                                                 "height": 0, "cfg_rho": 0.55}),
    ("decode", "WuerstchenStageADecode", 6, {"tile_size": 0}),
    ("save", "SaveImage", 7, {"filename_prefix": "editor_fixture"}),
]
# (source key, output name, target key, input name); a widget name as target input = a linked widget.
LINKS = [
    ("clip", "clip", "positive", "clip"),
    ("clip", "clip", "negative", "clip"),
    ("width", "INT", "latent", "width"),  # a widget fed by a real node
    ("width", "INT", "sampler_c", "seed"),  # ... a seed widget (its control value stays stored)
    ("strength", "FLOAT", "apply", "strength"),  # ... saved after every socket, optional ones too
    ("primitive", 0, "latent", "height"),  # a widget fed by the editor-only PrimitiveNode
    ("image", "IMAGE", "canny", "image"),
    ("canny", "IMAGE", "muted", "images"),  # the muted node's input: dropped from the prompt
    ("cnet", "controlnet", "apply", "controlnet"),
    ("canny", "IMAGE", "apply", "image"),
    ("stage_c", "stage_c", "sampler_c", "stage_c"),
    ("positive", "CONDITIONING", "sampler_c", "positive"),
    ("negative", "CONDITIONING", "sampler_c", "negative"),
    ("latent", "stage_c", "sampler_c", "latent"),
    ("apply", "control", "sampler_c", "control"),
    ("previewer", "previewer", "sampler_c", "previewer"),  # fed by a muted node: left out of the prompt
    ("stage_b", "stage_b", "sampler_b", "stage_b"),
    ("sampler_c", "stage_c", "sampler_b", "stage_c"),
    ("positive", "CONDITIONING", "sampler_b", "positive"),
    ("negative", "CONDITIONING", "sampler_b", "negative"),
    ("stage_a", "stage_a", "decode", "stage_a"),
    ("sampler_b", "stage_b", "decode", "latent"),
    ("decode", "IMAGE", "save", "images"),
]
PRIMITIVE_VALUE = 288  # the legacy PrimitiveNode's value (its widget appears once it is connected)

BUILD_JS = r"""
async ([nodes, links, primitiveValue]) => {
  app.graph.clear();
  const made = {};
  const rows = {};
  for (const [key, type, column, values] of nodes) {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error('no node type ' + type);
    rows[column] = rows[column] || 0;
    node.pos = [40 + column * 400, 60 + rows[column]];
    app.graph.add(node);
    for (const [name, value] of Object.entries(values)) {
      const widget = (node.widgets || []).find(w => w.name === name);
      if (!widget) throw new Error(type + ' has no widget ' + name);
      widget.value = value;
    }
    // room for what grows after creation: image previews, this pack's size read-out
    const readouts = (node.widgets || []).filter(w => w.serialize === false && !w.options?.values).length;
    rows[column] += node.size[1] + 70 + (values.image ? 300 : 0) + readouts * 130;
    made[key] = node;
  }
  made.muted.mode = LiteGraph.NEVER;  // "mute" (Ctrl+M)
  made.previewer.mode = LiteGraph.NEVER;
  made.muted.title = 'Muted preview';
  made.positive.title = 'Positive prompt';
  const primitive = LiteGraph.createNode('PrimitiveNode');
  primitive.pos = [40 + 2 * 400, 60 + rows[2]];
  app.graph.add(primitive);
  made.primitive = primitive;
  const slotOf = (list, name) => typeof name === 'number' ? name : list.findIndex(s => s.name === name);
  for (const [src, out, dst, inp] of links) {
    const a = made[src], b = made[dst];
    const o = slotOf(a.outputs, out), i = slotOf(b.inputs, inp);
    if (o < 0 || i < 0) throw new Error(`no slot ${src}.${out} -> ${dst}.${inp}`);
    if (!a.connect(o, b, i)) throw new Error(`connect failed ${src}.${out} -> ${dst}.${inp}`);
  }
  primitive.widgets[0].value = primitiveValue;
  app.graph.setDirtyCanvas(true, true);
  const p = await app.graphToPrompt();
  const widgets = {};
  for (const node of app.graph.nodes) {
    widgets[node.id] = (node.widgets || []).map(w => [w.name, w.serialize !== false, w.options?.serialize !== false]);
  }
  return {workflow: p.workflow, prompt: p.output, widgets,
          ids: Object.fromEntries(Object.entries(made).map(([k, n]) => [k, n.id]))};
}
"""


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "editor")
    parser.add_argument("--queue", action="store_true", help="also run it and require success")
    parser.add_argument("--screenshot", type=Path, help="a PNG of the built graph")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    base = args.url.rstrip("/")
    profile = tempfile.mkdtemp(prefix="chromium_profile_")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, viewport={"width": 3400, "height": 1500},
                args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-dev-shm-usage"])
            ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                (base, "data:", "blob:")) else route.abort())
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(e.message))
            page.goto(base + "/", wait_until="domcontentloaded", timeout=60000)
            page.wait_for_function("() => window.app && app.graph && app.canvas", timeout=120000)
            page.wait_for_timeout(1500)
            built = page.evaluate(BUILD_JS, [NODES, LINKS, PRIMITIVE_VALUE])
            frontend = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")
            page.wait_for_timeout(500)
            if args.screenshot:
                page.screenshot(path=str(args.screenshot))
            if args.queue:
                # a prompt identical to an earlier one is answered from ComfyUI's cache: clear it first
                urllib.request.urlopen(urllib.request.Request(
                    f"{base}/free", data=b'{"free_memory": true, "unload_models": true}',
                    headers={"Content-Type": "application/json"}), timeout=30).read()
                with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/prompt"),
                                          timeout=60000) as info:
                    page.evaluate("() => { app.queuePrompt(0, 1); }")
                body = info.value.json()
                if info.value.status != 200:
                    print(json.dumps(body, indent=2))
                    return 2
                prompt_id, t0 = body["prompt_id"], time.time()
                while time.time() - t0 < 300:
                    history = http_json(f"{base}/history/{prompt_id}").get(prompt_id)
                    status = (history or {}).get("status", {})
                    if status.get("completed") or status.get("status_str") == "error":
                        break
                    time.sleep(0.5)
                else:
                    print("timed out")
                    return 4
                print("run:", history["status"].get("status_str"), json.dumps(history.get("outputs"))[:300])
                if history["status"].get("status_str") != "success":
                    print(json.dumps(history["status"], indent=1)[:3000])
                    return 3
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)

    types = sorted({n["type"] for n in built["workflow"]["nodes"]})
    object_info = {}
    for node_type in types:
        info = http_json(f"{base}/object_info/{node_type}")
        if node_type in info:  # editor-only nodes (Note, PrimitiveNode) have none
            object_info[node_type] = info[node_type]
    system = http_json(f"{base}/system_stats")["system"]
    args.out.mkdir(parents=True, exist_ok=True)
    files = {
        "workflow.json": built["workflow"],
        "prompt.json": built["prompt"],
        "widgets.json": built["widgets"],
        "object_info.json": object_info,
        "editor.json": {"comfyui_version": system.get("comfyui_version"), "frontend_version": frontend,
                        "node_ids": built["ids"]},
    }
    for name, data in files.items():
        (args.out / name).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print("wrote", args.out / name)
    if errors:
        print("page errors:", errors[:5])
    return 0


if __name__ == "__main__":
    sys.exit(main())
