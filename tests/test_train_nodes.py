"""The training nodes as ComfyUI calls them (in inference mode, inputs as lists): train, load the LoRA
without a file, save into models/loras, plot the loss; the base models stay as they were."""

import pytest
import torch
from node_helpers import run
from train_helpers import picture_tensor, write_pictures

import nodes.train as train_nodes
from nodes import NODE_CLASS_MAPPINGS, host
from nodes.host import NodeError
from wuerstchen.lora import load_lora
from wuerstchen.files.management import ModelManager
from wuerstchen.pipeline.stages import stage_c_loras

SETTINGS = dict(steps=[12], rank=[2], learning_rate=[1e-2], batch_size=[2], grad_accumulation=[1],
                resolution=[128], seed=[0], gradient_checkpointing=[True])


@pytest.fixture(scope="module")
def env(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "wuerstchen").symlink_to(tiny_dir, target_is_directory=True)
    st = host.state()
    saved = (st.models_root, st.manager)
    host.configure(root, manager=ModelManager(device="cpu"))
    with torch.inference_mode():  # as ComfyUI loads models
        sc = run("WuerstchenStageCLoader", model_name="stage_c.safetensors", dtype="auto")[0]
        clip = run("WuerstchenCLIPTextLoader", model_name="text_encoder/model.safetensors", dtype="auto")[0]
        eff = run("WuerstchenSemanticCompressorLoader", model_name="effnet_encoder.safetensors")[0]
    yield root, sc, clip, eff
    st.models_root, st.manager = saved


def _train(env, **inputs):
    _, sc, clip, eff = env
    node = NODE_CLASS_MAPPINGS["WuerstchenTrainStageCLora"]()
    with torch.inference_mode():  # ComfyUI runs every node in inference mode
        return node.train(stage_c=[sc], clip=[clip], semantic_compressor=[eff], **{**SETTINGS, **inputs})


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_train_on_images_and_captions_then_load_without_a_file(env, monkeypatch):
    _, sc, clip, _ = env
    calls = []

    class Recorder:
        def __init__(self, total):
            self.total = total

        def __call__(self, step, total, x0=None):
            calls.append((step, total))

    monkeypatch.setattr(train_nodes, "Progress", Recorder)
    before = _state(sc.module)
    images = torch.stack([picture_tensor(i).permute(1, 2, 0) for i in range(4)])  # ComfyUI IMAGE [B, H, W, 3]
    lora, loss = _train(env, images=[images], captions=[f"a [pet] number {i}" for i in range(4)],
                        token=["[pet]:^dog</w>"])
    assert calls == [(i, 12) for i in range(1, 13)]  # the progress bar moves with every update
    assert len(loss["loss"]) == 12 and all(v > 0 for v in loss["loss"])
    for k, v in _state(sc.module).items():
        assert torch.equal(v, before[k]), k
    new_c, new_clip = run("WuerstchenLoraLoader", stage_c=sc, lora_name="(none)", strength_model=1.0,
                          strength_clip=1.0, clip=clip, lora=lora)
    assert len(new_c.loras) == 1 and new_clip.loras[0].file.embeddings[0].word == "[pet]"
    with stage_c_loras(new_c.module, new_c.loras):
        changed = [k for k, v in new_c.module.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(".attn." in k for k in changed)
    applied, applied_clip = run("WuerstchenApplyTrainedLora", stage_c=sc, lora=lora, strength_model=0.5,
                                strength_clip=1.0, clip=clip)
    assert applied.loras[0].file is lora.file and applied.loras[0].model_strength == 0.5
    assert applied_clip.loras[0].file is lora.file


def test_folder_input_save_and_plot(env, tmp_path):
    root = env[0]
    data = write_pictures(tmp_path / "set", n=3)
    lora, loss = _train(env, folder=[str(data)])
    node = NODE_CLASS_MAPPINGS["WuerstchenSaveLora"]()
    out = node.save(lora=lora, filename_prefix="my_lora")
    name = out["ui"]["text"][0]
    assert name == "my_lora_00001.safetensors"
    saved = load_lora(root / "loras" / name)
    for a, b in zip(saved.stage_c_indexed, lora.file.stage_c_indexed):
        assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
    assert saved.metadata["steps"] == "12" and saved.metadata["dataset_size"] == "3"
    assert node.save(lora=lora, filename_prefix="my_lora")["ui"]["text"][0] == "my_lora_00002.safetensors"
    with pytest.raises(NodeError, match="plain file name"):
        node.save(lora=lora, filename_prefix="../escape")
    plot = run("WuerstchenLossPlot", loss=loss, width=300, height=120)[0]
    assert plot.shape == (1, 120, 300, 3) and plot.min() < 0.5 < plot.max()


def test_comfyui_dataset_conditioning_is_used(env):
    _, sc, clip, _ = env
    cond = run("WuerstchenTextEncode", clip=clip, text="a picture")[0]
    images = torch.stack([picture_tensor(i).permute(1, 2, 0) for i in range(2)])
    lora, loss = _train(env, images=[images], conditioning=[cond + cond])
    assert len(loss["loss"]) == 12


def test_bad_inputs_are_named(env):
    with pytest.raises(NodeError, match="nothing to train on"):
        _train(env)
    with pytest.raises(NodeError, match="2 pictures but 3 captions"):
        _train(env, images=[torch.rand(2, 128, 128, 3)], captions=["a", "b", "c"])
    with pytest.raises(NodeError, match="too small"):
        _train(env, images=[torch.rand(1, 40, 40, 3)], captions=["a"])
