"""Stage C LoRAs: every file format lands on the right weights, patches are exact and undoable,
and LoRAs for other models are refused with a message that says what they are."""


import pytest
import torch
from conftest import load_manifest
from lora_helpers import (TEXT_CONFIG, assert_same, parity_stage_c, snapshot, stage_c,  # noqa: F401 (fixtures)
                          parity_text_encoder, text_encoder)

from wuerstchen.lora import (
    FORMATS,
    LoraError,
    apply_loras,
    load_lora,
    official_lora_modules,
    parse_lora,
    patched_tensors,
)
from wuerstchen.models.stage_c import StageC
from wuerstchen.files.tiny import write_tiny_lora

def expected_lowrank(base, up, down, coef, rows=None, broadcast=False):
    """Independent reference: base + coef * (up @ down), in float32, cast back."""
    out = base.float().clone()
    view = out if rows is None else out[rows[0]:rows[1]]
    product = up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)
    if broadcast and view.dim() > 2:
        product = product.reshape(view.shape[:2] + (1,) * (view.dim() - 2)).expand(view.shape)
    view += product.reshape(view.shape) * coef
    return out.to(base.dtype)


# ----------------------------------------------------------------------------------------------
# The official trainer's index -> module mapping

ATTN_BLOCKS = ["down_blocks.0.2", "down_blocks.1.2", "down_blocks.1.5", "up_blocks.0.2", "up_blocks.0.5",
               "up_blocks.1.2"]


def test_official_indices_follow_the_trainers_traversal_order(parity_stage_c):
    model, _ = parity_stage_c
    names = [n for n, _ in model.named_parameters()]
    # Recorded from the official apply_lora(filters=['.attn']) on this config: per attention block
    # the out_proj LoRA (a child module) comes before the in_proj LoRA (the MHA's own weight).
    expected = []
    for block in ATTN_BLOCKS:
        expected += [f"{block}.attention.attn.out_proj.weight", f"{block}.attention.attn.in_proj_weight"]
    assert official_lora_modules(names) == expected


def test_official_order_matches_full_size_state_dict_order():
    keys = list(load_manifest("stage_c")["keys"])
    weights = [k for k in keys if k.endswith((".weight", ".in_proj_weight"))]
    # State-dict order is the trainer's pre-order walk; only each MHA's own in_proj moves behind
    # its out_proj child.
    expected = []
    pending = None
    for key in weights:
        if key.endswith(".in_proj_weight"):
            pending = key
            continue
        expected.append(key)
        if pending and key == pending.replace(".in_proj_weight", ".out_proj.weight"):
            expected.append(pending)
            pending = None
    assert pending is None
    assert official_lora_modules(keys, ("",)) == expected
    attn = official_lora_modules(keys)
    assert len(attn) == 2 * 64  # 8 + 24 + 24 + 8 attention blocks in the 3.6B model
    assert attn[:2] == ["down_blocks.0.2.attention.attn.out_proj.weight",
                        "down_blocks.0.2.attention.attn.in_proj_weight"]
    assert attn[-1] == "up_blocks.1.23.attention.attn.in_proj_weight"


def test_official_format_patches_each_indexed_module(stage_c, tmp_path):
    path = tmp_path / "official.safetensors"
    tensors = write_tiny_lora(path, "official", stage_c, rank=3, seed=1)
    lora = load_lora(path)
    assert lora.format == "official" and lora.counts["stage_c_modules"] == 12
    before = snapshot(stage_c)
    strength = 0.6
    with apply_loras(stage_c, [(lora, strength)]) as patch:
        params = dict(stage_c.named_parameters())
        for i, block in enumerate(ATTN_BLOCKS):
            for j, target in enumerate(("attention.attn.out_proj.weight", "attention.attn.in_proj_weight")):
                n = 2 * i + j
                up, down = tensors[f"weights.{n}.lora_up"], tensors[f"weights.{n}.lora_down"]
                name = f"{block}.{target}"
                want = expected_lowrank(before[name], up, down, strength * (1 / 3))
                assert torch.equal(params[name].detach(), want), name
        assert len(patch.patched) == 12
        assert_same(stage_c, before, except_names=patch.patched)
    assert_same(stage_c, before)


def test_official_format_for_another_size_is_refused(stage_c):
    tensors = {f"weights.{i}.lora_{s}": torch.zeros(2, 32) if s == "down" else torch.zeros(32, 2)
               for i in range(8) for s in ("down", "up")}
    lora = parse_lora(tensors, name="big.safetensors")
    with pytest.raises(LoraError, match=r"8 weights, but module_filters \['\.attn'\] select 12"):
        apply_loras(stage_c, [(lora, 1.0)])


# ----------------------------------------------------------------------------------------------
# Named formats: exact deltas on the right rows


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "official"])
def test_every_delta_is_exact_and_unpatch_is_bit_identical(stage_c, tmp_path, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    write_tiny_lora(path, fmt, stage_c, rank=2, seed=3)
    lora = load_lora(path)
    assert lora.format == fmt
    assert not lora.unrecognized
    originals = {n: p.data for n, p in stage_c.named_parameters()}
    before = snapshot(stage_c)
    strength = -0.7
    patch = apply_loras(stage_c, [(lora, strength)])
    params = dict(stage_c.named_parameters())
    expected = {n: before[n].clone() for n in patch.patched}
    for d in lora.stage_c:
        expected[d.target] = expected_lowrank(expected[d.target], d.up, d.down, strength * d.scale, d.rows)
    for name in patch.patched:
        assert torch.equal(params[name].detach(), expected[name]), name
    assert patch.report[0].matched == patch.report[0].total == len(lora.stage_c)
    assert_same(stage_c, before, except_names=patch.patched)
    patch.unpatch()
    assert_same(stage_c, before)
    for name, p in stage_c.named_parameters():  # the very same tensors are back, not copies
        assert p.data_ptr() == originals[name].data_ptr()


# Hand-written key -> (parameter, rows, scale) expectations, independent of the parser's tables.
C = 32


@pytest.mark.parametrize("key_down, key_up, alpha, param, rows, scale", [
    ("lora_unet_down_blocks_1_5_attention_attn_to_k.lora_down.weight", None, 1.0,
     "down_blocks.1.5.attention.attn.in_proj_weight", (C, 2 * C), 0.5),
    ("lora_prior_unet_up_blocks_0_2_attention_attn_to_v.lora_down.weight", None, 4.0,
     "up_blocks.0.2.attention.attn.in_proj_weight", (2 * C, 3 * C), 2.0),
    ("lora_unet_up_blocks_1_2_attention_attn_out_proj.lora_down.weight", None, None,
     "up_blocks.1.2.attention.attn.out_proj.weight", None, 1.0),
    ("prior.down_blocks.0.2.attention.to_q.lora_A.weight", None, None,
     "down_blocks.0.2.attention.attn.in_proj_weight", (0, C), 1.0),
    ("transformer.up_blocks.0.5.attention.to_out.0.lora_A.default.weight", None, None,
     "up_blocks.0.5.attention.attn.out_proj.weight", None, 1.0),
    ("unet.down_blocks.1.2.attention.attn.in_proj.2.lora_down.weight", None, 2.0,  # OneTrainer OMI
     "down_blocks.1.2.attention.attn.in_proj_weight", (2 * C, 3 * C), 1.0),
    ("lora_unet_down_blocks_0_2_attention_attn_in_proj.lora_down.weight", None, None,  # fused: all rows
     "down_blocks.0.2.attention.attn.in_proj_weight", None, 1.0),
    ("lora_prior_unet_down_blocks_1_0_channelwise_4.lora_down.weight", None, 2.0,
     "down_blocks.1.0.channelwise.4.weight", None, 1.0),
    ("lora_unet_up_blocks_0_4_mapper_crp.lora_down.weight", None, None,
     "up_blocks.0.4.mapper_crp.weight", None, 1.0),
])
def test_key_spellings_land_on_the_right_rows(stage_c, key_down, key_up, alpha, param, rows, scale):
    params = dict(stage_c.named_parameters())
    shape = params[param].shape
    out = (rows[1] - rows[0]) if rows else shape[0]
    gen = torch.Generator().manual_seed(0)
    down = torch.randn(2, shape[1], generator=gen)
    up = torch.randn(out, 2, generator=gen)
    key_up = key_up or key_down.replace("lora_down", "lora_up").replace("lora_A", "lora_B")
    tensors = {key_down: down, key_up: up}
    if alpha is not None:
        tensors[key_down.split(".lora_")[0] + ".alpha"] = torch.tensor(alpha)
    lora = parse_lora(tensors, name="one.safetensors")
    assert len(lora.stage_c) == 1
    assert lora.stage_c[0].scale == scale
    base = params[param].detach().clone()
    with apply_loras(stage_c, [(lora, 0.5)]) as patch:
        assert patch.patched == [param]
        assert torch.equal(params[param].detach(), expected_lowrank(base, up, down, 0.5 * scale, rows))
    assert torch.equal(params[param].detach(), base)


@pytest.mark.parametrize("module", [
    "lora_te_text_model_encoder_layers_2_self_attn_out_proj",  # kohya
    "lora_prior_te_text_model_encoder_layers_2_self_attn_out_proj",  # OneTrainer
    "clip_g.text_model.encoder.layers.2.self_attn.out_proj",  # OneTrainer OMI
])
def test_text_key_spellings_name_hugging_face_keys(module):
    tensors = {f"{module}.lora_down.weight": torch.zeros(2, 24), f"{module}.lora_up.weight": torch.zeros(24, 2),
               "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_A.weight": torch.zeros(2, 64),
               "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_B.weight": torch.zeros(24, 2),
               "lora_te_text_projection.lora_down.weight": torch.zeros(2, 24),
               "lora_te_text_projection.lora_up.weight": torch.zeros(24, 2)}
    lora = parse_lora(tensors)
    assert sorted(d.target for d in lora.text) == ["text_model.encoder.layers.0.mlp.fc2.weight",
                                                   "text_model.encoder.layers.2.self_attn.out_proj.weight",
                                                   "text_projection.weight"]
    assert not lora.stage_c


def test_peft_alpha_from_diffusers_metadata():
    import json

    tensors = {"prior.clip_txt_mapper.lora_A.weight": torch.zeros(4, 24),
               "prior.clip_txt_mapper.lora_B.weight": torch.zeros(40, 4),
               "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 24),
               "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.zeros(64, 4)}
    metadata = {"lora_adapter_metadata": json.dumps({"prior.r": 4, "prior.lora_alpha": 8,
                                                     "text_encoder.r": 4, "text_encoder.lora_alpha": 2})}
    lora = parse_lora(tensors, metadata=metadata)
    assert [d.scale for d in lora.stage_c] == [2.0] and [d.scale for d in lora.text] == [0.5]
    assert [d.scale for d in parse_lora(tensors).stage_c] == [1.0]


def test_conv_lora_on_a_1x1_convolution(stage_c):
    gen = torch.Generator().manual_seed(5)
    down, up = torch.randn(2, 16, 1, 1, generator=gen), torch.randn(32, 2, 1, 1, generator=gen)
    lora = parse_lora({"lora_unet_embedding_1.lora_down.weight": down, "lora_unet_embedding_1.lora_up.weight": up,
                       "lora_unet_embedding_1.alpha": torch.tensor(1.0)})
    base = stage_c.embedding[1].weight.detach().clone()
    with apply_loras(stage_c, [(lora, 1.0)]):
        want = base + (up.reshape(32, 2) @ down.reshape(2, 16)).reshape(32, 16, 1, 1) * 0.5
        assert torch.equal(stage_c.embedding[1].weight.detach(), want)
    assert torch.equal(stage_c.embedding[1].weight.detach(), base)


# ----------------------------------------------------------------------------------------------
# Stacking, strength 0, dtypes, copies


def test_stacking_two_loras_adds_in_order(stage_c, tmp_path):
    write_tiny_lora(tmp_path / "a.safetensors", "kohya", stage_c, seed=1)
    write_tiny_lora(tmp_path / "b.safetensors", "diffusers", stage_c, seed=2)
    a, b = load_lora(tmp_path / "a.safetensors"), load_lora(tmp_path / "b.safetensors")
    before = snapshot(stage_c)
    with apply_loras(stage_c, [(a, 0.5), (b, -1.25)]) as patch:
        expected = {n: before[n].clone() for n in patch.patched}
        for lora, strength in ((a, 0.5), (b, -1.25)):
            for d in lora.stage_c:
                expected[d.target] = expected_lowrank(expected[d.target], d.up, d.down, strength * d.scale, d.rows)
        params = dict(stage_c.named_parameters())
        for name, want in expected.items():
            assert torch.equal(params[name].detach(), want), name
        q = "down_blocks.0.2.attention.attn.in_proj_weight"
        assert q in patch.patched and [r.matched for r in patch.report] == [len(a.stage_c), len(b.stage_c)]
    assert_same(stage_c, before)


def test_strength_zero_changes_nothing(stage_c, tmp_path):
    write_tiny_lora(tmp_path / "k.safetensors", "kohya", stage_c)
    lora = load_lora(tmp_path / "k.safetensors")
    before = snapshot(stage_c)
    with apply_loras(stage_c, [(lora, 0.0)]) as patch:
        assert patch.patched == []
        assert patch.report[0].matched == len(lora.stage_c)
        assert_same(stage_c, before)


def test_bfloat16_weights_get_float32_math_and_exact_restore(stage_c, tmp_path):
    stage_c.to(torch.bfloat16)
    write_tiny_lora(tmp_path / "o.safetensors", "onetrainer", stage_c)
    lora = load_lora(tmp_path / "o.safetensors")
    before = snapshot(stage_c)
    with apply_loras(stage_c, [(lora, 1.0)]):
        d = lora.stage_c[0]
        param = dict(stage_c.named_parameters())[d.target]
        assert param.dtype == torch.bfloat16
        others = [x for x in lora.stage_c if x.target == d.target]
        want = before[d.target]
        for x in others:
            want = expected_lowrank(want.float(), x.up, x.down, x.scale, x.rows)
        assert torch.equal(param.detach(), want.to(torch.bfloat16))
    assert_same(stage_c, before)


def test_patched_tensors_leave_the_model_alone(stage_c, tmp_path):
    write_tiny_lora(tmp_path / "d.safetensors", "diffusers", stage_c)
    lora = load_lora(tmp_path / "d.safetensors")
    before = snapshot(stage_c)
    new = patched_tensors(stage_c, [(lora, 1.0)])
    assert new and all(not torch.equal(new[n], before[n]) for n in new)
    assert_same(stage_c, before)


def test_unpatching_out_of_order_is_refused(stage_c, tmp_path):
    write_tiny_lora(tmp_path / "k.safetensors", "kohya", stage_c)
    lora = load_lora(tmp_path / "k.safetensors")
    before = snapshot(stage_c)
    first = apply_loras(stage_c, [(lora, 1.0)])
    second = apply_loras(stage_c, [(lora, 1.0)])
    with pytest.raises(LoraError, match="unpatch the most recent patch first"):
        first.unpatch()
    second.unpatch()
    first.unpatch()
    assert_same(stage_c, before)


def test_pickled_lora_files_load(stage_c, tmp_path):
    tensors = write_tiny_lora(None, "kohya", stage_c)
    torch.save(tensors, tmp_path / "k.pt")
    lora = load_lora(tmp_path / "k.pt")
    assert lora.format == "kohya" and lora.counts["stage_c_modules"] == len(tensors) // 3


# ----------------------------------------------------------------------------------------------
# Text encoder part and learned tokens


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "official"])
def test_text_encoder_lora_lands_on_fused_rows(text_encoder, stage_c, tmp_path, fmt):
    write_tiny_lora(tmp_path / "t.safetensors", fmt, stage_c, text_config=TEXT_CONFIG)
    lora = load_lora(tmp_path / "t.safetensors")
    assert lora.counts["text_modules"] == 3 * 6 + 1
    before = snapshot(text_encoder)
    with apply_loras(text_encoder, [(lora, 0.8)], part="text") as patch:
        params = dict(text_encoder.named_parameters())
        k = next(d for d in lora.text if d.target == "text_model.encoder.layers.1.self_attn.k_proj.weight")
        name = "transformer.resblocks.1.attn.in_proj_weight"
        q = next(d for d in lora.text if d.target == "text_model.encoder.layers.1.self_attn.q_proj.weight")
        v = next(d for d in lora.text if d.target == "text_model.encoder.layers.1.self_attn.v_proj.weight")
        want = before[name]
        for d, rows in ((q, (0, 24)), (k, (24, 48)), (v, (48, 72))):
            want = expected_lowrank(want, d.up, d.down, 0.8 * d.scale, rows)
        assert torch.equal(params[name].detach(), want)
        assert "text_projection.weight" in patch.patched
        if fmt == "onetrainer":
            assert text_encoder.tokenizer.added_tokens.keys() == {"tinytoken_0", "tinytoken_1"}
    assert_same(text_encoder, before)
    assert not text_encoder.tokenizer.added_tokens


def test_official_tokens_and_embedding_deltas(text_encoder, stage_c, tmp_path):
    tensors = write_tiny_lora(tmp_path / "o.safetensors", "official", stage_c, text_config=TEXT_CONFIG)
    lora = load_lora(tmp_path / "o.safetensors", token_words={49408: "[fernando]"})
    assert [e.word for e in lora.embeddings] == ["[fernando]"]
    before = snapshot(text_encoder)
    with apply_loras(text_encoder, [(lora, 1.0)], part="text") as patch:
        assert patch.patched == ["token_embedding.weight"]
        row = before["token_embedding.weight"].clone()
        row[320] += tensors["embeddings.embeddings"][0]
        assert torch.equal(text_encoder.token_embedding.weight.detach(), row)
        assert text_encoder.tokenizer.added_tokens == {"[fernando]": 49408}
        assert torch.equal(text_encoder.added_token_embedding[0], tensors["embeddings.embeddings"][1])
    assert_same(text_encoder, before)
    assert not text_encoder.tokenizer.added_tokens


# ----------------------------------------------------------------------------------------------
# Refusals


def test_sdxl_lora_is_named(stage_c):
    tensors = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 2),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8)}
    with pytest.raises(LoraError, match=r"this is an SDXL LoRA \(lora_unet_input_blocks"):
        parse_lora(tensors, name="sdxl.safetensors")


def test_stage_b_lora_is_named():
    tensors = {"lora_unet_down_blocks_2_2_attention_attn_to_q.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_2_2_attention_attn_to_q.lora_up.weight": torch.zeros(8, 2),
               "lora_unet_effnet_mapper_0.lora_down.weight": torch.zeros(2, 16, 1, 1)}
    with pytest.raises(LoraError, match="this is a Stage B LoRA"):
        parse_lora(tensors, name="stage_b.safetensors")


def test_stage_b_widths_on_stage_c_names_are_recognised(stage_c):
    tensors = {"lora_unet_down_blocks_0_0_channelwise_4.lora_down.weight": torch.zeros(2, 1280),
               "lora_unet_down_blocks_0_0_channelwise_4.lora_up.weight": torch.zeros(320, 2)}
    lora = parse_lora(tensors, name="b.safetensors")
    with pytest.raises(LoraError, match="this is a Stage B LoRA"):
        apply_loras(stage_c, [(lora, 1.0)])


def test_unknown_model_is_refused():
    with pytest.raises(LoraError, match=r"not a Stage C LoRA.*none of its 2 keys"):
        parse_lora({"foo.bar.lora_down.weight": torch.zeros(2, 3), "foo.bar.lora_up.weight": torch.zeros(3, 2)})


def test_lora_for_a_different_stage_c_size_is_refused(stage_c, parity_stage_c):
    other = dict(parity_stage_c[1], c_hidden=[48, 48], c_cond=40)
    tensors = write_tiny_lora(None, "kohya", other)
    lora = parse_lora(tensors, name="wide.safetensors")
    before = snapshot(stage_c)
    with pytest.raises(LoraError) as err:
        apply_loras(stage_c, [(lora, 1.0)])
    message = str(err.value)
    assert "wide.safetensors (kohya format)" in message
    assert f"of {len(lora.stage_c)} Stage C modules" in message
    assert "attention width 32" in message and "width 48" in message
    assert_same(stage_c, before)


def test_full_size_lora_on_lite_model_says_which_is_which():
    from wuerstchen.models.configs import STAGE_C

    # Attention-only LoRA for the 3.6B model, written from meta shapes (no weights needed).
    with torch.device("meta"):
        full, lite = StageC(**STAGE_C["full"]), StageC(**STAGE_C["lite"])
    tensors = {}
    for name in official_lora_modules([n for n, _ in full.named_parameters()])[:8]:
        module = name.rsplit(".", 1)[0] if name.endswith(".weight") else name[: -len(".in_proj_weight")] + ".in_proj"
        key = "lora_unet_" + module.replace(".", "_")
        tensors[key + ".lora_down.weight"] = torch.zeros(1, 2048)
        tensors[key + ".lora_up.weight"] = torch.zeros(2048 * (3 if name.endswith("in_proj_weight") else 1), 1)
    lora = parse_lora(tensors, name="full.safetensors")
    with pytest.raises(LoraError) as err:
        apply_loras(lite, [(lora, 1.0)])
    message = str(err.value)
    assert "0 of 8 Stage C modules match Stage C lite (1B) (attention width 1536, 32 attention blocks)" in message
    assert "It looks like a LoRA for Stage C (3.6B) (width 2048)" in message
    official_lite = parse_lora(write_tiny_lora(None, "official", lite), name="lite.safetensors")
    with pytest.raises(LoraError, match=r"64 weights is what Stage C lite \(1B\) has"):
        apply_loras(full, [(official_lite, 1.0)])


def test_partly_matching_lora_applies_what_matches_and_reports_the_rest(stage_c, caplog):
    tensors = write_tiny_lora(None, "kohya", stage_c)
    tensors["lora_unet_down_blocks_1_41_attention_attn_out_proj.lora_down.weight"] = torch.zeros(2, 32)
    tensors["lora_unet_down_blocks_1_41_attention_attn_out_proj.lora_up.weight"] = torch.zeros(32, 2)
    lora = parse_lora(tensors, name="extra.safetensors")
    with caplog.at_level("WARNING", logger="wuerstchen.lora"), apply_loras(stage_c, [(lora, 1.0)]) as patch:
        assert patch.report[0].missing == ["down_blocks.1.41.attention.attn.out_proj.weight"]
        assert patch.report[0].matched == patch.report[0].total - 1
        assert len(patch.patched) > 0
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"extra.safetensors: applied {len(lora.stage_c) - 1} of {len(lora.stage_c)} modules")
    assert "down_blocks.1.41.attention.attn.out_proj.weight" in message
    with pytest.raises(LoraError, match="name weights it does not have.*down_blocks.1.41"):
        apply_loras(stage_c, [(lora, 1.0)], strict=True)


def test_unsupported_adapter_kinds_are_refused():
    oft = {"lora_unet_down_blocks_0_2_attention_attn_out_proj.oft_blocks": torch.zeros(4, 8, 8)}
    with pytest.raises(LoraError, match="uses OFT .*lora_unet_down_blocks_0_2_attention_attn_out_proj.oft_blocks"):
        parse_lora(oft)
    # beside supported modules, an unsupported one is left out and named
    mixed = dict(oft, **{"lora_unet_clip_txt_mapper.lora_down.weight": torch.zeros(2, 24),
                         "lora_unet_clip_txt_mapper.lora_up.weight": torch.zeros(32, 2)})
    lora = parse_lora(mixed)
    assert [d.target for d in lora.stage_c] == ["clip_txt_mapper.weight"]
    assert lora.unused == [("lora_unet_down_blocks_0_2_attention_attn_out_proj.oft_blocks", "OFT is not supported")]


def test_a_module_mixing_adapter_kinds_is_refused():
    tensors = {"lora_unet_down_blocks_0_2_attention_attn_out_proj.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_down_blocks_0_2_attention_attn_out_proj.lora_up.weight": torch.zeros(32, 2),
               "lora_unet_down_blocks_0_2_attention_attn_out_proj.hada_w1_a": torch.zeros(32, 1)}
    with pytest.raises(LoraError, match="mixes LoRA and LoHa tensors"):
        parse_lora(tensors)


def test_incomplete_pair_is_refused():
    with pytest.raises(LoraError, match="has no up matrix"):
        parse_lora({"lora_unet_clip_txt_mapper.lora_down.weight": torch.zeros(2, 24)})


def test_unknown_tiny_format_is_refused(stage_c):
    with pytest.raises(ValueError, match="unknown LoRA format"):
        write_tiny_lora(None, "lycoris", stage_c)
