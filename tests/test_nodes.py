"""The ComfyUI node classes: declarations ComfyUI relies on, every node run on tiny models, clear errors.

Runs outside ComfyUI: ``nodes.host.configure`` points the pack at a temporary models root holding
the tiny release (``models/wuerstchen``) and two LoRAs made for other models (``models/loras``),
with a fresh model manager for this module.
"""

import os

import pytest
import torch
from safetensors.torch import save_file

from node_helpers import load, run
from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, host
from nodes.host import NodeError
from wuerstchen import lora as lora_lib
from wuerstchen.pipeline import control
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.files import tiny
from wuerstchen.files.management import ModelManager

SIZE = 256  # the Empty Latent's minimum: 6x6 Stage C latent, 64x64 Stage B latent
STEPS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny.write_tiny_models(root / "wuerstchen")
    loras = root / "loras"
    loras.mkdir()
    # A kohya LoRA for SDXL (its keys name SDXL's U-Net blocks), and an official-format LoRA for a
    # wider Stage C than the tiny one.
    save_file({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }, str(loras / "sdxl_kohya.safetensors"))
    tiny.write_tiny_lora(loras / "stage_c_width_48.safetensors", "official",
                         dict(tiny.STAGE_C, c_hidden=[48, 48], c_cond=48), rank=2)
    host.configure(root, manager=ModelManager())
    return root


def sample_c(stage_c, positive, negative, latent, seed=1, **extra):
    return run("WuerstchenStageCSampler", stage_c=stage_c, positive=positive, negative=negative, latent=latent,
               seed=seed, steps=STEPS, cfg=4.0, shift=2.0, sampler="ddpm", denoise=1.0, cfg_rho=0.7, **extra)[0]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def example_image(height=96, width=128):
    return torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def basics(models):
    """Stage C (fp32 file), the text encoder, both prompts and an empty 256x256 latent."""
    stage_c = load("WuerstchenStageCLoader", "stage_c.safetensors", dtype="auto")
    clip = load("WuerstchenCLIPTextLoader", "text_encoder/model.safetensors", dtype="auto")
    positive = run("WuerstchenTextEncode", clip=clip, text="a penguin reading a book")[0]
    negative = run("WuerstchenTextEncode", clip=clip, text="")[0]
    latent_c, latent_b = run("WuerstchenEmptyLatent", width=SIZE, height=SIZE, compression=42.67, batch_size=1)
    return dict(stage_c=stage_c, clip=clip, positive=positive, negative=negative, latent_c=latent_c,
                latent_b=latent_b)


# ------------------------------------------------------------------------------------------------
# Declarations


@pytest.mark.parametrize("node_type", sorted(NODE_CLASS_MAPPINGS))
def test_declarations(models, node_type):
    cls = NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    assert isinstance(spec, dict) and "required" in spec and set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and len(entry) == 2, f"{name}: (type, options) expected"
            kind, options = entry
            assert isinstance(kind, str) or (isinstance(kind, list) and kind and all(isinstance(k, str) for k in kind))
            tooltip = options.get("tooltip") if isinstance(options, dict) else None
            assert isinstance(tooltip, str) and tooltip.strip(), f"{node_type}.{name} has no tooltip"
            if "default" in options and isinstance(kind, list):
                assert options["default"] in kind
            if "default" in options and kind in ("INT", "FLOAT"):
                assert options.get("min", float("-inf")) <= options["default"] <= options.get("max", float("inf"))
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    names = getattr(cls, "RETURN_NAMES", None)
    assert names is None or (isinstance(names, tuple) and len(names) == len(cls.RETURN_TYPES))
    assert callable(getattr(cls, cls.FUNCTION, None))
    assert cls.CATEGORY.startswith("wuerstchen/")
    assert isinstance(getattr(cls, "DESCRIPTION", None), str) and cls.DESCRIPTION


def test_display_names_cover_every_node():
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert all(name.startswith("Wuerstchen ") for name in NODE_DISPLAY_NAME_MAPPINGS.values())
    assert len(set(NODE_DISPLAY_NAME_MAPPINGS.values())) == len(NODE_DISPLAY_NAME_MAPPINGS)


def test_loaders_list_the_release_names(models):
    def files(node_type, key="model_name"):
        return NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()["required"][key][0]

    assert {"stage_c.safetensors", "stage_c_bf16.safetensors", "stage_c_lite.safetensors"} <= set(
        files("WuerstchenStageCLoader"))
    assert not any("stage_b" in n and "stable_cascade" not in n for n in files("WuerstchenStageCLoader"))
    assert "text_encoder/model.safetensors" in files("WuerstchenCLIPTextLoader")
    assert "image_encoder/model.safetensors" in files("WuerstchenCLIPVisionLoader")
    assert files("WuerstchenControlNetLoader") == ["controlnet/canny.safetensors", "controlnet/inpainting.safetensors",
                                                   "controlnet/super_resolution.safetensors"]
    assert files("WuerstchenCheckpointLoader", "ckpt_name") == ["model_v2_stage_b.pt", "stable_cascade_stage_b.safetensors",
                                                                "stable_cascade_stage_c.safetensors"]
    # Würstchen v2's files in the loaders of their role (hub folders and the original .pt files)
    v2_files = {
        "WuerstchenStageCLoader": {"wuerstchen-prior/prior/diffusion_pytorch_model.safetensors", "model_v2_stage_c.pt",
                                   "model_v3_stage_c.pt", "model_v2_stage_c_finetune_interpolation.pt"},
        "WuerstchenStageBLoader": {"wuerstchen/decoder/diffusion_pytorch_model.safetensors", "model_v2_stage_b.pt"},
        "WuerstchenStageALoader": {"wuerstchen/vqgan/diffusion_pytorch_model.safetensors", "vqgan_f4_v1_500k.pt"},
        "WuerstchenSemanticCompressorLoader": {"model_v2_stage_b.pt"},
        "WuerstchenCLIPTextLoader": {"wuerstchen-prior/text_encoder/model.safetensors",
                                     "wuerstchen/text_encoder/model.safetensors"},
    }
    listed = {node: set(files(node)) for node in v2_files}
    for node, names in v2_files.items():
        assert names <= listed[node], node
        others = set().union(*(v for k, v in v2_files.items() if k != node)) - names
        assert not others & listed[node], node
    loras = NODE_CLASS_MAPPINGS["WuerstchenLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]
    assert "wuerstchen_tiny_lora.safetensors" in loras and "sdxl_kohya.safetensors" in loras


# ------------------------------------------------------------------------------------------------
# Every node on tiny models


def test_every_node_runs(models):
    ran = set()

    def call(node_type, **kwargs):
        ran.add(node_type)
        return run(node_type, **kwargs)

    image = example_image()
    stage_c = call("WuerstchenStageCLoader", model_name="stage_c_bf16.safetensors", dtype="auto")[0]
    stage_b = call("WuerstchenStageBLoader", model_name="stage_b.safetensors", dtype="auto")[0]
    stage_a = call("WuerstchenStageALoader", model_name="stage_a.safetensors")[0]
    effnet = call("WuerstchenSemanticCompressorLoader", model_name="effnet_encoder.safetensors")[0]
    previewer = call("WuerstchenPreviewerLoader", model_name="previewer.safetensors")[0]
    clip = call("WuerstchenCLIPTextLoader", model_name="text_encoder/model.safetensors", dtype="auto")[0]
    vision = call("WuerstchenCLIPVisionLoader", model_name="image_encoder/model.safetensors")[0]
    canny = call("WuerstchenControlNetLoader", model_name="controlnet/canny.safetensors")[0]
    parts = call("WuerstchenCheckpointLoader", ckpt_name="stable_cascade_stage_c.safetensors", dtype="auto")
    assert [p is None for p in parts] == [False, True, True, False, False, False, False]  # no Stage B/A inside
    lora_c, lora_clip = call("WuerstchenLoraLoader", stage_c=stage_c,
                             lora_name="wuerstchen_tiny_lora_kohya.safetensors", strength_model=1.0,
                             strength_clip=1.0, clip=clip)

    positive = call("WuerstchenTextEncode", clip=lora_clip, text="a penguin reading a book")[0]
    negative = call("WuerstchenTextEncode", clip=parts[5], text="")[0]
    assert positive[0][0].shape == (1, 77, tiny.TEXT["hidden_size"])
    assert positive[0][1]["pooled_output"].shape == (1, tiny.TEXT["projection_dim"])
    with_image = call("WuerstchenImageVariation", conditioning=positive, clip_vision=vision, image=image,
                      strength=1.0)[0]
    assert with_image[0][1]["wuerstchen_clip_img"].shape == (1, 1, tiny.VISION["projection_dim"])

    latent_c, latent_b = call("WuerstchenEmptyLatent", width=SIZE, height=SIZE, compression=42.67, batch_size=1)
    latent_size = pipeline.stage_c_latent_size(SIZE, SIZE, 42.67)
    assert latent_c["samples"].shape == (1, 16, *latent_size) and latent_b["samples"].shape == (1, 4, 64, 64)
    encoded = call("WuerstchenSemanticEncode", semantic_compressor=effnet, image=image, compression=42.67)[0]
    assert encoded["samples"].shape == (1, 16, 3, 3)
    hint = call("WuerstchenControlNetApply", controlnet=canny, image=image, strength=1.0, start_percent=0.0,
                end_percent=1.0)[0]

    sampled_c = call("WuerstchenStageCSampler", stage_c=lora_c, positive=with_image, negative=negative,
                     latent=latent_c, seed=7, steps=STEPS, cfg=4.0, shift=2.0, sampler="ddpm", denoise=1.0,
                     cfg_rho=0.7, control=hint, previewer=previewer)[0]
    assert sampled_c["samples"].shape == (1, 16, *latent_size) and torch.isfinite(sampled_c["samples"]).all()
    sampled_b = call("WuerstchenStageBSampler", stage_b=stage_b, stage_c=sampled_c, positive=positive,
                     negative=negative, seed=7, steps=STEPS, cfg=1.1, shift=1.0, sampler="ddpm", width=0, height=0,
                     cfg_rho=0.7)[0]
    assert sampled_b["samples"].shape == (1, 4, 64, 64)
    pixels = call("WuerstchenStageADecode", stage_a=stage_a, latent=sampled_b, tile_size=0)[0]
    assert pixels.shape == (1, SIZE, SIZE, 3) and torch.isfinite(pixels).all()
    reencoded = call("WuerstchenStageAEncode", stage_a=stage_a, image=pixels)[0]
    assert reencoded["samples"].shape == (1, 4, 64, 64)
    preview = call("WuerstchenPreviewDecode", previewer=previewer, latent=sampled_c)[0]
    assert preview.shape[0] == 1 and preview.shape[-1] == 3

    training = {"WuerstchenTrainStageCLora", "WuerstchenSaveLora", "WuerstchenLossPlot",
                "WuerstchenApplyTrainedLora"}  # run in test_train_nodes.py
    editing = {n for n, cls in NODE_CLASS_MAPPINGS.items() if cls.CATEGORY == "wuerstchen/editing"}
    assert ran == set(NODE_CLASS_MAPPINGS) - training - editing  # the editing nodes run in test_editing_nodes.py


def test_img2img_keeps_the_input_size(models, basics):
    effnet = load("WuerstchenSemanticCompressorLoader", "effnet_encoder.safetensors")
    encoded = run("WuerstchenSemanticEncode", semantic_compressor=effnet, image=example_image(), compression=42.67)[0]
    out = run("WuerstchenStageCSampler", stage_c=basics["stage_c"], positive=basics["positive"],
              negative=basics["negative"], latent=encoded, seed=1, steps=4, cfg=4.0, shift=2.0, sampler="ddpm",
              denoise=0.5, cfg_rho=0.7)[0]
    assert out["samples"].shape == encoded["samples"].shape
    stage_b = load("WuerstchenStageBLoader", "stage_b_bf16.safetensors", dtype="auto")
    latent_b = run("WuerstchenStageBSampler", stage_b=stage_b, stage_c=out, positive=basics["positive"],
                   negative=basics["negative"], seed=1, steps=STEPS, cfg=1.1, shift=1.0, sampler="ddpm", width=0,
                   height=0, cfg_rho=0.7)[0]
    assert latent_b["samples"].shape == (1, 4, 96 // 4, 128 // 4)


# ------------------------------------------------------------------------------------------------
# The LoRA node and the model cache


def test_manager_cache_returns_the_same_model(models):
    first = load("WuerstchenStageCLoader", "stage_c.safetensors", dtype="auto")
    again = load("WuerstchenStageCLoader", "stage_c.safetensors", dtype="auto")
    assert again.model is first.model
    fp32 = load("WuerstchenStageCLoader", "stage_c.safetensors", dtype="fp32")
    assert fp32.model is first.model  # "auto" is float32 on the CPU: the same file in the same dtype
    bf16 = load("WuerstchenStageCLoader", "stage_c.safetensors", dtype="bf16")
    assert bf16.model is not first.model and bf16.model.dtype == torch.bfloat16
    path = models / "wuerstchen" / "stage_c.safetensors"
    assert host.manager().load(path, ["stage_c"]) is first.model


def test_one_file_is_one_module_whichever_loader_asks(models):
    """The Stage C loader and the single-file checkpoint loader on one file share one module."""
    ckpt = "stable_cascade_stage_c.safetensors"
    from_ckpt = run("WuerstchenCheckpointLoader", ckpt_name=ckpt, dtype="bf16")
    stage_c = load("WuerstchenStageCLoader", ckpt, dtype="bf16")
    effnet = load("WuerstchenSemanticCompressorLoader", ckpt)
    assert stage_c.model is from_ckpt[0].model
    assert effnet.model.module is host.manager().load_parts(models / "wuerstchen" / ckpt, ["effnet"])["effnet"].module
    same_file = [m for m in host.manager().cached()
                 if m.kind == "stage_c" and m.path.name == ckpt and m.dtype == torch.bfloat16]
    assert len(same_file) == 1


def test_lora_changes_the_result_and_leaves_the_cache_untouched(models, basics):
    stage_c, clip = basics["stage_c"], basics["clip"]
    before_c, before_clip = snapshot(stage_c.module), snapshot(clip.module)
    plain = sample_c(stage_c, basics["positive"], basics["negative"], basics["latent_c"])["samples"]

    lora_c, lora_clip = run("WuerstchenLoraLoader", stage_c=stage_c, lora_name="wuerstchen_tiny_lora.safetensors",
                            strength_model=1.0, strength_clip=1.0, clip=clip)
    assert lora_c.model is stage_c.model and len(lora_c.loras) == 1 and not stage_c.loras  # a new handle
    with_lora = sample_c(lora_c, basics["positive"], basics["negative"], basics["latent_c"])["samples"]
    assert not torch.allclose(plain, with_lora)
    assert_unchanged(stage_c.module, before_c)
    assert torch.equal(sample_c(stage_c, basics["positive"], basics["negative"], basics["latent_c"])["samples"], plain)

    # A kohya LoRA with a text-encoder part changes the prompt encoding; the encoder stays as it was.
    kohya_c, kohya_clip = run("WuerstchenLoraLoader", stage_c=stage_c,
                              lora_name="wuerstchen_tiny_lora_kohya.safetensors", strength_model=1.0,
                              strength_clip=1.0, clip=clip)
    text = "a penguin reading a book"
    encoded = run("WuerstchenTextEncode", clip=kohya_clip, text=text)[0][0][0]
    assert not torch.allclose(encoded, basics["positive"][0][0])
    assert_unchanged(clip.module, before_clip)
    assert torch.equal(run("WuerstchenTextEncode", clip=clip, text=text)[0][0][0], basics["positive"][0][0])
    assert host.manager().load(models / "wuerstchen" / "stage_c.safetensors", ["stage_c"]) is stage_c.model


@pytest.mark.parametrize("lora_name,expected", [
    ("sdxl_kohya.safetensors", "probably a LoRA for another model"),
    ("stage_c_width_48.safetensors", "made for a model of width 48"),
])
def test_lora_for_another_model_is_refused(models, basics, lora_name, expected):
    stage_c = basics["stage_c"]
    before = snapshot(stage_c.module)
    with pytest.raises(NodeError) as err:
        run("WuerstchenLoraLoader", stage_c=stage_c, lora_name=lora_name, strength_model=1.0, strength_clip=1.0,
            clip=basics["clip"])
    message = str(err.value)
    assert message.startswith("WuerstchenLoraLoader: ") and lora_name in message and expected in message
    assert_unchanged(stage_c.module, before)


# ------------------------------------------------------------------------------------------------
# Clear errors


def test_stage_b_file_in_the_stage_c_loader(models):
    with pytest.raises(NodeError) as err:
        load("WuerstchenStageCLoader", "stage_b_bf16.safetensors", dtype="auto")
    message = str(err.value)
    assert "WuerstchenStageCLoader" in message and "stage_b_bf16.safetensors" in message
    assert "looks like Stage B" in message and "stage_c_bf16.safetensors" in message  # what to use instead


@pytest.mark.parametrize("name", ["../x.safetensors", "wuerstchen/../../x.safetensors", "ABSOLUTE"])
def test_paths_outside_the_model_folders_are_refused(models, name):
    if name == "ABSOLUTE":
        name = str(models / "wuerstchen" / "stage_c.safetensors")  # exists, but not by a listed name
    with pytest.raises(NodeError, match="is not a model file from the list"):
        load("WuerstchenStageCLoader", name, dtype="auto")


@pytest.mark.parametrize("side", ["positive", "negative"])
def test_empty_conditioning(models, basics, side):
    conds = {"positive": basics["positive"], "negative": basics["negative"], side: []}
    with pytest.raises(NodeError, match=f"WuerstchenStageCSampler: '{side}' is empty; wire a Wuerstchen Text Encode"):
        sample_c(basics["stage_c"], conds["positive"], conds["negative"], basics["latent_c"])


def test_stage_b_latent_in_the_stage_c_sampler(models, basics):
    expected = r"'latent' must be a Stage C latent with 16 channels, got shape \[1, 4, 64, 64\]"
    with pytest.raises(NodeError, match=expected):
        sample_c(basics["stage_c"], basics["positive"], basics["negative"], basics["latent_b"])


def test_missing_checkpoint_part_is_explained(models, basics):
    parts = run("WuerstchenCheckpointLoader", ckpt_name="stable_cascade_stage_c.safetensors", dtype="auto")
    with pytest.raises(NodeError, match="nothing arrives at 'stage_b'. The checkpoint wired there has no Stage B"):
        run("WuerstchenStageBSampler", stage_b=parts[1], stage_c=basics["latent_c"], positive=basics["positive"],
            negative=basics["negative"], seed=0, steps=STEPS, cfg=1.1, shift=1.0, sampler="ddpm", width=0, height=0,
            cfg_rho=0.7)


def test_controlnet_inputs_are_checked(models):
    image = example_image()
    common = dict(image=image, strength=1.0, start_percent=0.0, end_percent=1.0)
    inpainting = load("WuerstchenControlNetLoader", "controlnet/inpainting.safetensors")
    with pytest.raises(NodeError, match="the inpainting ControlNet needs a mask"):
        run("WuerstchenControlNetApply", controlnet=inpainting, **common)
    hint = run("WuerstchenControlNetApply", controlnet=inpainting, mask=torch.ones(1, 96, 128), **common)[0]
    assert hint.control_input.shape == (1, 4, 96, 128) and torch.equal(hint.control_input[:, :3],
                                                                       torch.ones(1, 3, 96, 128))
    super_res = load("WuerstchenControlNetLoader", "controlnet/super_resolution.safetensors")
    with pytest.raises(NodeError, match="needs the semantic compressor"):
        run("WuerstchenControlNetApply", controlnet=super_res, **common)
    canny = load("WuerstchenControlNetLoader", "controlnet/canny.safetensors")
    with pytest.raises(NodeError, match=r"WuerstchenControlNetApply: ControlNet end \(0.2\) is before start \(0.5\)"):
        run("WuerstchenControlNetApply", controlnet=canny, image=image, strength=1.0, start_percent=0.5,
            end_percent=0.2)


# ------------------------------------------------------------------------------------------------
# ControlNet on the sampling clock


def test_controlnet_range_is_a_fraction_of_the_steps(models, basics):
    """end_percent 0.5 of 20 steps at shift 2 = exactly the first 10 Stage C calls get the hint
    (on the noise level 1 - r it used to be 15)."""
    canny = load("WuerstchenControlNetLoader", "controlnet/canny.safetensors")
    hint = run("WuerstchenControlNetApply", controlnet=canny, image=example_image(), strength=1.0, start_percent=0.0,
               end_percent=0.5)[0]
    seen = []
    stage_c = basics["stage_c"]
    handle = stage_c.module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("cnet") is not None),
                                                      with_kwargs=True)
    try:
        run("WuerstchenStageCSampler", stage_c=stage_c, positive=basics["positive"], negative=basics["negative"],
            latent=basics["latent_c"], seed=1, steps=20, cfg=4.0, shift=2.0, sampler="ddpm", denoise=1.0,
            cfg_rho=0.7, control=hint)
    finally:
        handle.remove()
    assert seen == [True] * 10 + [False] * 10


def test_canny_apply_takes_edge_images_as_they_are_and_pictures_through_the_official_filter(models):
    canny = load("WuerstchenControlNetLoader", "controlnet/canny.safetensors")
    common = dict(controlnet=canny, strength=1.0, start_percent=0.0, end_percent=1.0)
    edges = torch.zeros(1, 96, 128, 3)
    edges[:, 30, 10:100] = 1.0  # what ComfyUI's Canny node outputs: 0/1, three equal channels
    hint = run("WuerstchenControlNetApply", image=edges, **common)[0]
    assert torch.equal(hint.control_input, edges[..., :1].permute(0, 3, 1, 2))
    picture = example_image()
    hint = run("WuerstchenControlNetApply", image=picture, **common)[0]
    assert torch.equal(hint.control_input, control.canny_edges(picture.permute(0, 3, 1, 2)))
