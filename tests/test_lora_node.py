"""The LoRA loader node: refuses what cannot be applied before anything runs, and says in one line
what of a file it applies and what it leaves out."""

import math

import pytest
import torch
from safetensors.torch import save_file

from nodes import NODE_CLASS_MAPPINGS, host
from nodes.host import NodeError
from wuerstchen.files import tiny
from wuerstchen.files.management import ModelManager


@pytest.fixture(scope="module")
def nodes_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny.write_tiny_models(root / "wuerstchen")
    loras = root / "loras"
    loras.mkdir()
    width = tiny.TEXT["hidden_size"]
    kohya = tiny.write_tiny_lora(None, "kohya", tiny.STAGE_C, seed=3)
    save_file(dict(kohya, **{"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
                             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)}),
              str(loras / "with_stray_keys.safetensors"))
    save_file(dict(kohya, **{"bundle_emb.bad!word.clip_g": torch.zeros(1, width)}), str(loras / "bang.safetensors"))
    save_file(dict(kohya, **{"bundle_emb.wide.clip_g": torch.zeros(1, width + 8)}), str(loras / "wide.safetensors"))
    st = host.state()
    saved = (st.models_root, st.manager)
    host.configure(root, manager=ModelManager())
    run = NODE_CLASS_MAPPINGS["WuerstchenStageCLoader"]()
    stage_c = run.load(model_name="stage_c.safetensors", dtype="auto")[0]
    clip_loader = NODE_CLASS_MAPPINGS["WuerstchenCLIPTextLoader"]()
    clip = clip_loader.load(model_name="text_encoder/model.safetensors", dtype="auto")[0]
    yield stage_c, clip
    st.models_root, st.manager = saved


def load_lora(stage_c, clip, name, strength_model=1.0, strength_clip=1.0):
    node = NODE_CLASS_MAPPINGS["WuerstchenLoraLoader"]()
    return node.load(stage_c=stage_c, lora_name=name, strength_model=strength_model, strength_clip=strength_clip,
                     clip=clip)


def test_loader_says_what_it_leaves_out(nodes_env, caplog):
    stage_c, clip = nodes_env
    with caplog.at_level("INFO", logger="wuerstchen.lora"):
        new_c, new_clip = load_lora(stage_c, clip, "with_stray_keys.safetensors")
    assert len(new_c.loras) == 1 and new_clip is not None
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("WuerstchenLoraLoader:")]
    assert len(lines) == 1 and caplog.records[-1].levelname == "WARNING"
    n = len(new_c.loras[0].file.stage_c)
    assert lines[0].startswith(f"WuerstchenLoraLoader: with_stray_keys.safetensors: applied {n} of {n} modules; "
                               "2 keys not for this model, e.g. lora_te1_text_model_encoder_layers_0_mlp_fc1")


def test_a_complete_file_is_one_info_line(nodes_env, caplog):
    stage_c, clip = nodes_env
    with caplog.at_level("INFO", logger="wuerstchen.lora"):
        load_lora(stage_c, clip, "wuerstchen_tiny_lora_onetrainer.safetensors")
    record = caplog.records[-1]
    assert record.levelname == "INFO" and "and 2 learned tokens" in record.getMessage()


@pytest.mark.parametrize("name, message", [
    ("bang.safetensors", r"learned token bundle_emb.bad!word cannot be used: .*'!'"),
    ("wide.safetensors", r"learned token 'wide' .* 32 wide but the text encoder's embeddings are 24 wide"),
])
def test_loras_whose_tokens_cannot_be_registered_are_refused(nodes_env, name, message):
    stage_c, clip = nodes_env
    before = {k: v.clone() for k, v in clip.module.state_dict().items()}
    with pytest.raises(NodeError, match=f"WuerstchenLoraLoader: .*{message}"):
        load_lora(stage_c, clip, name)
    assert all(torch.equal(v, before[k]) for k, v in clip.module.state_dict().items())
    assert clip.module.tokenizer.added_tokens == {}


@pytest.mark.parametrize("field, named", [("strength_model", "model strength"), ("strength_clip", "text strength")])
def test_non_finite_strengths_are_refused(nodes_env, field, named):
    stage_c, clip = nodes_env
    with pytest.raises(NodeError, match=f"WuerstchenLoraLoader: .*{named} must be a finite number, got nan"):
        load_lora(stage_c, clip, "wuerstchen_tiny_lora.safetensors", **{field: math.nan})
