"""Stage C / Stage B U-Nets: parity with the official outputs, state-dict layout, dtypes, fp16 guard.

Parity vectors and manifests come from the official Stability-AI code (see the reference README).
"""

import copy
import inspect
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import call_kwargs, load_manifest, load_parity
from wuerstchen.models.blocks import AttnBlock, GlobalResponseNorm, ResBlock, TimestepBlock
from wuerstchen.models.stage_b import StageB
from wuerstchen.models.stage_c import StageC


def _load_model(cls, config, weights):
    model = cls(**config)
    model.load_state_dict(weights, strict=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def stage_c_vector():
    meta, weights, io = load_parity("stage_c")
    return _load_model(StageC, meta["config"], weights), meta, io


@pytest.fixture(scope="module")
def stage_b_vector():
    meta, weights, io = load_parity("stage_b")
    return _load_model(StageB, meta["config"], weights), meta, io


# ----------------------------------------------------------------------------------------------
# parity with the official implementation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("stage_c", StageC), ("stage_c_switch", StageC), ("stage_b", StageB)])
def test_parity_vectors(name, cls):
    meta, weights, io = load_parity(name)
    model = _load_model(cls, meta["config"], weights)
    assert meta["calls"], "parity vector without calls"
    with torch.no_grad():
        for call in meta["calls"]:
            out = model(**call_kwargs(call, io))
            (expected,) = call["outputs"]
            ref = io[expected["key"]]
            assert out.shape == ref.shape and out.dtype == torch.float32
            err = (out - ref).abs().max().item()
            assert err <= expected["suggested_atol"], f"{name} {call['id']}: max error {err:.2e}"


def test_parity_controlnet_injection():
    meta, _, io = load_parity("stage_c_cnet")
    _, stage_c_weights, _ = load_parity("stage_c")
    model = _load_model(StageC, meta["config"], stage_c_weights)
    (call,) = meta["calls"]
    kwargs = call_kwargs(call, io)
    assert any(item is None for item in kwargs["cnet"]) and any(item is not None for item in kwargs["cnet"])
    with torch.no_grad():
        out = model(**kwargs)
        without = model(**{k: v for k, v in kwargs.items() if k != "cnet"})
    (expected,) = call["outputs"]
    assert (out - io[expected["key"]]).abs().max().item() <= expected["suggested_atol"]
    assert (out - without).abs().max().item() > 1e-2  # the injection really changes the result


# ----------------------------------------------------------------------------------------------
# layout of the released checkpoints
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["stage_c", "stage_c_lite", "stage_b", "stage_b_lite"])
def test_manifest_layout_on_meta(name):
    manifest = load_manifest(name)
    cls = StageC if name.startswith("stage_c") else StageB
    start = time.perf_counter()
    with torch.device("meta"):
        model = cls(**manifest["config"])
    assert time.perf_counter() - start < 5.0, "meta construction must not initialize weights"
    state = model.state_dict()
    assert list(state) == list(manifest["keys"])
    for key, (shape, dtype) in manifest["keys"].items():
        assert list(state[key].shape) == shape, key
        assert str(state[key].dtype).removeprefix("torch.") == dtype, key
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]


@pytest.mark.parametrize("cls, name", [(StageC, "stage_c"), (StageB, "stage_b")])
def test_constructor_defaults_are_the_full_size_models(cls, name):
    config = load_manifest(name)["config"]
    params = inspect.signature(cls).parameters
    assert list(params) == list(config)
    assert {key: p.default for key, p in params.items()} == config


def test_meta_model_loads_with_assign(stage_c_vector):
    model, meta, io = stage_c_vector
    with torch.device("meta"):
        fresh = StageC(**meta["config"])
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    call = meta["calls"][1]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**call_kwargs(call, io)), model(**call_kwargs(call, io)))


# ----------------------------------------------------------------------------------------------
# code paths the vectors do not pin down
# ----------------------------------------------------------------------------------------------

def test_no_grad_fast_path_matches_autograd_path(stage_c_vector):
    """Under no_grad the blocks work in place and in reused buffers; with autograd they cannot."""
    model, meta, io = stage_c_vector
    kwargs = call_kwargs(meta["calls"][0], io)
    with torch.no_grad():
        fast = model(**kwargs)
    inputs = {k: v.clone() for k, v in kwargs.items()}
    tracked = model(**inputs)
    assert tracked.requires_grad
    assert (fast - tracked).abs().max().item() < 1e-5
    tracked.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    for key, value in kwargs.items():  # inputs are never modified
        assert torch.equal(value, inputs[key]), key


def test_grn_fold_matches_plain_grn(stage_b_vector):
    """The GRN scale folded into the next weight (many tokens) equals the plain GRN path."""
    model, meta, io = stage_b_vector
    kwargs = call_kwargs(meta["calls"][0], io)
    with torch.no_grad():
        folded = model(**kwargs)
        try:
            GlobalResponseNorm.fold_scale = False
            plain = model(**kwargs)
        finally:
            GlobalResponseNorm.fold_scale = True
    assert 0 < (folded - plain).abs().max().item() < 1e-5


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    c, c_cond, heads = 24, 12, 3
    x, cond = torch.randn(2, c, 3, 5), torch.randn(2, 7, c_cond)
    for self_attn in (True, False):
        block = AttnBlock(c, c_cond, heads, self_attn=self_attn).eval()
        with torch.no_grad():
            block.attention.attn.in_proj_bias.normal_()
            block.attention.attn.out_proj.bias.normal_()
            mha = torch.nn.MultiheadAttention(c, heads, batch_first=True).eval()
            mha.load_state_dict(block.attention.attn.state_dict())
            tokens = torch.nn.functional.layer_norm(x.flatten(2).transpose(1, 2), (c,), eps=1e-6)
            kv = block.kv_mapper(cond)
            if self_attn:
                kv = torch.cat([tokens, kv], dim=1)
            expected = x + mha(tokens, kv, kv, need_weights=False)[0].transpose(1, 2).view_as(x)
            out = block(x.permute(0, 2, 3, 1).contiguous(), cond).permute(0, 3, 1, 2)  # blocks run channels-last
            assert (out - expected).abs().max().item() < 1e-5


def test_resblock_forward_matches_formula():
    torch.manual_seed(0)
    block = ResBlock(8, c_skip=8).eval()
    with torch.no_grad():
        grn = block.channelwise[2]
        grn.gamma.normal_()
        grn.beta.normal_()
        x, skip = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
        h = torch.nn.functional.conv2d(x, block.depthwise.weight, block.depthwise.bias, padding=1, groups=8)
        h = torch.nn.functional.layer_norm(h.permute(0, 2, 3, 1), (8,), eps=1e-6)
        h = torch.cat([h, skip.permute(0, 2, 3, 1)], dim=-1)
        h = torch.nn.functional.gelu(block.channelwise[0](h))
        norm = torch.linalg.vector_norm(h, dim=(1, 2), keepdim=True)
        h = grn.gamma * (h * (norm / (norm.mean(-1, keepdim=True) + 1e-6))) + grn.beta + h
        expected = block.channelwise[4](h).permute(0, 3, 1, 2) + x
        x_nhwc, skip_nhwc = x.permute(0, 2, 3, 1).contiguous(), skip.permute(0, 2, 3, 1).contiguous()
        x_before = x_nhwc.clone()
        assert (block(x_nhwc, skip_nhwc).permute(0, 3, 1, 2) - expected).abs().max().item() < 1e-5
        assert torch.equal(x_nhwc, x_before)  # without a workspace the input is not overwritten


def test_two_dimensional_pooled_clip_is_one_token(stage_c_vector):
    model, meta, io = stage_c_vector
    kwargs = call_kwargs(meta["calls"][1], io)
    with torch.no_grad():
        ref = model(**kwargs)
        kwargs["clip_text_pooled"] = kwargs["clip_text_pooled"][:, 0]
        kwargs["clip_img"] = kwargs["clip_img"][:, 0]
        assert torch.equal(model(**kwargs), ref)


def test_time_conditions_accept_numbers(stage_c_vector):
    model, meta, io = stage_c_vector
    kwargs = call_kwargs(meta["calls"][0], io)
    with torch.no_grad():
        ref = model(**{**kwargs, "sca": torch.full((2,), 0.25), "crp": torch.zeros(2)})
        assert torch.equal(model(**{**kwargs, "sca": 0.25, "crp": None}), ref)


def test_clear_errors_for_bad_configs():
    with pytest.raises(ValueError, match="block type 'X'"):
        StageC(c_cond=8, c_hidden=[8, 8], nhead=[2, 2], blocks=[[1, 1], [1, 1]], level_config=["CX", "C"],
               c_clip_text=4, c_clip_text_pooled=4, c_clip_img=4)
    with pytest.raises(ValueError, match="divisible"):
        AttnBlock(10, 4, 3)
    with pytest.raises(ValueError, match="nhead has 1 entries"):
        StageB(c_hidden=[8, 8], nhead=[2], blocks=[[1, 1], [1, 1]], level_config=["CT", "CT"])


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------

def _relative_error(out, ref):
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("vector", ["stage_c_vector", "stage_b_vector"])
def test_bfloat16_runs_on_cpu_close_to_float32(vector, request):
    model, meta, io = request.getfixturevalue(vector)
    kwargs = call_kwargs(meta["calls"][0], io)  # float32 inputs: cast by the model
    low = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        ref, out = model(**kwargs), low(**kwargs)
    assert out.dtype == torch.bfloat16
    assert _relative_error(out, ref) < 0.05


class _MatmulDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matrix product dispatched while active."""

    PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addmv", "linear"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.PRODUCTS:
            self.seen.append({a.dtype for a in args if torch.is_tensor(a) and a.dim() == 2})
        return func(*args, **(kwargs or {}))


def test_fp16_guard_prevents_overflow(stage_c_vector):
    model, meta, io = stage_c_vector
    hot = copy.deepcopy(model)
    with torch.no_grad():  # every TimestepBlock now multiplies the residual stream by ~60
        for block in hot.modules():
            if isinstance(block, TimestepBlock):
                block.mapper.bias[: block.mapper.bias.shape[0] // 2] += 60.0
    kwargs = call_kwargs(meta["calls"][0], io)
    half = copy.deepcopy(hot).half()
    assert half.fp16_guard is False
    with torch.no_grad():
        ref = hot(**kwargs)
        assert torch.isfinite(ref).all()
        assert not torch.isfinite(half(**kwargs)).all()  # plain fp16 overflows
        half.fp16_guard = True
        with _MatmulDtypes() as products:
            guarded = half(**kwargs)
    assert guarded.dtype == torch.float16 and torch.isfinite(guarded).all()
    assert _relative_error(guarded, ref) < 0.03
    assert products.seen and all(dtypes == {torch.float16} for dtypes in products.seen)


@pytest.mark.parametrize("vector", ["stage_c_vector", "stage_b_vector"])
def test_fp16_guard_is_harmless_without_overflow(vector, request):
    model, meta, io = request.getfixturevalue(vector)
    kwargs = call_kwargs(meta["calls"][0], io)
    half = copy.deepcopy(model).half()
    with torch.no_grad():
        ref, plain = model(**kwargs), half(**kwargs)
        half.fp16_guard = True
        guarded = half(**kwargs)
    assert _relative_error(plain, ref) < 0.02 and _relative_error(guarded, ref) < 0.02
