"""Crafted and unusual weight files: every one refused with one clear line, before any work.

Headers are written by hand (the official ``safetensors`` library, used as an independent
judge, refuses every malformed one too); files that are not regular files (FIFOs, devices,
folders, link loops, broken links) are refused before they are opened, under a deadline so a
regression hangs no one; NaN/inf weights and integer weights in float slots are named by
tensor. One bad file in a models folder is skipped with a warning, and symlinked model stores
are followed by the scanner and the node loaders.
"""

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import struct

import pytest
import torch
from safetensors.torch import load_file

from nodes import host
from nodes.host import NodeError
from wuerstchen import lora
from wuerstchen.files import checkpoints
from wuerstchen import cli
from wuerstchen.storage import safetensors_header
from wuerstchen.files import tiny
from wuerstchen.storage import weights_io
from wuerstchen.pipeline.cascade import scan_models
from wuerstchen.files.checkpoints import CheckpointError
from wuerstchen.files.management import ModelManager
from wuerstchen.files.model_files import SkippedFile

D8 = b"\0" * 8


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def write_raw(path, header, data=D8):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, f"error spans several lines: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def refused(path, *needles, **load_kwargs):
    """checkpoints.load refuses ``path`` with one line naming the file and the needles."""
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path, **load_kwargs)
    return one_line(info, path.name, *needles)


def library_refuses(path):
    with pytest.raises(Exception):
        load_file(str(path))


@contextlib.contextmanager
def deadline(seconds=10):
    """Fail instead of hanging (opening a FIFO blocks until a writer comes)."""
    def expired(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- the header, against the format


def test_deeply_nested_header_is_refused_without_recursion(tmp_path):
    deep = b'{"__metadata__":{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}}"
    path = write_raw(tmp_path / "deep.safetensors", deep, b"")
    refused(path, "nested more than")
    library_refuses(path)
    # Brackets inside strings are text, not nesting: this file is valid and loads.
    text = '\\"[' * 5000 + "{" * 5000
    ok = write_raw(tmp_path / "text.safetensors", {"__metadata__": {"note": text}, "a": entry()})
    assert weights_io.SafetensorsFile(ok).metadata["note"] == text


@pytest.mark.parametrize("key, value", [
    ("wuerstchen_config", "[" * 100_000),  # read by checkpoint detection
    ("lora_adapter_metadata", '{"a":' * 100_000),  # read by the LoRA loader
])
def test_deeply_nested_json_in_a_metadata_value_is_refused(tmp_path, key, value):
    state = tiny._random_module_state("previewer", tiny.PREVIEWER, 0)
    path = tmp_path / "meta_json.safetensors"
    weights_io.save_safetensors(state, path, metadata={key: value})
    refused(path, f"metadata value {key!r} holds JSON nested more than 64 levels deep")
    with pytest.raises(lora.LoraError, match="nested more than 64"):
        lora.load_lora(path)
    # Brackets in plain text, and JSON of ordinary depth, are fine.
    weights_io.save_safetensors(state, path, metadata={key: "a photo " + "[" * 100, "j": "[" * 60 + "]" * 60,
                                                       "prompt": "[cat:dog:0.5] on a mat"})
    assert checkpoints.load(path).kind == "previewer"


@pytest.mark.parametrize("metadata, needle", [
    ({"wuerstchen_config": 5}, "metadata value 'wuerstchen_config' is a JSON number"),
    ({"a": {"b": "c"}}, "metadata value 'a' is a JSON object"),
    ({"a": ["x"]}, "metadata value 'a' is a JSON array"),
    ({"a": True}, "metadata value 'a' is a JSON boolean"),
    ({"a": None}, "metadata value 'a' is a JSON null"),
    (5, "__metadata__ is a JSON number"),
    ("text", "__metadata__ is a JSON string"),
    ([["a", "b"]], "__metadata__ is a JSON array"),
])
def test_metadata_must_be_a_flat_string_object(tmp_path, metadata, needle):
    path = write_raw(tmp_path / "meta.safetensors", {"__metadata__": metadata, "a": entry()})
    refused(path, needle)
    library_refuses(path)


def test_metadata_null_or_absent_is_empty(tmp_path):
    for header in ({"__metadata__": None, "a": entry()}, {"a": entry()}):
        assert weights_io.SafetensorsFile(write_raw(tmp_path / "m.safetensors", header)).metadata == {}


@pytest.mark.parametrize("header, needle", [
    ({"a": 5}, "tensor 'a' is a JSON number, not an object"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "tensor 'a' has no data_offsets"),
    ({"a": entry(dtype=5)}, "unknown dtype 5"),
    ({"a": entry(dtype="F13")}, "unknown dtype 'F13'"),
    ({"a": entry(shape=[-2])}, "shape [-2]"),
    ({"a": entry(shape=[2.0])}, "shape [2.0]"),
    ({"a": entry(shape=[True, 2])}, "shape [True, 2]"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "shape '2'"),
    ({"a": entry(offsets=[0])}, "data_offsets [0]"),
    ({"a": entry(offsets=[0, 8, 8])}, "data_offsets [0, 8, 8]"),
    ({"a": entry(offsets=[8, 0])}, "data_offsets [8, 0]"),
    ({"a": entry(offsets=[-8, 0])}, "data_offsets [-8, 0]"),
    ({"a": entry(offsets=[0, 8.0])}, "data_offsets [0, 8.0]"),
    ({"a": entry(shape=[3])}, "spans 8 bytes, but F32 [3] needs 12"),
    (b'{"a":' + json.dumps(entry()).encode() + b',"a":' + json.dumps(entry()).encode() + b"}", "'a' appears twice"),
    (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', "NaN is not allowed"),
    (b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', "not valid JSON"),
    (b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "not UTF-8"),
    (b'["a"]', "not a JSON object"),
])
def test_every_header_entry_is_checked(tmp_path, header, needle):
    path = write_raw(tmp_path / "entry.safetensors", header)
    refused(path, "corrupt safetensors header", needle)
    if b"appears twice" not in needle.encode():  # the library keeps one of two equal names; we refuse
        library_refuses(path)


@pytest.mark.parametrize("header, data, needle", [
    ({"a": entry(), "b": entry()}, D8, "tensors 'a' and 'b' share bytes 0..8"),
    ({"a": entry(shape=[4], offsets=[0, 16]), "b": entry(offsets=[8, 16])}, b"\0" * 16, "'a' and 'b' share bytes 8..16"),
    ({"a": entry(), "z": entry(shape=[0], offsets=[4, 4])}, D8, "'a' and 'z' share bytes"),
    ({"a": entry(), "b": entry(offsets=[12, 20])}, b"\0" * 20, "data bytes 8..12 (before tensor 'b') belong to no tensor"),
    ({"a": entry(offsets=[4, 12])}, b"\0" * 12, "data bytes 0..4"),
])
def test_tensors_tile_the_data_without_overlaps_or_holes(tmp_path, header, data, needle):
    path = write_raw(tmp_path / "tiles.safetensors", header, data)
    refused(path, needle)
    library_refuses(path)


def test_bytes_after_the_last_tensor_are_refused(tmp_path):
    path = write_raw(tmp_path / "tail.safetensors", {"a": entry()}, D8 + b"\0" * 12)
    refused(path, "12 bytes follow the last tensor")
    library_refuses(path)


def test_valid_edge_cases_are_accepted_like_the_library_does(tmp_path):
    header = {"__metadata__": {"k": "v"}, "z0": entry(shape=[0], offsets=[0, 0]), "a": entry(),
              "s": entry(shape=[], offsets=[8, 12]), "z1": entry(shape=[3, 0], offsets=[12, 12]),
              "b": {**entry(dtype="BF16", shape=[2], offsets=[12, 16]), "note": "extra fields are allowed"}}
    raw = json.dumps(header).encode() + b"   "  # space padding, as writers align the data
    data = torch.tensor([1.5, -2.0]).numpy().tobytes() + torch.tensor(3.0).numpy().tobytes() \
        + torch.tensor([1.0, 2.0], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    path = write_raw(tmp_path / "edge.safetensors", raw, data)
    expected = load_file(str(path))
    got = weights_io.SafetensorsFile(path).read()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_unsupported_dtype_is_named_not_called_corrupt(tmp_path):
    path = write_raw(tmp_path / "e8m0.safetensors", {"a": entry(dtype="F8_E8M0", offsets=[0, 2])}, b"\0\0")
    msg = refused(path, "tensor 'a' is stored as F8_E8M0, which this loader cannot read", "BF16")
    assert "corrupt" not in msg


def _random_doc(rng, depth=0):
    """A random JSON value whose strings are full of brackets, quotes and backslashes."""
    pick = rng.random()
    if depth > 6 or pick < 0.3:
        return "".join(rng.choice('[]{}"\\a') for _ in range(rng.randrange(0, 8)))
    if pick < 0.65:
        return [_random_doc(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {_random_doc(rng, 7): _random_doc(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def _true_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_true_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_true_depth, value.values()), default=0)
    return 0


def _parser_reach(text: bytes) -> int:
    """How deep a JSON parser gets before the first character outside a string that JSON forbids
    there (a backslash); a character-by-character reference for invalid text."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x5C:
            break
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


@pytest.mark.parametrize("chunk", [3, 7, 1 << 18])
def test_json_depth_is_exact_for_json_and_never_short_for_garbage(monkeypatch, chunk):
    """The vectorised scan, with chunk borders cutting through backslash runs and strings."""
    monkeypatch.setattr(safetensors_header, "_CHUNK", chunk)
    rng = random.Random(chunk)
    for _ in range(300):
        doc = _random_doc(rng)
        text = json.dumps(doc).encode()
        assert safetensors_header.json_depth(text, 10**6) == _true_depth(doc), text
    for _ in range(300):
        text = bytes(rng.choice(b'[]{}"\\\\a') for _ in range(rng.randrange(0, 60)))
        assert safetensors_header.json_depth(text, 10**6) >= _parser_reach(text), text
    # Stops within a chunk of passing the limit: a million brackets cost one chunk.
    assert 8 < safetensors_header.json_depth(b"[" * 1_000_000, 8) <= 8 + chunk


# ---------------------------------------------------------------- files that are not regular files


def test_fifo_is_refused_before_opening(tmp_path):
    for name in ("pipe.pt", "pipe.safetensors"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        with deadline():
            refused(fifo, "is a named pipe (FIFO), not a weight file")
            with pytest.raises(lora.LoraError, match="named pipe"):
                lora.load_lora(fifo)


def test_device_is_refused(tmp_path):
    for name in ("zero.pt", "zero.safetensors"):
        link = tmp_path / name
        os.symlink("/dev/zero", link)
        with deadline():
            refused(link, "is a device")


def test_folder_loop_and_broken_link_say_what_they_are(tmp_path):
    (tmp_path / "folder.safetensors").mkdir()
    refused(tmp_path / "folder.safetensors", "is a folder")
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop, loop)
    refused(loop, "symlink loop")
    broken = tmp_path / "gone.pt"
    os.symlink(tmp_path / "nowhere.pt", broken)
    msg = refused(broken, "broken symlink", "nowhere.pt")
    assert "not found" not in msg


def test_a_symlinked_file_loads(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    real = tiny.write_tiny_models(store)[0]
    link = tmp_path / "linked.safetensors"
    os.symlink(real, link)
    assert checkpoints.load(link).kind == checkpoints.load(real).kind


# ---------------------------------------------------------------- tensor values and types


def _previewer_state():
    return tiny._random_module_state("previewer", tiny.PREVIEWER, 0)


def _save(state, path):
    if path.suffix == ".pt":
        torch.save(state, path)
    else:
        weights_io.save_safetensors(state, path, metadata=tiny._meta(previewer=tiny.PREVIEWER))
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_nan_or_inf_weights_name_the_first_bad_tensor(tmp_path, suffix, dtype):
    state = _previewer_state()
    keys = [k for k, v in state.items() if v.is_floating_point()]
    first, later = keys[3], keys[-2]
    state[first] = state[first].clone()
    state[first].view(-1)[-1] = float("inf")
    state[first].view(-1)[0] = float("-inf")
    state[later] = state[later].clone()
    state[later].view(-1)[1] = float("nan")
    path = _save(state, tmp_path / f"bad{suffix}")
    refused(path, f"tensor {first!r} holds 2 NaN/inf value(s) of {state[first].numel()}", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_bit_level_finiteness_test_agrees_with_torch(dtype, monkeypatch):
    """Every special value (NaN payloads of both signs, ±inf, ±max, subnormals, ±0) at chunk
    borders and inside chunks, judged against torch.isfinite."""
    monkeypatch.setattr(weights_io, "_READ_CHUNK", 64)
    info = torch.finfo(dtype)
    bits_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[info.bits // 8]
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), info.max, -info.max, info.tiny / 4, 0.0,
                             -0.0, info.tiny], dtype=dtype)
    payload_nans = specials[:1].repeat(3)
    payload_nans.view(bits_dtype)[1] |= 1  # a quiet NaN with a payload
    payload_nans.view(bits_dtype)[2] = -1  # all bits set: a negative NaN
    values = torch.cat([specials, payload_nans])
    base = torch.randn(100, dtype=torch.float64).to(dtype)
    for position in (0, 7, 31, 32, 33, 63, 64, 99):
        for value in values:
            t = base.clone()
            t[position] = value
            assert weights_io._all_finite(t) == bool(torch.isfinite(t).all()), (position, value)
    assert weights_io._all_finite(base[::3].view(1, -1))  # a strided view
    assert weights_io._all_finite(torch.empty(0, dtype=dtype))


def test_nan_in_a_lora_is_refused(tmp_path):
    path = tmp_path / "nan_lora.safetensors"
    tiny.write_tiny_lora(path, "official", tiny.STAGE_C, rank=2)
    tensors = load_file(str(path))
    key = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[key].view(-1)[0] = float("nan")
    weights_io.save_safetensors(tensors, path)
    with pytest.raises(lora.LoraError) as info:
        lora.load_lora(path)
    one_line(info, "nan_lora.safetensors", repr(key), "NaN/inf")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_integer_tensor_where_the_model_has_floats(tmp_path, suffix, dtype):
    state = _previewer_state()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].to(torch.int32)
    path = _save(state, tmp_path / f"int{suffix}")
    refused(path, "1 tensor(s) of Stage C previewer", "stored as I32", repr(key), "quantized or damaged", dtype=dtype)


def test_integer_tensor_in_a_clip_text_encoder(tmp_path):
    state = tiny.text_encoder_state()
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key] = state[key].to(torch.int16)
    path = tmp_path / "model.safetensors"
    weights_io.save_safetensors(state, path, metadata=tiny._meta(clip_text=tiny.TEXT))
    refused(path, "stored as I16", repr(key))


def test_float_counters_still_load(tmp_path):
    """BatchNorm's num_batches_tracked saved as float by an 'everything to fp16' converter is harmless."""
    state = {k: (v.half() if k.endswith("num_batches_tracked") else v) for k, v in _previewer_state().items()}
    assert checkpoints.load(_save(state, tmp_path / "halfcounters.safetensors")).kind == "previewer"


# ---------------------------------------------------------------- one bad file in a models folder


def _bad_files(folder, good_stage_b):
    """One of every kind of unusable file; returns {name: reason needle}."""
    folder.mkdir(parents=True, exist_ok=True)
    write_raw(folder / "deep.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"")
    write_raw(folder / "meta_number.safetensors", {"__metadata__": {"wuerstchen_config": 5}, "a": entry()})
    write_raw(folder / "meta_list.safetensors", {"__metadata__": [["a", "b"]], "a": entry()})
    write_raw(folder / "shared_bytes.safetensors", {"a": entry(), "b": entry()})
    write_raw(folder / "e8m0.safetensors", {"a": entry(dtype="F8_E8M0", offsets=[0, 2])}, b"\0\0")
    os.mkfifo(folder / "pipe.pt")
    os.symlink(folder / "loop.safetensors", folder / "loop.safetensors")
    os.symlink(folder / "nowhere.safetensors", folder / "broken.safetensors")
    data = good_stage_b.read_bytes()
    (folder / "stage_b_half.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "junk.ckpt").write_bytes(b"PK\x03\x04 not a zip" * 10)
    return {"deep": "nested", "meta_number": "metadata value", "meta_list": "__metadata__ is a JSON array",
            "shared_bytes": "share bytes", "e8m0": "F8_E8M0", "pipe": "named pipe", "loop": "symlink loop",
            "broken": "broken symlink", "stage_b_half": "truncated", "junk": "cannot be read safely"}


@pytest.fixture(scope="module")
def models_with_bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    tiny.write_tiny_models(root)
    needles = _bad_files(root / "downloads", root / "stage_b.safetensors")
    return root, needles


def test_scan_skips_each_bad_file_with_a_warning(models_with_bad_files, caplog):
    root, needles = models_with_bad_files
    skipped = []
    with caplog.at_level(logging.WARNING, logger="wuerstchen"), deadline(60):
        found = scan_models(root, skipped)
    for kind in ("stage_c", "stage_b", "stage_a", "effnet", "previewer", "clip_text", "clip_vision", "controlnet"):
        assert kind in found, kind
    by_name = {s.path.stem: s for s in skipped}
    assert set(by_name) == set(needles)
    logged = caplog.text
    for name, needle in needles.items():
        record = by_name[name]
        assert needle in record.reason, (name, record.reason)
        assert "\n" not in record.reason
        assert f"skipped {record.path}: {record.reason}" in logged
    half = by_name["stage_b_half"]
    assert half.kinds == ("stage_b",)
    assert "Stage B" in half.describe() and "was found but cannot be used: file is truncated" in half.describe()
    assert by_name["deep"].kinds == ()


def test_cli_runs_although_the_models_folder_holds_bad_files(models_with_bad_files, tmp_path, capsys):
    root, needles = models_with_bad_files
    out = tmp_path / "img.png"
    with deadline(120):
        rc = cli.main(["generate", "--prompt", "a cat", "--models", str(root), "--out", str(out), "--width", "64",
                       "--height", "64", "--c-steps", "1", "--b-steps", "1"])
    assert rc == 0 and out.exists()


def test_a_truncated_part_is_reported_as_truncated(tmp_path):
    src = tmp_path / "src"
    written = {p.name: p for p in tiny.write_tiny_models(src)}
    data = written["stage_b.safetensors"].read_bytes()
    models = tmp_path / "models"
    models.mkdir()
    (models / "stage_b.safetensors").write_bytes(data[:-100])
    skipped = []
    assert "stage_b" not in scan_models(models, skipped)
    (record,) = skipped
    assert record.kinds == ("stage_b",)
    assert record.describe().startswith(f"{models / 'stage_b.safetensors'} (Stage B (latent decoder)) was found")
    assert "100 bytes of tensor data missing" in record.describe()


def test_scan_follows_folder_links_and_survives_link_cycles(tmp_path):
    store = tmp_path / "store"
    tiny.write_tiny_models(store)
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(store, models / "shared")
    os.symlink(models, models / "shared_again")  # a cycle back to the top
    os.symlink(store / "stage_a.safetensors", models / "my_stage_a.safetensors")
    with deadline(60):
        found = scan_models(models)
    assert any(p.name == "stage_c.safetensors" and "shared" in p.parts for p, _ in found["stage_c"])
    assert models / "my_stage_a.safetensors" in [p for p, _ in found["stage_a"]]


def test_skipped_file_from_an_unexpected_error_keeps_one_line():
    record = SkippedFile.from_error(host.Path("/m/x.safetensors"), RuntimeError("x.safetensors: boom\nmore"))
    assert record.reason == "boom" and record.kinds == ()


# ---------------------------------------------------------------- node loaders and symlinks


@pytest.fixture
def node_models(tmp_path):
    """A models root whose wuerstchen folder links into a shared store, with broken entries."""
    st = host.state()
    saved = (st.models_root, st.manager)
    store = tmp_path / "store"
    written = {p.relative_to(store).as_posix(): p for p in tiny.write_tiny_models(store)}
    own = tmp_path / "models" / "wuerstchen"
    own.mkdir(parents=True)
    os.symlink(written["stage_a.safetensors"], own / "linked_stage_a.safetensors")
    os.symlink(store / "controlnet", own / "shared_controlnets")
    os.symlink(own / "loop.safetensors", own / "loop.safetensors")
    os.symlink(store / "missing.safetensors", own / "broken.safetensors")
    os.mkfifo(own / "pipe.safetensors")
    shutil.copy(written["stage_a.safetensors"], own / "notes.txt")
    host.configure(tmp_path / "models", manager=ModelManager())
    try:
        yield own
    finally:
        st.models_root, st.manager = saved


def test_symlinked_files_and_folders_are_listed_and_load(node_models):
    with deadline(60):
        stage_a_names = host.list_models("stage_a")
        controlnet_names = host.list_models("controlnet")
    assert "linked_stage_a.safetensors" in stage_a_names
    assert "shared_controlnets/canny.safetensors" in controlnet_names
    for names in (stage_a_names, controlnet_names):
        assert not {"loop.safetensors", "broken.safetensors", "pipe.safetensors"} & set(names)
    from nodes import NODE_CLASS_MAPPINGS

    stage_a = NODE_CLASS_MAPPINGS["WuerstchenStageALoader"]().load("linked_stage_a.safetensors")[0]
    assert stage_a.model.kind == "stage_a"
    path = host.resolve_model("controlnet", "shared_controlnets/canny.safetensors")
    assert path == node_models / "shared_controlnets" / "canny.safetensors"  # spelled as listed


@pytest.mark.parametrize("name, needle", [
    ("loop.safetensors", "symlink loop"),
    ("broken.safetensors", "broken symlink"),
    ("pipe.safetensors", "named pipe"),
])
def test_unusable_entries_are_explained_by_the_loader(node_models, name, needle):
    with deadline(), pytest.raises(NodeError) as info:
        host.resolve_model("stage_a", name)
    one_line(info, name, needle)


@pytest.mark.parametrize("name", ["notes.txt", "../store/stage_a.safetensors", "ABSOLUTE", "a\0b.safetensors"])
def test_names_not_in_the_list_are_still_refused(node_models, name):
    if name == "ABSOLUTE":
        name = str(node_models / "linked_stage_a.safetensors")
    with pytest.raises(NodeError, match="is not a model file from the list"):
        host.resolve_model("stage_a", name)


def test_a_truncated_model_is_reported_as_truncated_not_missing(tmp_path, capsys):
    """The CLI's missing-weights message names the unusable file and why, under the kind it holds."""
    from wuerstchen import cli
    from wuerstchen.files import tiny

    models = tmp_path / "models"
    tiny.write_tiny_models(models)
    for name in ("stage_b_bf16.safetensors", "stage_b_lite.safetensors", "stage_b_lite_bf16.safetensors",
                 "stable_cascade_stage_b.safetensors"):
        (models / name).unlink()
    raw = (models / "stage_b.safetensors").read_bytes()
    (models / "stage_b.safetensors").write_bytes(raw[: len(raw) - 100])
    rc = cli.main(["generate", "--prompt", "a cat", "--models", str(models), "--out", str(tmp_path / "o.png"),
                   "--width", "64", "--height", "64", "--c-steps", "1", "--b-steps", "1", "--family", "v3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Stage B" in err and "stage_b.safetensors" in err and "truncated" in err
    assert not (tmp_path / "o.png").exists()
