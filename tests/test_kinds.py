"""The table of model kinds is what detection, tiny-models, the missing-weights message and the
node host read: each consumer is checked against the table, not against a second list."""

import pytest
import torch

from wuerstchen import checkpoints, kinds, tiny
from wuerstchen.cascade import CascadeFiles, MissingWeightsError
from wuerstchen.weights_io import WeightSource


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_release")
    tiny.write_tiny_models(root)
    return root


def test_every_official_file_is_written_and_detected_as_its_kind(tiny_dir):
    names = [(kind, f) for kind in kinds.KINDS.values() for f in kind.files]
    assert len(names) == 16  # the Stable Cascade release: 4 + 4 Stage C/B files, 3 ControlNets, 5 others
    for kind, file in names:
        path = tiny_dir / file.name
        (det,) = checkpoints.inspect(path)
        assert det.kind == kind.name, file.name
        assert tiny.TINY_CONFIGS[(kind.name, file.variant)] == det.config or kind.anywhere
        stored = {t.dtype for t in WeightSource(path).read().values() if t.is_floating_point()}
        assert stored == {file.dtype}, file.name


def test_bundles_hold_their_parts_under_their_prefixes(tiny_dir):
    for bundle in kinds.BUNDLES:
        found = {d.kind: d.prefix for d in checkpoints.inspect(tiny_dir / bundle.name)}
        assert found == dict(bundle.parts)


def test_kind_markers_tell_the_official_manifests_apart(manifest_dir):
    """Each official layout is identified by exactly one kind's markers."""
    import json

    for path in sorted(manifest_dir.glob("*.json")):
        if path.name.startswith("wuerstchen_v2"):  # v2 kinds are not in the table yet
            continue
        shapes = {k: tuple(v[0]) for k, v in json.loads(path.read_text())["keys"].items()}
        matching = [k.name for k in kinds.KINDS.values() if k.identifies(shapes)]
        assert len(matching) == 1, (path.name, matching)


def test_missing_weights_message_comes_from_the_table(tmp_path):
    files = CascadeFiles.from_dir(tmp_path)
    with pytest.raises(MissingWeightsError) as info:
        files.require(["stage_c", "effnet"], tmp_path)
    text = str(info.value)
    for name in ("stage_c", "effnet"):
        kind = kinds.get(name)
        assert kind.title in text and kind.download in text
        assert all(f.name in text for f in kind.files)
    assert "img2img only" in text


def test_node_folders_come_from_the_table():
    from nodes import host

    for name, kind in kinds.KINDS.items():
        assert host.FOLDERS[name][0] == kinds.OWN_FOLDER
        assert host.FOLDERS[name] == kind.folder_list()


def test_fp16_guard_is_switched_on_for_the_kinds_that_need_it(tiny_dir):
    from wuerstchen.management import ModelManager

    mgr = ModelManager(cache_budget=None)
    for name, kind in kinds.KINDS.items():
        if kind.build is None:
            continue
        model = mgr.load(tiny_dir / kind.files[0].name, [name], torch.float16)
        assert getattr(model.module, "fp16_guard", False) == kind.fp16_guard, name
