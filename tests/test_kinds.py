"""The table of model kinds is what detection, tiny-models, the missing-weights message and the
node host read: each consumer is checked against the table, not against a second list."""

import pytest
import torch

from wuerstchen.files import checkpoints
from wuerstchen.files import kinds
from wuerstchen.files import tiny
from wuerstchen.files import v2_layouts
from wuerstchen.pipeline.cascade import CascadeFiles, MissingWeightsError
from wuerstchen.storage.weights_io import WeightSource


def test_every_official_file_is_written_and_detected_as_its_kind(tiny_dir):
    names = [(kind, f) for kind in kinds.KINDS.values() for f in kind.files]
    by_family = {}
    for kind, f in names:
        by_family.setdefault(kind.family_of(f), set()).add(f.name)
    # Stable Cascade: 4 + 4 Stage C/B files, 3 ControlNets, 5 others. Würstchen v2: the hub's prior,
    # decoder, VQGAN and two text towers, and the 5 original .pt files (stage B holds two networks).
    assert {family: len(files) for family, files in by_family.items()} == {
        kinds.STABLE_CASCADE: 16, kinds.WUERSTCHEN_V2: 10}
    for kind, file in names:
        path = tiny_dir / file.name
        det = {d.kind: d for d in checkpoints.inspect(path)}[kind.name]
        assert det.prefix == (file.container + "." if file.name in {b.name for b in kinds.BUNDLES} else "")
        assert tiny.TINY_CONFIGS[(kind.name, file.variant)] == det.config or kind.anywhere
        stored = {t.dtype for t in WeightSource(path).read().values() if t.is_floating_point()}
        assert stored == {file.dtype}, file.name


def test_v2_files_keep_their_release_spelling_and_containers(tiny_dir):
    """Hub files in the diffusers spelling (q/k/v split, VQGAN codebook 'embedding'); the original .pt
    files are plain dicts of tensor dicts under their containers, in the original spelling."""
    for kind in kinds.KINDS.values():
        for file in kind.files_of(kinds.WUERSTCHEN_V2):
            path = tiny_dir / file.name
            if file.container:
                raw = torch.load(path, map_location="cpu", weights_only=True)
                bundle = next((b for b in kinds.BUNDLES if b.name == file.name), None)
                expected = {p.rstrip(".") for p in bundle.parts.values()} if bundle else {file.container}
                assert set(raw) == expected, file.name
                keys = list(raw[file.container])
                assert all(isinstance(t, torch.Tensor) for t in raw[file.container].values())
            else:
                keys = list(WeightSource(path).shapes())
            if kind.name in ("v2_prior", "v2_decoder"):
                assert v2_layouts.key_spelling(dict.fromkeys(keys)) == (file.spelling or "original"), file.name
            if kind.name == "stage_a":
                assert ("vquantizer.embedding.weight" in keys) == (file.spelling == "diffusers"), file.name


def test_bundles_hold_their_parts_under_their_prefixes(tiny_dir):
    for bundle in kinds.BUNDLES:
        found = {d.kind: d.prefix for d in checkpoints.inspect(tiny_dir / bundle.name)}
        assert found == dict(bundle.parts)


def test_kind_markers_tell_the_official_manifests_apart(manifest_dir):
    """Each official layout is identified by exactly one kind's markers."""
    import json

    for path in sorted(manifest_dir.glob("*.json")):
        manifest = json.loads(path.read_text())
        layouts = [manifest] + list(manifest.get("extra_state_dicts", {}).values())  # v2 stage B: + EfficientNet
        for layout in layouts:
            shapes = {k: tuple(v[0]) for k, v in layout["keys"].items()}
            matching = [k.name for k in kinds.KINDS.values() if k.identifies(shapes)]
            assert len(matching) == 1, (path.name, matching)
            if path.name.startswith("wuerstchen_v2"):  # the VQGAN is Stable Cascade's Stage A layout
                assert matching[0] == "stage_a" if "vqgan" in path.name else kinds.get(matching[0]).family == \
                    kinds.WUERSTCHEN_V2, (path.name, matching)


def test_missing_weights_message_comes_from_the_table(tmp_path):
    files = CascadeFiles.from_dir(tmp_path)
    with pytest.raises(MissingWeightsError) as info:
        files.require(["stage_c", "effnet", "stage_a"], tmp_path)
    text = str(info.value)
    for name in ("stage_c", "effnet", "stage_a"):
        kind = kinds.get(name)
        assert kind.title in text and kind.download in text
        assert all(f.name in text for f in kind.files_of(kinds.STABLE_CASCADE))
    assert "img2img only" in text and "vqgan_f4_v1_500k.pt" not in text  # the VQGAN's v2 files: v2 only


def test_missing_v2_weights_name_each_files_source(tmp_path):
    files = CascadeFiles.from_dir(tmp_path)
    with pytest.raises(MissingWeightsError) as info:
        files.require(["v2_prior", "stage_a", "v2_effnet"], tmp_path, family=kinds.WUERSTCHEN_V2)
    text = str(info.value)
    assert "stage_a.safetensors" not in text
    for name in ("v2_prior", "stage_a", "v2_effnet"):
        for download, names in kinds.get(name).sources(kinds.WUERSTCHEN_V2):
            assert download in text and all(n in text for n in names)
    assert "wuerstchen-prior/prior/diffusion_pytorch_model.safetensors" in text and kinds.HF_WUERSTCHEN_ORIGINAL in text


def test_node_folders_come_from_the_table():
    from nodes import host

    for name, kind in kinds.KINDS.items():  # a loader lists the folders of every kind that fills its role
        assert host.FOLDERS[kind.slot][0] == kinds.OWN_FOLDER
        assert set(kind.folder_list()) <= set(host.FOLDERS[kind.slot])
    for role in ("stage_c", "stage_b", "effnet", "clip_text"):
        assert set(host.FOLDERS[role]) == {f for k in kinds.kinds_of_role(role) for f in kinds.get(k).folder_list()}
        assert {kinds.get(k).family for k in kinds.kinds_of_role(role)} == {kinds.STABLE_CASCADE, kinds.WUERSTCHEN_V2}


def test_fp16_guard_is_switched_on_for_the_kinds_that_need_it(tiny_dir):
    from wuerstchen.files.management import ModelManager

    mgr = ModelManager(cache_budget=None)
    for name, kind in kinds.KINDS.items():
        if kind.build is None:
            continue
        model = mgr.load(tiny_dir / kind.files[0].name, [name], torch.float16)
        assert getattr(model.module, "fp16_guard", False) == kind.fp16_guard, name
