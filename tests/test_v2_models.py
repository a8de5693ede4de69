"""Würstchen v2 networks against the reference vectors: prior, decoder, v2 EfficientNet, VQGAN (both APIs)."""

import pytest
import torch

from conftest import call_kwargs, load_manifest, load_v2
from wuerstchen.models import EfficientNetEncoder, StageA, WuerstchenDiffNeXt, WuerstchenPrior
from wuerstchen.models.effnet import v2_effnet_to_raw
from wuerstchen.models.stage_a import stage_a_config_from_diffusers
from wuerstchen.models.wuerstchen_v2 import fuse_attention_keys, split_attention_keys

NETWORKS = {"v2_prior": WuerstchenPrior, "v2_decoder": WuerstchenDiffNeXt}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def to_original_keys(sd):
    """The inverse key map of v2_original_keymap.json, written out here independently of the library."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".attention.to_q.weight") or k.endswith(".attention.to_q.bias")]:
        head, kind = key[: -len("to_q.weight")] if key.endswith("weight") else key[: -len("to_q.bias")], \
            key.rsplit(".", 1)[1]
        out[f"{head}attn.in_proj_{kind}"] = torch.cat([out.pop(f"{head}to_{n}.{kind}") for n in "qkv"])
    for key in [k for k in out if ".attention.to_out.0." in k]:
        out[key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = out.pop(key)
    return out


def loaded(name, weights=None, original=False):
    meta, sd, io = load_v2(name)
    model = NETWORKS[name](**meta["config"])
    sd = weights if weights is not None else sd
    model.load_state_dict(to_original_keys(sd) if original else sd, strict=True)
    return meta, model.eval(), io


@pytest.mark.parametrize("original", [False, True], ids=["diffusers_keys", "original_keys"])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_matches_reference_in_both_key_spellings(name, original):
    meta, model, io = loaded(name, original=original)
    with torch.no_grad():
        for call in meta["calls"]:
            out = model(**call_kwargs(call, io))
            outs = list(out) if isinstance(out, tuple) else [out]
            assert len(outs) == len(call["outputs"])
            for ours, spec in zip(outs, call["outputs"]):
                assert list(ours.shape) == spec["shape"]
                assert max_err(ours, io[spec["key"]]) <= spec["suggested_atol"], (call["id"], spec["key"])


def test_both_spellings_give_identical_parameters():
    _, diffusers_model, _ = loaded("v2_decoder")
    _, original_model, _ = loaded("v2_decoder", original=True)
    a, b = diffusers_model.state_dict(), original_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("attention.attn.in_proj_weight") for k in a)  # the native layout is the packed one


def test_split_and_fuse_are_inverse():
    _, sd, _ = load_v2("v2_prior")
    packed = dict(sd)
    fuse_attention_keys(packed)
    assert packed.keys() == to_original_keys(sd).keys()
    back = split_attention_keys(packed)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_incomplete_qkv_triple_fails_strict_load_naming_the_keys():
    meta, sd, _ = load_v2("v2_prior")
    sd = {k: v for k, v in sd.items() if k != "blocks.2.attention.to_v.weight"}
    with pytest.raises(RuntimeError, match=r"blocks\.2\.attention\.attn\.in_proj_weight"):
        WuerstchenPrior(**meta["config"]).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("diffusers_name, original_name, cls", [
    ("wuerstchen_v2_prior", "wuerstchen_v2_original_stage_c", WuerstchenPrior),
    ("wuerstchen_v2_decoder", "wuerstchen_v2_original_stage_b", WuerstchenDiffNeXt),
])
def test_full_size_layouts_on_meta(diffusers_name, original_name, cls):
    diffusers, original = load_manifest(diffusers_name), load_manifest(original_name)
    with torch.device("meta"):
        model = cls(**original["config"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: shape for k, (shape, _) in original["keys"].items()}
    assert {k: list(v.shape) for k, v in split_attention_keys(model.state_dict()).items()} == \
        {k: shape for k, (shape, _) in diffusers["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == diffusers["num_parameters"]
    for manifest in (diffusers, original):
        state = {k: torch.empty(shape, device="meta") for k, (shape, _) in manifest["keys"].items()}
        model.load_state_dict(state, strict=True, assign=True)


def test_decoder_rejects_sizes_it_cannot_take():
    meta, model, io = loaded("v2_decoder")
    call = call_kwargs(meta["calls"][0], io)
    half = model.size_multiple // 2
    with pytest.raises(ValueError, match=f"must be a multiple of {model.size_multiple}"):
        model(call["x"][..., :half, :half], call["r"], call["effnet"], call["clip"])


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_low_precision_and_fp16_guard(name):
    meta, model, io = loaded(name)
    args = call_kwargs(meta["calls"][0], io)
    with torch.no_grad():
        ref = model(**args)
        bf16 = model.to(torch.bfloat16)(**args)
        assert bf16.dtype == torch.bfloat16
        assert max_err(bf16, ref) < 0.1 * ref.abs().max().item()
        half = model.to(torch.float16)
        half.fp16_guard = True
        guarded = half(**args)
    assert guarded.dtype == torch.float16
    assert max_err(guarded, ref) < 0.02 * ref.abs().max().item()


# ---------------------------------------------------------------- v2 EfficientNet


def v2_effnet():
    meta, sd, io = load_v2("v2_effnet_encoder")
    model = EfficientNetEncoder(**meta["config"], backbone_setting=meta["backbone_setting"], family="v2")
    model.load_state_dict(sd, strict=True)
    return meta, model.eval(), sd, io


def test_v2_effnet_matches_reference():
    meta, model, _, io = v2_effnet()
    (call,) = meta["calls"]
    with torch.no_grad():
        out = model(**call_kwargs(call, io))
    spec = call["outputs"][0]
    assert max_err(out, io[spec["key"]]) <= spec["suggested_atol"]


def test_v2_effnet_is_stable_cascade_encoder_plus_affine_and_rescale():
    meta, model, sd, io = v2_effnet()
    sc = EfficientNetEncoder(**meta["config"], backbone_setting=meta["backbone_setting"])
    sc.load_state_dict({k: v for k, v in sd.items() if k not in ("mapper.1.weight", "mapper.1.bias")}, strict=True)
    with pytest.raises(RuntimeError, match="mapper.1.weight"):  # Stable Cascade's mapper has no affine
        sc.load_state_dict(sd, strict=True)
    x = io["call0.in.x"]
    with torch.no_grad():
        y = sc.eval()(x) * sd["mapper.1.weight"].view(1, -1, 1, 1) + sd["mapper.1.bias"].view(1, -1, 1, 1)
        ours = model(x)
    assert max_err(ours, (y + 1) / 42) < 1e-7
    assert max_err(v2_effnet_to_raw(ours), y) < 5e-6


def test_v2_effnet_full_size_layout():
    manifest = load_manifest("wuerstchen_v2_original_stage_b")["extra_state_dicts"]["effnet_state_dict"]
    with torch.device("meta"):
        model = EfficientNetEncoder(family="v2")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == \
        {k: shape for k, (shape, _) in manifest["keys"].items()}
    with pytest.raises(ValueError, match="family"):
        EfficientNetEncoder(family="v1")


# ---------------------------------------------------------------- VQGAN (Stable Cascade's Stage A)


def v2_vqgan(name):
    meta, sd, io = load_v2(name)
    config = stage_a_config_from_diffusers(meta["config"]) if name == "v2_vqgan" else meta["config"]
    model = StageA(**config)
    model.load_state_dict(sd, strict=True)
    return meta, model.eval(), sd, io


def test_v2_vqgan_diffusers_api():
    meta, model, sd, io = v2_vqgan("v2_vqgan")
    assert "vquantizer.embedding.weight" in sd and model.scale_factor == pytest.approx(0.3764)
    calls = {c["id"]: c for c in meta["calls"]}
    with torch.no_grad():
        latent = model.encode_unscaled(io["call0.in.x"])
        plain = model.decode_unscaled(io["call1.in.h"])
        quantized, (vq_loss, commit_loss), indices = model.vquantizer(io["call2.in.h"], dim=1)
        decoded_q = model.decode_unscaled(quantized)
        z_q, _, indices3 = model.vquantizer(io["call3.in.z"], dim=1)
    for ours, key, call in ((latent, "call0.out.0", "call0"), (plain, "call1.out.0", "call1"),
                            (decoded_q, "call2.out.0", "call2"), (z_q, "call3.out.0", "call3")):
        atol = next(o for o in calls[call]["outputs"] if o["key"] == key)["suggested_atol"]
        assert max_err(ours, io[key]) <= atol, key
    assert torch.equal(indices3.flatten(), io["call3.out.2.2"])
    _, (vq_loss, commit_loss), _ = model.vquantizer(io["call3.in.z"], dim=1)
    assert (vq_loss + 0.25 * commit_loss).item() == pytest.approx(io["call3.out.1"].item(), rel=1e-5)


def test_v2_vqgan_original_api_and_same_codes():
    meta, model, sd, io = v2_vqgan("v2_vqgan_original")
    assert "vquantizer.codebook.weight" in sd
    _, hub_model, _, hub_io = v2_vqgan("v2_vqgan")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in hub_model.state_dict().items())
    with torch.no_grad():
        encoded = model.encode(io["call0.in.x"], quantize=True)
        decoded = model.decode(io["call1.in.x"])
    for i in (0, 1, 3):
        assert max_err(encoded[i], io[f"call0.out.{i}"]) <= 1e-4
    assert torch.equal(encoded[2], io["call0.out.2"])
    assert max_err(decoded, io["call1.out"]) <= 1e-4
    # both APIs see the same image and pick the same codes
    assert torch.equal(io["call0.in.x"], hub_io["call0.in.x"])
    assert torch.equal(encoded[2].flatten(), hub_io["call3.out.2.2"])
