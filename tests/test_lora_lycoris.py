"""LyCORIS and DoRA modules, full diffs and per-module alpha: the weight each one gives.

Expected weights are computed here from the textbook formulas, written out with loops and
explicit blocks instead of the library's einsum/kron, and with DoRA's norm convention as ComfyUI
applies it: one magnitude per output row divides by the norm of that row of the *original*
weight; one per input column divides by the norm of that column of the *merged* weight.
"""

import math

import pytest
import torch
from lora_helpers import assert_same, parity_stage_c, parity_text_encoder, randn, snapshot, stage_c, text_encoder  # noqa: F401

from wuerstchen.lora import LoraError, apply_loras, load_lora, parse_lora

LINEAR = ("lora_unet_clip_txt_mapper", "clip_txt_mapper.weight")  # [40, 24]
CONV3 = ("lora_unet_down_blocks_0_0_depthwise", "down_blocks.0.0.depthwise.weight")  # [32, 1, 3, 3]
WIDE = ("lora_unet_down_blocks_0_0_channelwise_0", "down_blocks.0.0.channelwise.0.weight")  # [128, 32]
TO_K = ("lora_unet_down_blocks_0_2_attention_attn_to_k", "down_blocks.0.2.attention.attn.in_proj_weight")
K_ROWS = (32, 64)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def param(model, name):
    return dict(model.named_parameters())[name].detach()


def lowrank(up, down):
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def tucker_loops(core, a, b):
    """W[p, r, k, l] = sum_ij core[i, j, k, l] a[i, p] b[j, r], one kernel position at a time."""
    out = torch.zeros(a.shape[1], b.shape[1], core.shape[2], core.shape[3])
    for k in range(core.shape[2]):
        for m in range(core.shape[3]):
            out[:, :, k, m] = a.t() @ core[:, :, k, m] @ b
    return out


def kron_blocks(w1, w2):
    """The Kronecker product assembled block by block: block (i, j) is w1[i, j] * w2."""
    o1, i1 = w1.shape[:2]
    o2, i2 = w2.shape[:2]
    out = torch.zeros((o1 * o2, i1 * i2) + tuple(w2.shape[2:]))
    for i in range(o1):
        for j in range(i1):
            out[i * o2:(i + 1) * o2, j * i2:(j + 1) * i2] = w1[i, j] * w2
    return out


def dora_expected(base, change, magnitude, strength):
    """ComfyUI's DoRA rule, written with vector norms over explicit dimensions."""
    merged = base + change
    if magnitude.shape[0] == base.shape[0]:  # one magnitude per output row: norms of the original rows
        norms = torch.stack([base[o].flatten().norm() for o in range(base.shape[0])])
        shape = (-1,) + (1,) * (base.dim() - 1)
    else:  # one per input column: norms of the merged columns
        norms = torch.stack([merged[:, i].flatten().norm() for i in range(base.shape[1])])
        shape = (1, -1) + (1,) * (base.dim() - 2)
    rescaled = merged * (magnitude.reshape(shape) / (norms.reshape(shape) + torch.finfo(torch.float32).eps))
    return rescaled if strength == 1.0 else base + strength * (rescaled - base)


def apply_one(model, tensors, strength=1.0, part="stage_c"):
    lora = parse_lora(tensors, name="t.safetensors")
    return lora, apply_loras(model, [(lora, strength)], part=part)


# ----------------------------------------------------------------------------------------------
# Each kind against its formula


@pytest.mark.parametrize("strength", [1.0, -0.6])
def test_loha_plain_and_alpha(stage_c, strength):
    g = gen(1)
    key, name = LINEAR
    f = {"hada_w1_a": randn(g, 40, 4), "hada_w1_b": randn(g, 4, 24), "hada_w2_a": randn(g, 40, 4),
         "hada_w2_b": randn(g, 4, 24)}
    tensors = {f"{key}.{k}": v for k, v in f.items()}
    tensors[f"{key}.alpha"] = torch.tensor(2.0)
    base = param(stage_c, name).clone()
    lora, patch = apply_one(stage_c, tensors, strength)
    with patch:
        diff = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        want = base + diff * (strength * 2.0 / 4)
        assert torch.allclose(param(stage_c, name), want, atol=1e-6, rtol=0)
        assert lora.kinds == {"loha": 1}
    assert torch.equal(param(stage_c, name), base)


def test_loha_tucker_on_a_3x3_convolution(stage_c):
    g = gen(2)
    key, name = CONV3
    r = 3
    f = {"hada_t1": randn(g, r, r, 3, 3), "hada_w1_a": randn(g, r, 32), "hada_w1_b": randn(g, r, 1),
         "hada_t2": randn(g, r, r, 3, 3), "hada_w2_a": randn(g, r, 32), "hada_w2_b": randn(g, r, 1)}
    tensors = {f"{key}.{k}": v for k, v in f.items()}
    base = param(stage_c, name).clone()
    with apply_one(stage_c, tensors, 0.5)[1]:
        diff = tucker_loops(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) * \
            tucker_loops(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        assert torch.allclose(param(stage_c, name), base + 0.5 * diff, atol=1e-6, rtol=0)


def test_lokr_whole_and_factored_sides(stage_c):
    g = gen(3)
    key, name = WIDE  # [128, 32] = (8 x 4) kron (16 x 8)
    w1 = randn(g, 8, 4)
    w2_a, w2_b = randn(g, 16, 2), randn(g, 2, 8)
    tensors = {f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2_a, f"{key}.lokr_w2_b": w2_b,
               f"{key}.alpha": torch.tensor(1.0)}
    base = param(stage_c, name).clone()
    with apply_one(stage_c, tensors, 0.8)[1]:
        want = base + kron_blocks(w1, w2_a @ w2_b) * (0.8 * 1.0 / 2)  # alpha / rank of the factored side
        assert torch.allclose(param(stage_c, name), want, atol=1e-6, rtol=0)


def test_lokr_without_a_factored_side_ignores_alpha_and_lands_on_q_k_v_rows(stage_c):
    g = gen(4)
    key, name = TO_K  # k rows of the fused projection: [32, 32] = (4 x 2) kron (8 x 16)
    w1, w2 = randn(g, 4, 2), randn(g, 8, 16)
    tensors = {f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2, f"{key}.alpha": torch.tensor(7.0)}
    base = param(stage_c, name).clone()
    with apply_one(stage_c, tensors)[1] as patch:
        want = base.clone()
        want[K_ROWS[0]:K_ROWS[1]] += kron_blocks(w1, w2)
        assert torch.allclose(param(stage_c, name), want, atol=1e-6, rtol=0)
        assert patch.patched == [name]


def test_lokr_tucker_w2_on_a_3x3_convolution(stage_c):
    g = gen(5)
    key, name = CONV3  # [32, 1, 3, 3] = (4 x 1) kron (8 x 1 x 3 x 3)
    w1_a, w1_b = randn(g, 4, 2), randn(g, 2, 1)
    t2, w2_a, w2_b = randn(g, 2, 2, 3, 3), randn(g, 2, 8), randn(g, 2, 1)
    tensors = {f"{key}.lokr_w1_a": w1_a, f"{key}.lokr_w1_b": w1_b, f"{key}.lokr_t2": t2,
               f"{key}.lokr_w2_a": w2_a, f"{key}.lokr_w2_b": w2_b, f"{key}.alpha": torch.tensor(4.0)}
    base = param(stage_c, name).clone()
    with apply_one(stage_c, tensors)[1]:
        w1 = (w1_a @ w1_b)[:, :, None, None]
        want = base + kron_blocks(w1, tucker_loops(t2, w2_a, w2_b)) * (4.0 / 2)
        assert torch.allclose(param(stage_c, name), want, atol=1e-6, rtol=0)


def test_locon_with_a_tucker_core(stage_c):
    g = gen(6)
    key, name = CONV3
    up, mid, down = randn(g, 32, 2, 1, 1), randn(g, 2, 2, 3, 3), randn(g, 2, 1, 1, 1)
    tensors = {f"{key}.lora_up.weight": up, f"{key}.lora_mid.weight": mid, f"{key}.lora_down.weight": down,
               f"{key}.alpha": torch.tensor(1.0)}
    base = param(stage_c, name).clone()
    with apply_one(stage_c, tensors, 1.5)[1]:
        diff = torch.zeros(32, 1, 3, 3)
        for k in range(3):
            for m in range(3):
                diff[:, :, k, m] = up[:, :, 0, 0] @ mid[:, :, k, m] @ down[:, :, 0, 0]
        assert torch.allclose(param(stage_c, name), base + diff * (1.5 * 1.0 / 2), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# DoRA


@pytest.mark.parametrize("axis", ["rows", "columns"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_dora_on_a_lora(stage_c, axis, strength):
    g = gen(7)
    key, name = LINEAR
    up, down = randn(g, 40, 3), randn(g, 3, 24)
    base = param(stage_c, name).clone()
    magnitude = (1 + randn(g, 40, 1)) if axis == "rows" else (1 + randn(g, 1, 24))
    magnitude = magnitude * (base.norm(dim=1, keepdim=True) if axis == "rows" else base.norm(dim=0, keepdim=True))
    tensors = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(1.5),
               f"{key}.dora_scale": magnitude}
    lora, patch = apply_one(stage_c, tensors, strength)
    with patch:
        want = dora_expected(base, (up @ down) * (1.5 / 3), magnitude, strength)
        assert torch.allclose(param(stage_c, name), want, atol=1e-6, rtol=0)
        assert lora.kinds == {"lora+dora": 1}
    assert torch.equal(param(stage_c, name), base)


def test_dora_on_loha_in_the_q_k_v_rows(stage_c):
    g = gen(8)
    key, name = TO_K
    f = {"hada_w1_a": randn(g, 32, 2), "hada_w1_b": randn(g, 2, 32), "hada_w2_a": randn(g, 32, 2),
         "hada_w2_b": randn(g, 2, 32)}
    magnitude = 1 + randn(g, 1, 32)
    tensors = {f"{key}.{k}": v for k, v in f.items()}
    tensors[f"{key}.dora_scale"] = magnitude
    base = param(stage_c, name).clone()
    with apply_one(stage_c, tensors, 0.5)[1]:
        rows = base[K_ROWS[0]:K_ROWS[1]]
        diff = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        want = base.clone()
        want[K_ROWS[0]:K_ROWS[1]] = dora_expected(rows, diff, magnitude, 0.5)
        assert torch.allclose(param(stage_c, name), want, atol=1e-6, rtol=0)


def test_dora_after_a_plain_lora_sees_the_already_changed_weight(stage_c):
    g = gen(9)
    key, name = LINEAR
    a_up, a_down, b_up, b_down = randn(g, 40, 2), randn(g, 2, 24), randn(g, 40, 2), randn(g, 2, 24)
    magnitude = 1 + randn(g, 1, 24)
    first = parse_lora({f"{key}.lora_up.weight": a_up, f"{key}.lora_down.weight": a_down}, name="a")
    second = parse_lora({f"{key}.lora_up.weight": b_up, f"{key}.lora_down.weight": b_down,
                         f"{key}.dora_scale": magnitude}, name="b")
    base = param(stage_c, name).clone()
    with apply_loras(stage_c, [(first, 0.5), (second, 0.9)]):
        after_first = base + 0.5 * (a_up @ a_down)
        want = dora_expected(after_first, b_up @ b_down, magnitude, 0.9)  # no alpha: scale 1
        assert torch.allclose(param(stage_c, name), want, atol=1e-6, rtol=0)


def test_dora_scale_of_a_wrong_size_is_a_shape_mismatch(stage_c):
    key, _ = LINEAR
    tensors = {f"{key}.lora_up.weight": torch.zeros(40, 2), f"{key}.lora_down.weight": torch.zeros(2, 24),
               f"{key}.dora_scale": torch.ones(1, 23)}
    before = snapshot(stage_c)
    with pytest.raises(LoraError, match=r"0 of 1 Stage C modules match.*clip_txt_mapper.weight <- lora \+ DoRA"):
        apply_one(stage_c, tensors)
    assert_same(stage_c, before)


# ----------------------------------------------------------------------------------------------
# Full diffs, ComfyUI's names, bias diffs


def test_full_diffs_of_weights_and_biases_in_comfyui_names(stage_c):
    g = gen(10)
    k_diff, k_bias = randn(g, 32, 32), randn(g, 32)
    norm_free = randn(g, 128, 32)
    tensors = {"diffusion_model.down_blocks.0.2.attention.attn.to_k.diff": k_diff,
               "diffusion_model.down_blocks.0.2.attention.attn.to_k.diff_b": k_bias,
               "diffusion_model.down_blocks.0.0.channelwise.0.diff": norm_free}
    before = snapshot(stage_c)
    lora, patch = apply_one(stage_c, tensors, 0.25)
    assert lora.format == "comfyui" and lora.kinds == {"diff": 3}
    with patch:
        weight = before["down_blocks.0.2.attention.attn.in_proj_weight"].clone()
        weight[32:64] += 0.25 * k_diff
        bias = before["down_blocks.0.2.attention.attn.in_proj_bias"].clone()
        bias[32:64] += 0.25 * k_bias
        assert torch.equal(param(stage_c, "down_blocks.0.2.attention.attn.in_proj_weight"), weight)
        assert torch.equal(param(stage_c, "down_blocks.0.2.attention.attn.in_proj_bias"), bias)
        assert torch.equal(param(stage_c, "down_blocks.0.0.channelwise.0.weight"),
                           before["down_blocks.0.0.channelwise.0.weight"] + 0.25 * norm_free)
        assert sorted(patch.patched) == ["down_blocks.0.0.channelwise.0.weight",
                                         "down_blocks.0.2.attention.attn.in_proj_bias",
                                         "down_blocks.0.2.attention.attn.in_proj_weight"]
    assert_same(stage_c, before)


def test_lycoris_files_load_from_disk_in_bfloat16(stage_c, tmp_path):
    from safetensors.torch import save_file

    g = gen(11)
    key, name = WIDE
    w1, w2 = randn(g, 8, 4), randn(g, 16, 8)
    save_file({f"{key}.lokr_w1": w1.to(torch.bfloat16), f"{key}.lokr_w2": w2.to(torch.bfloat16)},
              str(tmp_path / "k.safetensors"))
    lora = load_lora(tmp_path / "k.safetensors")
    stage_c.to(torch.bfloat16)
    base = param(stage_c, name).clone()
    with apply_loras(stage_c, [(lora, 1.0)]):
        want = (base.float() + kron_blocks(w1.to(torch.bfloat16).float(), w2.to(torch.bfloat16).float()))
        assert torch.equal(param(stage_c, name), want.to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# Text encoder


def test_loha_on_the_text_encoder_in_comfyui_extract_names(text_encoder):
    g = gen(12)
    key = "text_encoders.clip_g.transformer.text_model.encoder.layers.1.self_attn.v_proj"
    f = {"hada_w1_a": randn(g, 24, 2), "hada_w1_b": randn(g, 2, 24), "hada_w2_a": randn(g, 24, 2),
         "hada_w2_b": randn(g, 2, 24)}
    tensors = {f"{key}.{k}": v for k, v in f.items()}
    tensors["text_encoders.clip_g.transformer.text_model.final_layer_norm.diff"] = randn(g, 24)
    tensors["text_encoders.clip_g.transformer.text_model.final_layer_norm.diff_b"] = randn(g, 24)
    before = snapshot(text_encoder)
    lora, patch = apply_one(text_encoder, tensors, 0.5, part="text")
    assert lora.format == "comfyui" and len(lora.text) == 3
    with patch:
        want = before["transformer.resblocks.1.attn.in_proj_weight"].clone()
        want[48:72] += 0.5 * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        assert torch.allclose(param(text_encoder, "transformer.resblocks.1.attn.in_proj_weight"), want,
                              atol=1e-6, rtol=0)
        assert torch.equal(param(text_encoder, "ln_final.weight"), before["ln_final.weight"] +
                           0.5 * tensors["text_encoders.clip_g.transformer.text_model.final_layer_norm.diff"])
    assert_same(text_encoder, before)


# ----------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_alpha_is_refused(value):
    key, _ = LINEAR
    tensors = {f"{key}.lora_up.weight": torch.zeros(40, 2), f"{key}.lora_down.weight": torch.zeros(2, 24),
               f"{key}.alpha": torch.tensor(value)}
    with pytest.raises(LoraError, match="alpha"):
        parse_lora(tensors, name="bad.safetensors")


def test_non_finite_factors_are_refused():
    key, _ = LINEAR
    up = torch.zeros(40, 2)
    up[3, 1] = math.nan
    with pytest.raises(LoraError, match=r"bad.safetensors: lora_unet_clip_txt_mapper.lora_up.weight holds NaN"):
        parse_lora({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": torch.zeros(2, 24)},
                   name="bad.safetensors")


@pytest.mark.parametrize("strength", [math.nan, math.inf, "x"])
def test_non_finite_strength_is_refused(stage_c, strength):
    key, _ = LINEAR
    lora = parse_lora({f"{key}.lora_up.weight": torch.zeros(40, 2), f"{key}.lora_down.weight": torch.zeros(2, 24)})
    before = snapshot(stage_c)
    with pytest.raises(LoraError, match="strength"):
        apply_loras(stage_c, [(lora, strength)])
    assert_same(stage_c, before)


def test_incomplete_lycoris_modules_are_refused():
    key, _ = LINEAR
    with pytest.raises(LoraError, match="has no hada_w2_a, hada_w2_b matrices"):
        parse_lora({f"{key}.hada_w1_a": torch.zeros(40, 2), f"{key}.hada_w1_b": torch.zeros(2, 24)})
    with pytest.raises(LoraError, match="has no lokr_w2_a, lokr_w2_b matrices"):
        parse_lora({f"{key}.lokr_w1": torch.zeros(4, 4)})
    with pytest.raises(LoraError, match="dora_scale but no"):
        parse_lora({f"{key}.dora_scale": torch.ones(40, 1)})
