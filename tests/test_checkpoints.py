"""Checkpoint identification and loading: official layouts, tiny files, errors, reader memory.

Full-size official files are simulated without their weights: a manifest's keys and shapes go
into a safetensors header and the file is extended sparsely to its full size, so the real
header validation, detection and rejection paths run in milliseconds.
"""

import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import MANIFEST_DIR, REPO_ROOT, load_manifest
from wuerstchen.files import checkpoints
from wuerstchen.files import kinds
from wuerstchen.files import tiny
from wuerstchen.storage import weights_io
from wuerstchen.files.checkpoints import CheckpointError

# manifest -> (kind, variant)
OFFICIAL = {
    "stage_c": ("stage_c", "full"),
    "stage_c_lite": ("stage_c", "lite"),
    "stage_b": ("stage_b", "full"),
    "stage_b_lite": ("stage_b", "lite"),
    "stage_a": ("stage_a", "official"),
    "effnet_encoder": ("effnet", "official"),
    "previewer": ("previewer", "official"),
    "controlnet_canny": ("controlnet", "canny"),
    "controlnet_inpainting": ("controlnet", "inpainting"),
    "controlnet_super_resolution": ("controlnet", "super_resolution"),
}

# tiny file name -> (kind, config, expected variant)
TINY = {
    "stage_c": ("stage_c", tiny.STAGE_C, "custom"),
    "stage_c_lite": ("stage_c", tiny.STAGE_C_LITE, "custom"),
    "stage_b": ("stage_b", tiny.STAGE_B, "custom"),
    "stage_b_lite": ("stage_b", tiny.STAGE_B_LITE, "custom"),
    "stage_a": ("stage_a", tiny.STAGE_A, "custom"),
    "effnet": ("effnet", tiny.EFFNET, "custom"),
    "previewer": ("previewer", tiny.PREVIEWER, "custom"),
    **{f"controlnet_{name}": ("controlnet", cfg, name) for name, cfg in tiny.CONTROLNETS.items()},
}

_HEADER_DTYPES = {"float32": ("BF16", 2), "int64": ("I64", 8)}


def _manifest_shapes(name, prefix=""):
    return {prefix + k: tuple(v[0]) for k, v in load_manifest(name)["keys"].items()}


def _write_header_only(path, shapes, dtypes=None):
    """A valid safetensors file with these shapes whose data is a sparse hole (no disk, no RAM)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        code, size = _HEADER_DTYPES[(dtypes or {}).get(key, "float32")]
        nbytes = math.prod(shape) * size
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
    return path


def _official_file(tmp_path, name, prefix=""):
    keys = load_manifest(name)["keys"]
    return _write_header_only(tmp_path / f"{name}.safetensors", _manifest_shapes(name, prefix),
                              {prefix + k: v[1] for k, v in keys.items()})


def _one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, f"error spans several lines: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------- official layouts (manifests)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_detects_official_manifest_with_official_config(name):
    manifest = load_manifest(name)
    kind, variant = OFFICIAL[name]
    found = checkpoints.detect_parts(_manifest_shapes(name))
    assert [(d.kind, d.variant, d.prefix) for d in found] == [(kind, variant, "")]
    assert found[0].config == manifest["config"]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_module_built_on_meta_from_detected_config_has_manifest_keys(name):
    manifest = load_manifest(name)
    (det,) = checkpoints.detect_parts(_manifest_shapes(name))
    with torch.device("meta"):
        module = checkpoints.build_module(det.kind, det.config)
    state = module.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == _manifest_shapes(name)
    assert {k: str(v.dtype).replace("torch.", "") for k, v in state.items()} == {
        k: v[1] for k, v in manifest["keys"].items()}
    assert sum(p.numel() for p in module.parameters()) == manifest["num_parameters"]


@pytest.mark.parametrize("name", ["stage_c", "stage_b_lite", "controlnet_super_resolution", "effnet_encoder"])
def test_inspect_reads_official_file_header(tmp_path, name):
    path = _official_file(tmp_path, name)
    (det,) = checkpoints.inspect(path)
    assert (det.kind, det.variant) == OFFICIAL[name]
    assert det.config == load_manifest(name)["config"]


@pytest.mark.parametrize("name, prefix", [
    ("stage_c", "model.diffusion_model."),
    ("stage_c_lite", "model.diffusion_model."),
    ("stage_b", "model.diffusion_model."),
    ("stage_b_lite", "model.diffusion_model."),
    ("stage_a", "vae."),
])
def test_prefixed_official_layout_is_found_with_its_prefix(name, prefix):
    kind, variant = OFFICIAL[name]
    found = checkpoints.detect_parts(_manifest_shapes(name, prefix))
    assert [(d.kind, d.variant, d.prefix) for d in found] == [(kind, variant, prefix)]
    assert found[0].config == load_manifest(name)["config"]


def test_combined_comfyui_stage_c_checkpoint_parts(tmp_path):
    shapes = {**_manifest_shapes("stage_c", "model.diffusion_model."),
              **_manifest_shapes("effnet_encoder", "vae.encoder."),
              **_manifest_shapes("previewer", "vae.previewer.")}
    found = {d.kind: d for d in checkpoints.detect_parts(shapes)}
    assert {k: (d.variant, d.prefix) for k, d in found.items()} == {
        "stage_c": ("full", "model.diffusion_model."),
        "effnet": ("official", "vae.encoder."),
        "previewer": ("official", "vae.previewer."),
    }
    dtypes = {}
    for name, prefix in (("effnet_encoder", "vae.encoder."), ("previewer", "vae.previewer.")):
        dtypes.update({prefix + k: v[1] for k, v in load_manifest(name)["keys"].items()})
    path = _write_header_only(tmp_path / "stable_cascade_stage_c.safetensors", shapes, dtypes)
    assert {(d.kind, d.prefix) for d in checkpoints.inspect(path)} == {
        ("stage_c", "model.diffusion_model."), ("effnet", "vae.encoder."), ("previewer", "vae.previewer.")}


@pytest.mark.parametrize("name, kind, stable_cascade_kind", [
    ("wuerstchen_v2_prior", "v2_prior", "stage_c"),
    ("wuerstchen_v2_original_stage_c", "v2_prior", "stage_c"),
    ("wuerstchen_v2_decoder", "v2_decoder", "stage_b"),
    ("wuerstchen_v2_original_stage_b", "v2_decoder", "stage_b"),
])
def test_wuerstchen_v2_files_are_their_own_kind_and_refused_by_stable_cascade_loaders(tmp_path, name, kind,
                                                                                     stable_cascade_kind):
    shapes = _manifest_shapes(name)
    (det,) = checkpoints.detect_parts(shapes)
    assert (det.kind, det.variant) == (kind, "official")
    # the diffusers keywords (the original classes take no dropout, the original decoder a self_attn flag)
    manifest_config = {k: v for k, v in load_manifest(name)["config"].items() if k != "self_attn"}
    assert {k: det.config[k] for k in manifest_config} == manifest_config
    path = _official_file(tmp_path, name)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path, kinds=[stable_cascade_kind])
    _one_line(info, path.name, kinds.title(kind), "a Würstchen v2 file, not Stable Cascade", "stage_c.safetensors"
              if stable_cascade_kind == "stage_c" else "stage_b.safetensors")


@pytest.mark.parametrize("name, v2_kind", [("stage_c_lite", "v2_prior"), ("stage_b_lite", "v2_decoder")])
def test_stable_cascade_files_are_refused_by_v2_loaders(tmp_path, name, v2_kind):
    path = _official_file(tmp_path, name)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path, kinds=[v2_kind])
    _one_line(info, path.name, "Stable Cascade (Würstchen v3) file, not Würstchen v2", kinds.title(v2_kind),
              "wuerstchen-prior/prior" if v2_kind == "v2_prior" else "model_v2_stage_b.pt")


# ---------------------------------------------------------------- tiny files, real loading


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """name -> (path, kind, config, variant, saved float32 state)."""
    root = tmp_path_factory.mktemp("tiny")
    files = {}
    for i, (name, (kind, cfg, variant)) in enumerate(TINY.items()):
        state = tiny._random_module_state(kind, cfg, seed=10 + i)
        path = root / f"{name}.safetensors"
        weights_io.save_safetensors(state, path, metadata=tiny._meta(**{kind: cfg}))
        files[name] = (path, kind, cfg, variant, state)
    return files


def _assert_ready(module, device="cpu"):
    assert not module.training and not any(m.training for m in module.modules())
    tensors = list(module.parameters()) + list(module.buffers())
    assert tensors, "module holds no tensors"
    for t in tensors:
        assert not t.is_meta
        assert t.device.type == torch.device(device).type
        assert not t.requires_grad


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_file_loads_exactly_in_file_dtype(tiny_files, name):
    path, kind, cfg, variant, saved = tiny_files[name]
    loaded = checkpoints.load(path)
    assert (loaded.kind, loaded.variant, loaded.config) == (kind, variant, cfg)
    assert loaded.path == path and loaded.dtype == torch.float32
    state = loaded.module.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    _assert_ready(loaded.module)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_file_loads_in_requested_dtype(tiny_files, name):
    path, kind, _, _, saved = tiny_files[name]
    loaded = checkpoints.load(path, dtype=torch.bfloat16, device="cpu")
    assert loaded.kind == kind and loaded.dtype == torch.bfloat16
    state = loaded.module.state_dict()
    for key, value in saved.items():
        if value.is_floating_point():
            assert state[key].dtype == torch.bfloat16, key
            assert torch.equal(state[key], value.to(torch.bfloat16)), key
        else:
            assert state[key].dtype == value.dtype == torch.int64 and torch.equal(state[key], value), key
    _assert_ready(loaded.module)


def test_bf16_file_stays_bf16_by_default_and_int_buffers_stay_int(tmp_path):
    state = tiny._random_module_state("previewer", tiny.PREVIEWER, seed=3)
    path = tmp_path / "previewer_bf16.safetensors"
    weights_io.save_safetensors(tiny._cast(state, torch.bfloat16), path)
    loaded = checkpoints.load(path)
    assert loaded.dtype == torch.bfloat16
    got = loaded.module.state_dict()
    assert any(v.dtype == torch.int64 for v in got.values())
    for key, value in state.items():
        expected = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), key
    upcast = checkpoints.load(path, dtype=torch.float32).module.state_dict()
    assert {v.dtype for v in upcast.values()} == {torch.float32, torch.int64}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_file_loads_straight_onto_device(tiny_files, device):
    path, _, _, _, saved = tiny_files["stage_c"]
    loaded = checkpoints.load(path, dtype=torch.float16, device=device)
    _assert_ready(loaded.module, device)
    state = loaded.module.state_dict()
    for key, value in saved.items():
        assert state[key].dtype == torch.float16 and torch.equal(state[key].cpu(), value.to(torch.float16)), key


def test_combined_tiny_checkpoint_loads_each_part(tmp_path):
    stage_c = tiny._random_module_state("stage_c", tiny.STAGE_C, seed=1)
    previewer = tiny._random_module_state("previewer", tiny.PREVIEWER, seed=2)
    combined = {**tiny._prefixed(stage_c, "model.diffusion_model."), **tiny._prefixed(previewer, "vae.previewer.")}
    path = tmp_path / "combined.safetensors"
    weights_io.save_safetensors(combined, path, metadata=tiny._meta(stage_c=tiny.STAGE_C, previewer=tiny.PREVIEWER))
    parts = checkpoints.load_parts(path, dtype=torch.bfloat16)
    assert set(parts) == {"stage_c", "previewer"}
    for kind, saved in (("stage_c", stage_c), ("previewer", previewer)):
        got = parts[kind].module.state_dict()
        assert got.keys() == saved.keys()
        assert all(torch.equal(got[k], v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in saved.items())
    assert checkpoints.load(path, kinds=["previewer"]).kind == "previewer"


@pytest.mark.parametrize("name", ["previewer", "stage_a"])
def test_pickled_state_dict_loads_through_weights_only(tmp_path, name):
    kind, cfg, _ = TINY[name]
    state = tiny._random_module_state(kind, cfg, seed=5)
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    loaded = checkpoints.load(path, dtype=torch.bfloat16)
    assert loaded.kind == kind and loaded.config == cfg
    got = loaded.module.state_dict()
    assert all(torch.equal(got[k], v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items())
    _assert_ready(loaded.module)


def test_pickled_custom_stage_c_without_config_asks_for_metadata(tmp_path):
    path = tmp_path / "small_prior.pt"
    torch.save(tiny._random_module_state("stage_c", tiny.STAGE_C, seed=6), path)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path)
    msg = str(info.value)
    assert path.name in msg and checkpoints.CONFIG_METADATA_KEY in msg and "Stage C" in msg


class _WritesMarker:
    """Unpickling this object would create a file: the footprint of code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_arbitrary_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path)
    _one_line(info, "evil.pt", "safely")
    assert not marker.exists()

    # The payload is live: an unsafe load would have run it.
    live_marker = tmp_path / "proof"
    live = tmp_path / "live.pt"
    torch.save({"payload": _WritesMarker(live_marker)}, live)
    torch.load(live, weights_only=False)
    assert live_marker.exists()


# ---------------------------------------------------------------- errors


def test_sdxl_file_is_named_and_accepted_files_listed(tmp_path):
    path = tmp_path / "my_favourite_model.safetensors"
    weights_io.save_safetensors({
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(8),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 16),
        "model.diffusion_model.middle_block.0.in_layers.0.weight": torch.zeros(8),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
    }, path)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path)
    msg = str(info.value)
    assert path.name in msg and "SDXL" in msg
    for accepted in ("stage_c.safetensors", "stage_b_lite_bf16.safetensors", "stage_a.safetensors",
                     "effnet_encoder.safetensors", "controlnet/canny.safetensors"):
        assert accepted in msg


def test_wrong_kind_says_what_the_file_is(tiny_files):
    path = tiny_files["stage_c"][0]
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path, kinds=["stage_b"])
    msg = str(info.value)
    assert path.name in msg and "expected Stage B" in msg and "looks like Stage C" in msg
    accepted = msg.split("Files accepted here:")[1]
    assert "stage_b.safetensors" in accepted and "stage_c" not in accepted


def test_truncated_safetensors_is_one_line(tiny_files, tmp_path):
    data = tiny_files["stage_c"][0].read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path)
    _one_line(info, "half.safetensors", "truncated")


@pytest.mark.parametrize("content, needle", [
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "not a valid"),
    (struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64, "corrupt"),
    (struct.pack("<Q", 2) + b"[]", "corrupt"),
    (b"", "truncated"),
])
def test_garbage_file_is_one_line(tmp_path, content, needle):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path)
    _one_line(info, "garbage.safetensors", needle)


def test_garbage_pickle_is_one_line(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"PK\x03\x04 this is not a torch zip archive" * 10)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path)
    _one_line(info, "garbage.ckpt")


def test_shape_mismatch_lists_missing_unexpected_and_wrong_keys(tmp_path):
    state = tiny._random_module_state("stage_c", tiny.STAGE_C, seed=7)
    missing = "down_blocks.0.0.channelwise.4.bias"
    wrong = "clf.1.bias"
    missing_shape, wrong_shape = list(state[missing].shape), list(state[wrong].shape)
    del state[missing]
    state[wrong] = torch.zeros(wrong_shape[0] + 1)
    state["extra_head.weight"] = torch.zeros(5, 7)
    path = tmp_path / "edited_prior.safetensors"
    weights_io.save_safetensors(state, path, metadata=tiny._meta(stage_c=tiny.STAGE_C))
    (det,) = checkpoints.inspect(path)  # detection still succeeds: only the shape check objects
    assert det.kind == "stage_c" and det.config == tiny.STAGE_C
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path)
    msg = str(info.value)
    assert path.name in msg and "Stage C" in msg
    assert f"1 missing keys, e.g. {missing} {missing_shape}" in msg
    assert "1 unexpected keys, e.g. extra_head.weight [5, 7]" in msg
    assert f"{wrong}: file {[wrong_shape[0] + 1]} vs model {wrong_shape}" in msg


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(tmp_path / "nowhere.safetensors")
    _one_line(info, "nowhere.safetensors", "not found")


# ---------------------------------------------------------------- reader design: memory


class _CountingFile:
    """Wraps a binary file and counts the bytes read from it."""

    def __init__(self, fh, counter):
        self._fh, self._counter = fh, counter

    def readinto(self, buf):
        n = self._fh.readinto(buf)
        self._counter["bytes"] += n or 0
        return n

    def read(self, *args):
        data = self._fh.read(*args)
        self._counter["bytes"] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.fixture(scope="module")
def fp32_50mb(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(12)}
    state.update({f"layer{i}.bias": torch.randn(1024, generator=gen) for i in range(12)})
    state["counter"] = torch.tensor(7, dtype=torch.int64)
    path = tmp_path_factory.mktemp("big") / "fp32.safetensors"
    weights_io.save_safetensors(state, path)
    return path, state


def _count_reads(monkeypatch):
    counter = {"bytes": 0}
    real_open = open
    monkeypatch.setattr(weights_io, "open", lambda *a, **k: _CountingFile(real_open(*a, **k), counter), raising=False)
    return counter


def test_reader_reads_only_requested_keys(fp32_50mb, monkeypatch):
    path, state = fp32_50mb
    src = weights_io.SafetensorsFile(path)
    counter = _count_reads(monkeypatch)
    wanted = ["layer3.weight", "layer7.bias", "counter"]
    got = src.read(wanted)
    assert list(got) and set(got) == set(wanted)
    assert counter["bytes"] == sum(state[k].numel() * state[k].element_size() for k in wanted)
    assert all(torch.equal(got[k], state[k]) for k in wanted)


def test_reader_casts_tensor_by_tensor_without_keeping_file_buffers(fp32_50mb, monkeypatch):
    path, state = fp32_50mb
    src = weights_io.SafetensorsFile(path)
    counter = _count_reads(monkeypatch)
    got = src.read(dtype=torch.bfloat16, strip_prefix="layer")
    data_bytes = sum(v.numel() * v.element_size() for v in state.values())
    assert counter["bytes"] == data_bytes  # every byte read once, nothing else
    assert len(got) == len(state)
    for key, value in state.items():
        out = got[key[len("layer"):] if key.startswith("layer") else key]
        want = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert out.dtype == want.dtype and torch.equal(out, want), key
        # Each result owns exactly its own bytes: no view into an fp32 or whole-file buffer.
        assert out.untyped_storage().nbytes() == out.numel() * out.element_size(), key


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from wuerstchen.storage.weights_io import SafetensorsFile

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    src = SafetensorsFile(sys.argv[1])
    src.read(["layer0.bias"], dtype=torch.bfloat16)  # warm up lazily loaded code paths
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
    base = status("VmRSS")
    out = src.read(dtype=torch.bfloat16)
    print(json.dumps({"peak_increase": status("VmHWM") - base, "kept": sum(t.nbytes for t in out.values())}))
""")


def test_reader_peak_memory_is_output_plus_one_tensor(fp32_50mb):
    path, state = fp32_50mb
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    file_size = path.stat().st_size
    largest = max(v.numel() * v.element_size() for v in state.values())
    assert result["kept"] == sum(v.numel() * (2 if v.is_floating_point() else 8) for v in state.values())
    # Reading everything in fp32 first (then casting) would need >= file size; we need the bf16
    # results plus one fp32 tensor in flight (and a little allocator slack).
    assert result["peak_increase"] <= result["kept"] + largest + 4 * 2**20, (result, file_size)
    assert result["peak_increase"] < 0.75 * file_size


def test_diffusers_vqgan_codebook_name_loads_as_stage_a(tmp_path):
    """stable-cascade's vqgan/ folder (diffusers layout) names the codebook vquantizer.embedding."""
    import json as _json

    from wuerstchen.files import checkpoints as ck
    from wuerstchen.files import tiny as _tiny
    from wuerstchen.storage.weights_io import save_safetensors as _save

    manifest = _json.loads((MANIFEST_DIR / "wuerstchen_v2_vqgan.json").read_text())
    shapes = {k: tuple(v[0]) for k, v in manifest["keys"].items()}
    (det,) = ck.detect_parts(shapes)
    assert det.kind == "stage_a" and det.config["codebook_size"] == 8192
    state = _tiny._random_module_state("stage_a", _tiny.STAGE_A, 0)
    state["vquantizer.embedding.weight"] = state.pop("vquantizer.codebook.weight")
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    _save(state, path)
    loaded = ck.load(path)
    assert loaded.kind == "stage_a"
    assert torch.equal(loaded.module.vquantizer.codebook.weight, state["vquantizer.embedding.weight"])
