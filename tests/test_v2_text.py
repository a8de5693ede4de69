"""Würstchen v2 text side: hub tokenizer ids, and the projection-free bigG / ViT-H-14 text towers."""

import json

import pytest
import torch

from conftest import V2_DIR, load_v2
from wuerstchen.text.encoder import (V2_DECODER_TEXT_CONFIG, V2_PRIOR_TEXT_CONFIG, CLIPTextEncoder, config_from_state_dict,
                             tokenize)
from wuerstchen.files.v2_layouts import detect_v2_text

TOWERS = ["v2_clip_text_prior", "v2_clip_text_decoder"]
CASES = json.loads((V2_DIR / "v2_tokenizer_cases.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c['kind']}" for i, c in enumerate(CASES)])
def test_v2_tokenizer_gives_hub_ids(case):
    ids, mask = tokenize(case["text"], family="v2")
    assert ids[0].tolist() == case["input_ids"]
    assert mask[0].tolist() == case["attention_mask"]
    assert int(mask.sum()) == case["num_real_tokens"]
    # the Stable Cascade tokenizer (the default family) is untouched
    assert tokenize(case["text"])[0][0].tolist() == case["stable_cascade_ids"]


def test_v2_tokenizer_batches_and_rejects_unknown_family():
    ids, mask = tokenize(["Wow! What a view!!", ""], family="v2")
    assert ids.shape == mask.shape == (2, 77)
    assert ids[1, 2:].eq(49407).all() and 0 not in ids.tolist()[0]  # pad 49407, '!' is no pad id
    with pytest.raises(ValueError, match="family"):
        tokenize("a cat", family="v4")


def tower(name, **kw):
    meta, sd, io = load_v2(name)
    model = CLIPTextEncoder.from_state_dict(sd, heads=meta["config"]["num_attention_heads"], **kw)
    return meta, model, sd, io


@pytest.mark.parametrize("name", TOWERS)
def test_v2_text_tower_gives_last_hidden_state(name):
    meta, model, _, io = tower(name)
    assert model.family == "v2" and model.text_projection is None  # inferred: a tower without projection
    ids, mask = io["call0.in.input_ids"], io["call0.in.attention_mask"]
    with torch.no_grad():
        sequence, pooled = model.encode(ids, mask)
        out = model(ids, mask)
    outputs = {o["key"]: o for o in meta["calls"][0]["outputs"]}
    key = "call0.out.last_hidden_state"
    assert pooled is None and out.clip_text_pooled is None
    assert (sequence - io[key]).abs().max() <= outputs[key]["suggested_atol"]
    # Stable Cascade's choice (before the final LayerNorm) is still there, and is not what v2 uses
    key_sc = "call0.out.hidden_states_last"
    assert (out.clip_text - io[key_sc]).abs().max() <= outputs[key_sc]["suggested_atol"]
    assert (sequence - io[key_sc]).abs().max() > 1.0


@pytest.mark.parametrize("name", TOWERS)
def test_v2_text_weights_load_with_and_without_text_model_prefix(name):
    meta, model, sd, _ = tower(name)
    heads = meta["config"]["num_attention_heads"]
    bare = {k[len("text_model."):]: v for k, v in sd.items()}
    bare["embeddings.position_ids"] = torch.arange(77)[None]
    for variant in (bare, {"text_encoder." + k: v for k, v in sd.items()}):
        other = CLIPTextEncoder.from_state_dict(variant, heads=heads)
        assert other.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())


def test_projection_free_tower_still_refused_where_stable_cascade_needs_pooled():
    meta, _, sd, _ = tower("v2_clip_text_prior")
    c = meta["config"]
    heads = c["num_attention_heads"]
    with pytest.raises(KeyError, match="no text projection"):
        config_from_state_dict(sd, heads=heads)
    with pytest.raises(KeyError, match="no text projection"):
        CLIPTextEncoder.from_state_dict(sd, heads=heads, family="v3")
    config = config_from_state_dict(sd, heads=heads, require_projection=False)
    assert config == dict(width=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                          mlp_width=c["intermediate_size"], vocab_size=c["vocab_size"],
                          context_length=c["max_position_embeddings"], projection_dim=None, activation="gelu")
    detected = detect_v2_text({k: tuple(v.shape) for k, v in sd.items()}, heads=heads)
    assert {k: detected[k] for k in config} == config and detected["family"] == "v2"


def test_v2_encode_prompts_uses_v2_tokens_and_last_hidden_state():
    torch.manual_seed(0)
    model = CLIPTextEncoder(width=16, layers=2, heads=2, mlp_width=32, projection_dim=None, family="v2")
    torch.nn.init.normal_(model.positional_embedding, std=0.5)
    model.eval()
    prompts = ["Wow! a (red) fox", "snow"]
    with torch.no_grad():
        sequence, pooled = model.encode_prompts(prompts, weights=False)
        ref = model(*tokenize(prompts, family="v2")).last_hidden_state
    assert pooled is None and torch.equal(sequence, ref)
    assert model.tokenize("a!")[0][0, :4].tolist() == [49406, 320, 256, 49407]


def test_v2_tower_configs_are_the_released_towers():
    assert V2_PRIOR_TEXT_CONFIG["width"] == 1280 and V2_PRIOR_TEXT_CONFIG["projection_dim"] is None
    assert (V2_DECODER_TEXT_CONFIG["width"], V2_DECODER_TEXT_CONFIG["layers"], V2_DECODER_TEXT_CONFIG["heads"]) == \
        (1024, 24, 16)
    with torch.device("meta"):
        model = CLIPTextEncoder(**V2_DECODER_TEXT_CONFIG)
    # ViT-H-14 text tower: 354M parameters (openclip ViT-H-14 minus its projection)
    assert sum(p.numel() for p in model.parameters()) == 49408 * 1024 + 77 * 1024 + 24 * (
        4 * 1024 * 1024 + 4 * 1024 + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024) + 2 * 1024
