"""The example workflows: editor-format shape, official defaults, and a real run of each on tiny models.

Runs use the tiny random checkpoints (written once for this module under their official names), so
they prove wiring and widget mapping, not image quality. The runs use SMALL_RUN, an explicit
override for the run only (256x256 output, 3 steps per stage): the shipped 1024x1024 with 20 + 10
steps takes seconds per workflow on 2 idle cores but over a minute on a busy machine. The files keep
the official defaults, which test_official_defaults_and_files checks.
"""

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nodes import NODE_CLASS_MAPPINGS, host
from wuerstchen.files.management import ModelManager
from wuerstchen.files.tiny import write_tiny_models
from tools.editor_rules import read_widgets, widget_slots
from workflow_runner import WorkflowError, WorkflowRunner, core_nodes, load_workflow

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = ("text_to_image", "image_to_image", "image_variation", "lora", "controlnet_canny",
             "controlnet_inpainting", "super_resolution", "checkpoint_text_to_image", "wuerstchen_v2_text_to_image",
             "wuerstchen_v2_image_to_image", "train_lora", "layer_edit")
EXAMPLE_SIZE = (128, 96)  # width, height of the test's example.png
SMALL_RUN = {"WuerstchenEmptyLatent.width": 256, "WuerstchenEmptyLatent.height": 256, "steps": 3,
             "WuerstchenTrainStageCLora.resolution": 128}  # the 128x96 example picture fits a 128 bucket
PROMPT = "Cinematic photo of an anthropomorphic penguin sitting in a cafe reading a book and having a coffee"


def make_example_png(path: Path) -> None:
    """An RGBA picture with shapes (edges for Canny) and a transparent corner (the inpainting mask)."""
    w, h = EXAMPLE_SIZE
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    rgba[..., 2] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    rgba[20:60, 30:80, :3] = 255
    rgba[..., 3] = 255
    rgba[60:, 90:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    write_tiny_models(base / "models" / "wuerstchen")
    host.configure(base / "models", manager=ModelManager())
    input_dir, output_dir = base / "input", base / "output"
    input_dir.mkdir()
    make_example_png(input_dir / "example.png")
    runner = WorkflowRunner({**NODE_CLASS_MAPPINGS, **core_nodes(input_dir, output_dir)})
    return runner, output_dir


def workflow(name):
    return load_workflow(WORKFLOW_DIR / f"{name}.json")


def widgets_of(wf, node_type, title=None):
    """{input name: value} of the one node of this type (and title) in a workflow file."""
    found = [n for n in wf["nodes"] if n["type"] == node_type and (title is None or n.get("title") == title)]
    assert len(found) == 1, f"expected one {node_type} {title or ''}, found {len(found)}"
    slots = widget_slots(NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES())
    return {s.label: v for s, v in zip(slots, found[0]["widgets_values"])}


# ------------------------------------------------------------------------------------------------
# Files and format


def test_the_example_set_is_complete():
    assert sorted(p.stem for p in WORKFLOW_DIR.glob("*.json")) == sorted(WORKFLOWS)


def test_files_match_the_generator():
    spec = importlib.util.spec_from_file_location("make_workflows", REPO / "tools" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    for name, build in module.WORKFLOWS.items():
        assert (WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8") == module.render(build), (
            f"{name}.json is out of date: run python tools/make_workflows.py")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_editor_format(name):
    wf = workflow(name)
    assert wf["version"] == 0.4 and {"groups", "config", "extra"} <= set(wf)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(set(ids)) == len(ids) and wf["last_node_id"] == max(ids)
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(ids)))
    by_id = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= set(node), node["type"]
        if node["type"] != "Note":
            assert node["properties"]["Node name for S&R"] == node["type"]
        for slot, out in enumerate(node["outputs"]):
            assert out["slot_index"] == slot
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert by_id[dst]["inputs"][dst_slot]["type"] == kind == by_id[src]["outputs"][src_slot]["type"]
    # Orders are a valid execution order: every source comes before its target.
    for _id, src, _s, dst, _d, _k in wf["links"]:
        assert by_id[src]["order"] < by_id[dst]["order"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_layout_is_tidy(name):
    """No two nodes (title bar included) overlap, links run left to right, groups do not overlap."""
    wf = workflow(name)
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in wf["nodes"]}

    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    items = list(boxes.items())
    for i, (id_a, a) in enumerate(items):
        for id_b, b in items[i + 1:]:
            assert not overlap(a, b), f"nodes {id_a} and {id_b} overlap"
    for _id, src, _s, dst, _d, _k in wf["links"]:
        assert boxes[src][0] <= boxes[dst][0], f"link {src}->{dst} runs right to left"
    groups = [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
               g["bounding"][1] + g["bounding"][3]) for g in wf["groups"]]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            assert not overlap(a, b)
        inside = [n for n, box in boxes.items() if overlap(a, box)]
        assert inside, "empty group"


def test_official_defaults_and_files():
    wf = workflow("text_to_image")
    assert widgets_of(wf, "WuerstchenStageCLoader")["model_name"] == "stage_c_bf16.safetensors"
    assert widgets_of(wf, "WuerstchenStageBLoader")["model_name"] == "stage_b_bf16.safetensors"
    assert widgets_of(wf, "WuerstchenStageALoader")["model_name"] == "stage_a.safetensors"
    assert widgets_of(wf, "WuerstchenCLIPTextLoader")["model_name"] == "text_encoder/model.safetensors"
    assert widgets_of(wf, "WuerstchenPreviewerLoader")["model_name"] == "previewer.safetensors"
    assert widgets_of(wf, "WuerstchenEmptyLatent") == {"width": 1024, "height": 1024, "compression": 42.67,
                                                       "batch_size": 1}
    c = widgets_of(wf, "WuerstchenStageCSampler")
    assert (c["steps"], c["cfg"], c["shift"], c["sampler"], c["denoise"], c["cfg_rho"]) == (20, 4.0, 2.0, "ddpm",
                                                                                          1.0, 0.7)
    assert c["control_after_generate"] in ("fixed", "randomize")
    b = widgets_of(wf, "WuerstchenStageBSampler")
    assert (b["steps"], b["cfg"], b["shift"], b["sampler"], b["width"], b["height"], b["cfg_rho"]) == (
        10, 1.1, 1.0, "ddpm", 0, 0, 0.7)
    assert widgets_of(wf, "WuerstchenTextEncode", "Negative prompt (official: empty)")["text"] == ""
    assert widgets_of(wf, "WuerstchenTextEncode", "Positive prompt")["text"] == PROMPT
    previewer = next(n for n in wf["nodes"] if n["type"] == "WuerstchenPreviewerLoader")
    sampler = next(n for n in wf["nodes"] if n["type"] == "WuerstchenStageCSampler")
    assert any(link[1] == previewer["id"] and link[3] == sampler["id"] for link in wf["links"])

    assert widgets_of(workflow("image_to_image"), "WuerstchenStageCSampler")["denoise"] == 0.6
    assert widgets_of(workflow("image_variation"), "WuerstchenCLIPVisionLoader")["model_name"] == \
        "image_encoder/model.safetensors"
    assert widgets_of(workflow("lora"), "WuerstchenLoraLoader")["lora_name"] == "wuerstchen_tiny_lora.safetensors"
    for name, file in (("controlnet_canny", "canny"), ("controlnet_inpainting", "inpainting"),
                       ("super_resolution", "super_resolution")):
        loader = widgets_of(workflow(name), "WuerstchenControlNetLoader")
        assert loader["model_name"] == f"controlnet/{file}.safetensors"
    assert widgets_of(workflow("controlnet_canny"), "WuerstchenControlNetApply")["strength"] == 1.0
    ckpts = sorted(n["widgets_values"][0] for n in workflow("checkpoint_text_to_image")["nodes"]
                   if n["type"] == "WuerstchenCheckpointLoader")
    assert ckpts == ["stable_cascade_stage_b.safetensors", "stable_cascade_stage_c.safetensors"]


def test_v2_workflows_name_the_release_files_and_the_hub_recipe():
    for name in ("wuerstchen_v2_text_to_image", "wuerstchen_v2_image_to_image"):
        wf = workflow(name)
        assert widgets_of(wf, "WuerstchenStageCLoader")["model_name"] == \
            "wuerstchen-prior/prior/diffusion_pytorch_model.safetensors"
        assert widgets_of(wf, "WuerstchenStageBLoader")["model_name"] == \
            "wuerstchen/decoder/diffusion_pytorch_model.safetensors"
        assert widgets_of(wf, "WuerstchenStageALoader")["model_name"] == \
            "wuerstchen/vqgan/diffusion_pytorch_model.safetensors"
        assert widgets_of(wf, "WuerstchenCLIPTextLoader", "Prior text encoder (bigG)")["model_name"] == \
            "wuerstchen-prior/text_encoder/model.safetensors"
        assert widgets_of(wf, "WuerstchenCLIPTextLoader", "Decoder text encoder (ViT-H)")["model_name"] == \
            "wuerstchen/text_encoder/model.safetensors"
        prior = widgets_of(wf, "WuerstchenStageCSampler")
        assert (prior["steps"], prior["cfg"], prior["sampler"]) == (0, 4.0, "ddpm")  # 0: the hub's 29-step grid
        assert prior["denoise"] == (0.6 if "image_to_image" in name else 1.0)
        decoder = widgets_of(wf, "WuerstchenStageBSampler")
        assert (decoder["steps"], decoder["cfg"], decoder["width"], decoder["height"]) == (12, 0.0, 0, 0)
        # each stage's prompts come from its own tower
        by_id = {n["id"]: n for n in wf["nodes"]}
        for sampler, tower in (("WuerstchenStageCSampler", "Prior text encoder (bigG)"),
                               ("WuerstchenStageBSampler", "Decoder text encoder (ViT-H)")):
            node = next(n for n in wf["nodes"] if n["type"] == sampler)
            for socket in ("positive", "negative"):
                link = node["inputs"][[i["name"] for i in node["inputs"]].index(socket)]["link"]
                encode = by_id[next(lk[1] for lk in wf["links"] if lk[0] == link)]
                clip_link = encode["inputs"][0]["link"]
                assert by_id[next(lk[1] for lk in wf["links"] if lk[0] == clip_link)]["title"] == tower
    assert widgets_of(workflow("wuerstchen_v2_image_to_image"), "WuerstchenSemanticCompressorLoader")["model_name"] \
        == "model_v2_stage_b.pt"


def test_lora_clip_feeds_both_prompts():
    wf = workflow("lora")
    lora = next(n for n in wf["nodes"] if n["type"] == "WuerstchenLoraLoader")
    clip_slot = [o["name"] for o in lora["outputs"]].index("clip")
    encodes = {n["id"] for n in wf["nodes"] if n["type"] == "WuerstchenTextEncode"}
    fed = {link[3] for link in wf["links"] if link[1] == lora["id"] and link[2] == clip_slot}
    assert len(encodes) == 2 and fed == encodes


# ------------------------------------------------------------------------------------------------
# Running them


def _run(env, name, overrides):
    runner, output_dir = env
    result = runner.run(workflow(name), name, overrides=overrides)
    saved = [p for p in result.images if p.parent == output_dir]
    assert len(saved) == 1 and saved[0].is_file()
    with Image.open(saved[0]) as img:
        return result, img.size, np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("name,size", [
    ("text_to_image", (256, 256)),
    ("image_to_image", EXAMPLE_SIZE),  # img2img keeps the input image's size
    ("image_variation", (256, 256)),
    ("lora", (256, 256)),
    ("controlnet_canny", (256, 256)),
    ("controlnet_inpainting", (256, 256)),
    ("super_resolution", (256, 256)),
    ("checkpoint_text_to_image", (256, 256)),
    ("wuerstchen_v2_text_to_image", (256, 256)),
    ("wuerstchen_v2_image_to_image", (128, 128)),  # the 128x96 input: a 3x3 prior latent, 4 * int(3 * 10.67) = 128
    ("train_lora", (256, 256)),
    ("layer_edit", EXAMPLE_SIZE),  # an edit keeps the picture's size
])
def test_workflow_runs(env, name, size):
    result, out_size, pixels = _run(env, name, SMALL_RUN)
    assert out_size == size and pixels.std() > 0
    if name == "controlnet_canny":  # the edge preview shows edges of the example image
        runner, output_dir = env
        preview = [p for p in result.images if p.parent.name == "preview"]
        with Image.open(preview[-1]) as edges:
            assert edges.size == EXAMPLE_SIZE and 0 < np.asarray(edges).mean() < 128


# ------------------------------------------------------------------------------------------------
# The validator


def _broken(name, edit):
    wf = copy.deepcopy(workflow(name))
    edit(wf)
    return wf


def _node(wf, node_type):
    return next(n for n in wf["nodes"] if n["type"] == node_type)


def _problems(env, wf):
    runner, _out = env
    with pytest.raises(WorkflowError) as err:
        runner.plan(wf, "broken.json")
    return str(err.value)


def test_unknown_node_type_is_reported(env):
    def edit(wf):
        _node(wf, "WuerstchenStageADecode")["type"] = "StableCascadeMagicDecode"

    message = _problems(env, _broken("text_to_image", edit))
    node_id = _node(workflow("text_to_image"), "WuerstchenStageADecode")["id"]
    assert f"broken.json: node {node_id} (StableCascadeMagicDecode)" in message
    assert "unknown node type 'StableCascadeMagicDecode'" in message


@pytest.mark.parametrize("node_type,index,value,expected", [
    ("WuerstchenStageCSampler", 5, "heun", "widget 'sampler' = 'heun' is not one of the choices ('ddpm'"),
    ("WuerstchenStageCSampler", 2, -1, "widget 'steps' = -1 is below its minimum 0"),
    ("WuerstchenStageCSampler", 6, 1.5, "widget 'denoise' = 1.5 is above its maximum 1.0"),
    ("WuerstchenStageCSampler", 1, "sometimes", "control_after_generate = 'sometimes'"),
    ("WuerstchenEmptyLatent", 0, "1024", "widget 'width' = '1024' is not an integer"),
    ("WuerstchenStageCLoader", 0, "stage_c_missing.safetensors", "widget 'model_name' = 'stage_c_missing.safetensors'"),
])
def test_wrong_widget_values_are_reported(env, node_type, index, value, expected):
    def edit(wf):
        _node(wf, node_type)["widgets_values"][index] = value

    message = _problems(env, _broken("text_to_image", edit))
    assert f"({node_type})" in message and expected in message


def test_widget_count_mismatch_is_reported(env):
    def edit(wf):
        _node(wf, "WuerstchenStageCSampler")["widgets_values"].pop(1)  # a file saved without the seed control

    message = _problems(env, _broken("text_to_image", edit))
    assert "7 widget values for 8 widgets (seed, control_after_generate, steps" in message


def test_wrong_link_type_and_missing_input_are_reported(env):
    def edit(wf):
        decode = _node(wf, "WuerstchenStageADecode")
        stage_b = _node(wf, "WuerstchenStageBLoader")
        link = next(link for link in wf["links"] if link[3] == decode["id"] and link[4] == 0)
        link[1], link[2], link[5] = stage_b["id"], 0, "WUERSTCHEN_STAGE_B"
        sampler = _node(wf, "WuerstchenStageCSampler")
        sampler["inputs"][0]["link"] = None

    message = _problems(env, _broken("text_to_image", edit))
    assert "input 'stage_a' expects WUERSTCHEN_STAGE_A but is linked to WuerstchenStageBLoader output 0 " \
           "(WUERSTCHEN_STAGE_B)" in message
    assert "required input 'stage_c' (WUERSTCHEN_STAGE_C) is not connected" in message


def test_overrides_are_checked_and_apply_to_the_run_only(env):
    runner, _out = env
    wf = workflow("text_to_image")
    plan = {n.type: n for n in runner.plan(wf, "t2i", SMALL_RUN)}
    assert plan["WuerstchenEmptyLatent"].widget_values["width"] == 256
    assert plan["WuerstchenStageBSampler"].widget_values["width"] == 0  # qualified key: the latent only
    assert plan["WuerstchenStageCSampler"].widget_values["steps"] == 3
    assert widgets_of(wf, "WuerstchenEmptyLatent")["width"] == 1024
    with pytest.raises(WorkflowError, match="widget 'steps' = 0 is below its minimum 1"):
        runner.plan(wf, "t2i", {"steps": 0})


def test_load_image_mask_follows_comfyui(env, tmp_path):
    loader = core_nodes(tmp_path, tmp_path)["LoadImage"]
    make_example_png(tmp_path / "a.png")
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "b.png")
    assert loader.INPUT_TYPES()["required"]["image"][0] == ["a.png", "b.png"]
    image, mask = loader().load_image("a.png")
    assert image.shape == (1, 96, 128, 3) and mask.shape == (1, 96, 128)
    assert mask[0, 70, 100] == 1 and mask[0, 10, 10] == 0  # transparent = masked
    image, mask = loader().load_image("b.png")
    assert image.shape == (1, 30, 40, 3) and torch.equal(mask, torch.zeros(1, 64, 64))
    assert torch.allclose(image[0, 0, 0], torch.tensor([10, 20, 30]) / 255.0)


def test_a_linked_widget_keeps_its_slot_and_the_link_wins(env, tmp_path):
    """The editor keeps a converted widget's value in widgets_values; the linked value is used."""

    class IntSource:
        RETURN_TYPES = ("INT",)
        FUNCTION = "give"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 9999})}}

        def give(self, value):
            return (value,)

    runner = WorkflowRunner({**NODE_CLASS_MAPPINGS, **core_nodes(tmp_path, tmp_path), "IntSource": IntSource})
    wf = _broken("text_to_image", lambda wf: None)
    latent = _node(wf, "WuerstchenEmptyLatent")
    source_id, link_id = wf["last_node_id"] + 1, wf["last_link_id"] + 1
    wf["nodes"].append({"id": source_id, "type": "IntSource", "pos": [0, 0], "size": [200, 60], "flags": {},
                        "order": 0, "mode": 0, "inputs": [], "properties": {}, "widgets_values": [320],
                        "outputs": [{"name": "INT", "type": "INT", "links": [link_id], "slot_index": 0}]})
    latent["inputs"].append({"name": "width", "type": "INT", "widget": {"name": "width"}, "link": link_id})
    wf["links"].append([link_id, source_id, 0, latent["id"], len(latent["inputs"]) - 1, "INT"])
    latent_inputs = NODE_CLASS_MAPPINGS["WuerstchenEmptyLatent"].INPUT_TYPES()
    values, problems = read_widgets(latent_inputs, latent["widgets_values"])
    assert values["width"] == 1024 and not problems  # still stored in its slot: the other slots keep theirs
    plan = {n.type: n for n in runner.plan(wf, "linked.json")}
    assert "width" not in plan["WuerstchenEmptyLatent"].widget_values  # the link replaces it
    assert plan["WuerstchenEmptyLatent"].linked["width"] == (source_id, 0)
    assert plan["WuerstchenEmptyLatent"].widget_values["height"] == 1024
    result = runner.run(wf, "linked.json", overrides={"WuerstchenEmptyLatent.height": 256, "steps": 1})
    assert result.outputs[latent["id"]][0]["samples"].shape[-2:] == (6, 8)  # 256 x 320 at compression 42.67
