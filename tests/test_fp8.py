"""fp8 weight storage: which parameters are stored in fp8, that every layer upcasts them before
computing (checked at the level of ATen ops: no arithmetic op ever sees an fp8 tensor), the
accuracy against the official float32 outputs, and the memory it saves."""

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import call_kwargs, load_parity
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.files import tiny
from wuerstchen.files.checkpoints import load as load_file
from wuerstchen.files.management import ModelManager
from wuerstchen.models import StageB, StageC
from wuerstchen.models.ops import FP8_DTYPES, fp8_weight_names
from wuerstchen.sampling.streaming import module_bytes
from wuerstchen.storage.weights_io import SafetensorsFile

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

# ATen ops that only move, view or cast a tensor: the only ones allowed to see fp8 data.
_MOVES = {"_to_copy", "copy_", "clone", "detach", "alias", "view", "_unsafe_view", "reshape", "t", "transpose",
          "permute", "slice", "select", "split", "chunk", "expand", "as_strided", "flatten", "unsqueeze", "squeeze",
          "lift_fresh", "empty_like"}


class NoFp8Arithmetic(TorchDispatchMode):
    """Records every ATen op that received an fp8 tensor, and the fp8 -> compute-dtype upcasts."""

    def __init__(self):
        super().__init__()
        self.offending, self.upcasts = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [a for a in list(args) + list(kwargs.values())]
        flat += [t for a in flat if isinstance(a, (list, tuple)) for t in a]
        fp8_in = any(isinstance(a, torch.Tensor) and a.dtype in FP8_DTYPES for a in flat)
        name = func.overloadpacket.__name__
        if fp8_in:
            if name in _MOVES:
                self.upcasts += name == "_to_copy"
            else:
                self.offending.append(name)
        return func(*args, **kwargs)


def _model(cls, name, dtype, compute):
    """A parity model with its matrix weights stored in ``dtype`` and the rest in ``compute``."""
    meta, weights, io = load_parity(name)
    model = cls(**meta["config"])
    model.load_state_dict(weights, strict=True)
    model = model.eval().requires_grad_(False)
    low = set(fp8_weight_names(model)) if dtype in FP8_DTYPES else set()
    for n, p in model.named_parameters():
        p.data = p.data.to(dtype if n in low else compute)
    calls = []
    for call in meta["calls"]:
        calls.append((call_kwargs(call, io), io[call["outputs"][0]["key"]]))
    return model, calls


def test_fp8_weights_are_the_matrix_weights_found_by_module_type():
    with torch.device("meta"):
        model = StageC(**tiny.STAGE_C)
    names = set(fp8_weight_names(model))
    assert "down_blocks.0.2.attention.attn.in_proj_weight" in names  # declared by the attention module
    assert "down_blocks.0.2.attention.attn.out_proj.weight" in names and "clip_txt_mapper.weight" in names
    assert "down_blocks.0.0.channelwise.0.weight" in names and "embedding.1.weight" in names
    assert "down_blocks.0.0.depthwise.weight" not in names  # depthwise: tiny, kept exact
    assert not any(n.endswith(("bias", ".gamma", ".beta")) for n in names)
    matrices = {n for n, p in model.named_parameters() if sum(s > 1 for s in p.shape) >= 2 and "depthwise" not in n}
    assert names == matrices


@pytest.mark.parametrize("dtype, compute", [(E4M3, torch.bfloat16), (E5M2, torch.bfloat16), (E4M3, torch.float32)])
@pytest.mark.parametrize("cls, name", [(StageC, "stage_c"), (StageB, "stage_b")])
def test_no_layer_computes_in_fp8_and_results_stay_close(cls, name, dtype, compute):
    model, calls = _model(cls, name, dtype, compute)
    assert {p.dtype for p in model.parameters()} == {dtype, compute}
    for kwargs, ref in calls:
        with NoFp8Arithmetic() as watch, torch.no_grad():
            out = model(**kwargs)
        assert not watch.offending, f"ops computed on fp8 tensors: {sorted(set(watch.offending))}"
        assert watch.upcasts >= len(fp8_weight_names(model))
        assert out.dtype == compute and torch.isfinite(out).all()
        rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        assert rel < (0.15 if dtype == E4M3 else 0.4), f"{name}: fp8 error {rel:.3f} of the output's range"


def test_the_watch_sees_a_layer_that_computes_in_fp8():
    layer = torch.nn.Linear(8, 8).to(E4M3)
    with NoFp8Arithmetic() as watch:
        torch.nn.functional.linear(torch.randn(2, 8).to(E4M3), layer.weight)
    assert watch.offending


def test_loader_stores_matrix_weights_in_fp8_and_the_rest_in_the_compute_dtype(tiny_dir):
    path = tiny_dir / "stage_c.safetensors"  # stored in float32
    f32 = dict(load_file(path, kinds=["stage_c"], dtype=torch.float32).module.named_parameters())
    bf16 = load_file(path, kinds=["stage_c"], dtype=torch.bfloat16)
    fp8 = load_file(path, kinds=["stage_c"], dtype=E4M3, compute_dtype=torch.bfloat16)
    low = set(fp8_weight_names(fp8.module))
    for n, p in fp8.module.named_parameters():
        assert p.dtype == (E4M3 if n in low else torch.bfloat16), n
        assert torch.equal(p, f32[n].to(p.dtype))  # rounded once from the file's values, no bf16 detour
    assert fp8.dtype == E4M3 and fp8.compute_dtype == torch.bfloat16
    assert fp8.module.compute_dtype() == torch.bfloat16
    ratio = module_bytes(fp8.module) / module_bytes(bf16.module)
    low_share = sum(p.numel() for n, p in fp8.module.named_parameters() if n in low) / sum(
        p.numel() for p in fp8.module.parameters())
    assert ratio == pytest.approx(1 - low_share / 2, abs=1e-3)


def test_kinds_without_fp8_support_load_in_the_compute_dtype(tiny_dir):
    a = load_file(tiny_dir / "stage_a.safetensors", kinds=["stage_a"], dtype=E4M3, compute_dtype=torch.float32)
    assert {p.dtype for p in a.module.parameters()} == {torch.float32}


def test_manager_runs_fp8_stages_with_the_device_compute_dtype(tiny_dir):
    mgr = ModelManager(device="cpu", dtype=E5M2)
    assert mgr.compute_dtype() == torch.float32
    sc = mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"])
    assert sc.dtype == E5M2 and sc.compute_dtype == torch.float32
    assert mgr.load(tiny_dir / "stage_c.safetensors", ["stage_c"], torch.float32) is not sc
    te = mgr.load(tiny_dir / "text_encoder/model.safetensors", ["clip_text"])
    assert {p.dtype for p in te.module.parameters()} == {torch.float32}
    dim = sc.config["c_clip_text"]
    cond = pipeline.Conditioning(torch.randn(1, 3, dim), torch.randn(1, 1, dim))
    with mgr.running(sc), torch.no_grad(), NoFp8Arithmetic() as watch:
        x0 = pipeline.sample_stage_c(sc.module, cond, cond, shape=(1, 16, 4, 4), seed=1,
                                     settings=pipeline.StageCSettings(steps=2))
    assert not watch.offending and torch.isfinite(x0).all()


def test_fp8_storage_with_float16_compute_keeps_the_overflow_guard(tiny_dir, monkeypatch):
    mgr = ModelManager(device="cpu", dtype=E4M3)
    monkeypatch.setattr(mgr, "compute_dtype", lambda: torch.float16)
    sb = mgr.load(tiny_dir / "stage_b.safetensors", ["stage_b"])
    assert sb.compute_dtype == torch.float16 and sb.module.fp16_guard is True
    assert sb.module.stream_dtype() == torch.float32
    x = torch.randn(1, 4, 16, 16) * 1e3  # a stream that float16 alone would overflow in the MLPs
    with torch.no_grad(), NoFp8Arithmetic() as watch:
        out = sb.module(x, torch.tensor([0.5]), torch.randn(1, 16, 4, 4), torch.randn(1, 1, 24))
    assert not watch.offending and torch.isfinite(out).all()


def test_fp8_safetensors_files_are_read(tmp_path):
    tensors = {"a": torch.randn(3, 4).to(E4M3), "b": torch.randn(5).to(E5M2)}
    save_file(tensors, str(tmp_path / "f.safetensors"))
    st = SafetensorsFile(tmp_path / "f.safetensors")
    assert st.dtypes() == {"a": E4M3, "b": E5M2}
    read = st.read()
    assert all(torch.equal(read[k].float(), v.float()) for k, v in tensors.items())
    assert st.read(["a"], dtype=torch.bfloat16)["a"].dtype == torch.bfloat16


def test_loader_widgets_offer_fp8_after_the_existing_choices():
    from nodes.loaders import DTYPES, WuerstchenCheckpointLoader, WuerstchenStageCLoader

    assert list(DTYPES) == ["auto", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"]  # saved workflows keep values
    for node in (WuerstchenStageCLoader, WuerstchenCheckpointLoader):
        choices, options = node.INPUT_TYPES()["required"]["dtype"]
        assert choices == list(DTYPES) and "fp8" in options["tooltip"]


def test_a_lora_on_fp8_weights_keeps_its_change_in_the_compute_dtype(tiny_dir, tmp_path):
    """Patched fp8 weights are held in the compute dtype (rounding them back to 8 bits would lose most
    of a LoRA): each equals the fp8 base plus the change the same LoRA makes to a float32 model, to
    bfloat16 rounding; unpatching restores the fp8 tensors."""
    from wuerstchen import lora
    from wuerstchen.files import tiny

    path = tmp_path / "lora.safetensors"
    tiny.write_tiny_lora(path, "kohya", tiny.STAGE_C, rank=2, seed=5)
    lf = lora.load_lora(path)
    f32 = load_file(tiny_dir / "stage_c.safetensors", kinds=["stage_c"], dtype=torch.float32).module
    f32_params = dict(f32.named_parameters())
    f32_base = {n: p.detach().clone() for n, p in f32_params.items()}
    with lora.apply_loras(f32, [(lf, 1.0)], part="stage_c"):
        change = {n: p.detach() - f32_base[n] for n, p in f32_params.items() if not torch.equal(p, f32_base[n])}

    model = load_file(tiny_dir / "stage_c.safetensors", kinds=["stage_c"], dtype=E4M3, compute_dtype=torch.bfloat16)
    params = dict(model.module.named_parameters())
    before = {n: (p.dtype, p.detach().clone()) for n, p in params.items()}
    fp8_changed = [n for n in change if before[n][0] == E4M3]
    assert fp8_changed
    with lora.apply_loras(model.module, [(lf, 1.0)], part="stage_c"):
        for name in fp8_changed:
            patched = params[name].detach()
            assert patched.dtype == torch.bfloat16, name
            exact = before[name][1].float() + change[name]
            kept = (patched.float() - exact).abs().max()
            rounded = (patched.to(E4M3).float() - exact).abs().max()
            assert kept <= exact.abs().max() * 2 ** -7 and kept < rounded, name
    for name, (dtype, value) in before.items():
        assert params[name].dtype == dtype and torch.equal(params[name].detach(), value), name
