"""Stage A, EfficientNet encoder, Previewer and ControlNet against the official reference data."""

import time

import pytest
import torch

from conftest import call_kwargs, load_manifest, load_parity
from wuerstchen.models import stage_a as stage_a_module
from wuerstchen.models.controlnet import ControlNet
from wuerstchen.models.effnet import (
    EFFICIENTNET_V2_S,
    EfficientNetEncoder,
    EfficientNetStage,
    build_efficientnet_features,
    effnet_preprocess,
)
from wuerstchen.models.previewer import Previewer
from wuerstchen.models.stage_a import StageA, VectorQuantizer, stage_a_config_from_diffusers


def _loaded(cls, name, **extra_config):
    meta, weights, io = load_parity(name)
    model = cls(**meta["config"], **extra_config)
    model.load_state_dict(weights, strict=True)
    return meta, model.float().eval(), io


def _assert_close(ours, ref, atol, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


def _check_outputs(call, result, io):
    outputs = call["outputs"]
    if len(outputs) == 1 and outputs[0]["key"].endswith(".out"):
        result = [result]
    assert len(result) == len(outputs), f"{call['id']}: {len(result)} outputs, expected {len(outputs)}"
    for out, spec in zip(result, outputs):
        if spec.get("value", "absent") is None:
            assert out is None, f"{spec['key']}: expected None"
        elif spec["dtype"] == "int64":
            assert out.dtype == torch.int64 and torch.equal(out, io[spec["key"]]), f"{spec['key']}: indices differ"
        else:
            _assert_close(out, io[spec["key"]], spec["suggested_atol"], spec["key"])


# ---------------------------------------------------------------- parity vectors


def test_stage_a_parity_all_calls():
    meta, model, io = _loaded(StageA, "stage_a")
    assert len(meta["calls"]) == 3
    with torch.no_grad():
        for call in meta["calls"]:
            result = getattr(model, call["method"])(**call_kwargs(call, io))
            _check_outputs(call, result, io)


def test_effnet_encoder_parity_with_small_backbone():
    meta, model, io = _loaded(EfficientNetEncoder, "effnet_encoder", backbone_setting=load_parity("effnet_encoder")[0]["backbone_setting"])
    with torch.no_grad():
        for call in meta["calls"]:
            _check_outputs(call, model(**call_kwargs(call, io)), io)


def test_previewer_parity():
    meta, model, io = _loaded(Previewer, "previewer")
    with torch.no_grad():
        for call in meta["calls"]:
            _check_outputs(call, model(**call_kwargs(call, io)), io)


def test_controlnet_parity_list_with_nones():
    meta, model, io = _loaded(ControlNet, "controlnet")
    with torch.no_grad():
        for call in meta["calls"]:
            result = model(**call_kwargs(call, io))
            assert isinstance(result, list)
            assert [r is None for r in result] == [o.get("value", 0) is None for o in call["outputs"]]
            _check_outputs(call, result, io)


def test_controlnet_reproduces_stage_c_cnet_inputs():
    meta, _, io = load_parity("stage_c_cnet")
    _, cnet_weights, _ = load_parity("controlnet")
    model = ControlNet(**meta["controlnet_config"])
    model.load_state_dict(cnet_weights, strict=True)
    with torch.no_grad():
        result = model.eval()(io["cnet_input"])
    spec = next(a for a in meta["calls"][0]["args"] if a["name"] == "cnet")["list"]
    assert len(result) == len(spec)
    for i, (ours, entry) in enumerate(zip(result, spec)):
        if entry is None:
            assert ours is None, f"cnet entry {i} should be None"
        else:
            _assert_close(ours, io[entry["key"]], 1e-5, entry["key"])


# ---------------------------------------------------------------- released layouts


def _meta_state(model):
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}


def _manifest_state(manifest):
    return {k: (tuple(shape), dtype) for k, (shape, dtype) in manifest["keys"].items()}


def _num_parameters(model):
    return sum(p.numel() for p in model.parameters())


MANIFEST_BUILDERS = {
    "stage_a": StageA,
    "effnet_encoder": EfficientNetEncoder,
    "previewer": Previewer,
    "controlnet_canny": ControlNet,
    "controlnet_inpainting": ControlNet,
    "controlnet_super_resolution": ControlNet,
}


@pytest.mark.parametrize("name", sorted(MANIFEST_BUILDERS))
def test_manifest_layout_on_meta(name):
    manifest = load_manifest(name)
    with torch.device("meta"):
        model = MANIFEST_BUILDERS[name](**manifest["config"])
    assert _meta_state(model) == _manifest_state(manifest)
    assert _num_parameters(model) == manifest["num_parameters"]
    state = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, (shape, dtype) in manifest["keys"].items()}
    model.load_state_dict(state, strict=True, assign=True)


def test_wuerstchen_v2_vqgan_manifest_loads_into_stage_a():
    manifest = load_manifest("wuerstchen_v2_vqgan")
    config = stage_a_config_from_diffusers(manifest["config"])
    assert config["scale_factor"] == pytest.approx(0.3764)
    with torch.device("meta"):
        model = StageA(**config)
    assert _num_parameters(model) == manifest["num_parameters"]
    # diffusers names the codebook vquantizer.embedding; everything else is identical.
    renamed = {("vquantizer.codebook.weight" if k == "vquantizer.embedding.weight" else k): v
               for k, v in _manifest_state(manifest).items()}
    assert _meta_state(model) == renamed
    state = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, (shape, dtype) in manifest["keys"].items()}
    assert "vquantizer.embedding.weight" in state
    model.load_state_dict(state, strict=True, assign=True)


def test_stage_a_config_from_diffusers_rejects_unsupported():
    with pytest.raises(ValueError, match="in_channels"):
        stage_a_config_from_diffusers({"in_channels": 4})
    with pytest.raises(ValueError, match="norm_type"):
        stage_a_config_from_diffusers({"norm_type": "group"})


def test_full_size_models_build_on_meta_quickly():
    start = time.perf_counter()
    with torch.device("meta"):
        EfficientNetEncoder()
        ControlNet(**load_manifest("controlnet_super_resolution")["config"])
        ControlNet(**load_manifest("controlnet_canny")["config"])
        StageA()
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------- behaviour details


def test_vector_quantizer_lowest_index_wins_ties_and_chunks(monkeypatch):
    vq = VectorQuantizer(2, 4)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]))
    points = torch.tensor([[0.5, 0.5], [1.0, 0.0], [-2.0, 0.1], [0.0, 3.0], [0.9, 0.1]])
    assert vq.nearest_indices(points).tolist() == [0, 0, 3, 1, 0]
    monkeypatch.setattr(stage_a_module, "_VQ_CHUNK_ELEMENTS", 8)  # 2 rows per chunk
    assert vq.nearest_indices(points).tolist() == [0, 0, 3, 1, 0]
    quantized, (vq_loss, commit_loss), indices = vq(points.T.unsqueeze(0), dim=1)
    assert quantized.shape == (1, 2, 5) and indices.shape == (1, 5)
    assert torch.equal(quantized[0].T, vq.codebook.weight[indices[0]])
    assert vq_loss.item() == pytest.approx(commit_loss.item())


def test_vector_quantizer_passes_gradient_straight_through():
    vq = VectorQuantizer(3, 8)
    x = torch.randn(2, 3, 4, requires_grad=True)
    quantized, _, _ = vq(x, dim=1)
    quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_stage_a_decode_indices_matches_quantized_decode():
    _, model, io = _loaded(StageA, "stage_a")
    with torch.no_grad():
        quantized, _, indices, _ = model.encode(io["call1.in.x"], quantize=True)
        _assert_close(model.decode_indices(indices), model.decode(quantized), 1e-6, "decode_indices")
        decoded, loss = model(io["call1.in.x"], quantize=True)
        _assert_close(decoded, model.decode(quantized), 1e-6, "forward")


def test_forward_casts_float_inputs_to_parameter_dtype():
    _, previewer, io = _loaded(Previewer, "previewer")
    out = previewer.to(torch.bfloat16)(io["call0.in.x"].double())
    assert out.dtype == torch.bfloat16
    _, stage_a, io = _loaded(StageA, "stage_a")
    stage_a = stage_a.to(torch.bfloat16)
    latent, *_ = stage_a.encode(io["call0.in.x"])
    assert latent.dtype == torch.bfloat16 and stage_a.decode(latent.float()).dtype == torch.bfloat16
    _, cnet, io = _loaded(ControlNet, "controlnet")
    assert cnet.to(torch.float64)(io["call0.in.x"])[0].dtype == torch.float64


def test_effnet_preprocess_is_imagenet_normalisation():
    images = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.equal(effnet_preprocess(images), (images - mean) / std)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        effnet_preprocess(torch.rand(3, 8, 8))


def test_efficientnet_v2_s_backbone_shape_and_strides():
    with torch.device("meta"):
        features = build_efficientnet_features()
        out = features(torch.empty(1, 3, 224, 320))
    assert len(features) == 2 + len(EFFICIENTNET_V2_S)
    assert out.shape == (1, 1280, 7, 10)
    assert [len(stage) for stage in features[1:-1]] == [s.num_layers for s in EFFICIENTNET_V2_S]
    assert features[1][0].use_residual and not features[2][0].use_residual and features[2][1].use_residual


def test_backbone_setting_validation():
    with pytest.raises(ValueError, match="FusedMBConv"):
        EfficientNetStage("Conv", 1, 3, 1, 8, 8, 1)
    with pytest.raises(ValueError, match="exactly the keys"):
        build_efficientnet_features([{"block": "MBConv", "kernel": 3}])


def test_controlnet_effnet_stem_has_no_padding_only_when_c_in_is_not_3():
    with torch.device("meta"):
        rgb = ControlNet(c_in=3, c_proj=8, proj_blocks=[1], bottleneck_mode="effnet")
        canny = ControlNet(c_in=1, c_proj=8, proj_blocks=[1])
    assert rgb.backbone[0][0].padding == (1, 1) and rgb.backbone[0][0].in_channels == 3
    stem = canny.backbone[0][0]
    assert stem.padding == (0, 0) and stem.bias is None and stem.in_channels == 1 and stem.stride == (2, 2)
    with torch.device("meta"):
        padded = rgb(torch.empty(1, 3, 66, 66))
        unpadded = canny(torch.empty(1, 1, 66, 66))
    assert padded[0] is None and padded[1].shape == (1, 8, 3, 3)  # 66 -> 33 -> 17 -> 9 -> 5 -> 3
    assert unpadded[0] is None and unpadded[1].shape == (1, 8, 2, 2)  # 66 -> 32 -> 16 -> 8 -> 4 -> 2


def test_controlnet_errors_are_actionable():
    with pytest.raises(ValueError, match="proj_blocks"):
        ControlNet(c_in=3, bottleneck_mode="simple")
    with pytest.raises(ValueError, match="bottleneck_mode"):
        ControlNet(c_in=3, proj_blocks=[0], bottleneck_mode="huge")
    cnet = ControlNet(c_in=4, c_proj=8, proj_blocks=[0], bottleneck_mode="simple")
    with pytest.raises(ValueError, match="4-channel"):
        cnet(torch.zeros(1, 3, 8, 8))


def test_untrained_controlnet_heads_output_zero():
    cnet = ControlNet(c_in=2, c_proj=8, proj_blocks=[0, 3], bottleneck_mode="simple")
    outputs = cnet(torch.randn(1, 2, 4, 4))
    assert [o is None for o in outputs] == [False, True, True, False]
    assert all(torch.count_nonzero(o) == 0 for o in outputs if o is not None)
