"""Recognising Würstchen v2 weights by keys and shapes (v2_layouts) on the full-size manifests and tiny vectors."""

import pytest
import torch

from conftest import MANIFEST_DIR, load_manifest, load_parity, load_v2
from wuerstchen.models import EfficientNetEncoder, WuerstchenDiffNeXt, WuerstchenPrior
from wuerstchen.models.wuerstchen_v2 import fuse_attention_keys
from wuerstchen.files.v2_layouts import (V2_CONTAINERS, detect_v2, detect_v2_decoder, detect_v2_prior, detect_v2_text,
                                   key_spelling)

BUILDERS = {"prior": WuerstchenPrior, "decoder": WuerstchenDiffNeXt}


def shapes_of(manifest):
    return {k: tuple(shape) for k, (shape, _) in manifest["keys"].items()}


@pytest.mark.parametrize("name, kind, spelling", [
    ("wuerstchen_v2_prior", "prior", "diffusers"),
    ("wuerstchen_v2_original_stage_c", "prior", "original"),
    ("wuerstchen_v2_decoder", "decoder", "diffusers"),
    ("wuerstchen_v2_original_stage_b", "decoder", "original"),
])
def test_full_size_files_are_recognised_and_their_config_read(name, kind, spelling):
    manifest = load_manifest(name)
    shapes = shapes_of(manifest)
    assert key_spelling(shapes) == spelling
    found, config = detect_v2(shapes)
    assert found == kind
    expected = {k: v for k, v in manifest["config"].items() if k != "self_attn"}
    assert {k: v for k, v in config.items() if k in expected} == expected
    with torch.device("meta"):  # what the loader will do: build from the config, fill from the file
        model = BUILDERS[kind](**config)
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()}, strict=True, assign=True)


def test_v2_effnet_inside_the_stage_b_file():
    manifest = load_manifest("wuerstchen_v2_original_stage_b")
    assert set(manifest["checkpoint_container"]["load"].split("'")[1::2]) <= set(V2_CONTAINERS)
    shapes = shapes_of(manifest["extra_state_dicts"]["effnet_state_dict"])
    kind, config = detect_v2(shapes)
    assert (kind, config) == ("effnet", {"c_latent": 16, "family": "v2"})
    with torch.device("meta"):
        EfficientNetEncoder(**config).load_state_dict(
            {k: torch.empty(s, device="meta") for k, s in shapes.items()}, strict=True, assign=True)


STABLE_CASCADE_AND_SHARED = sorted(p.stem for p in MANIFEST_DIR.glob("*.json") if not p.stem.startswith("wuerstchen_v2"))


@pytest.mark.parametrize("name", STABLE_CASCADE_AND_SHARED + ["wuerstchen_v2_vqgan", "wuerstchen_v2_original_vqgan"])
def test_stable_cascade_files_and_the_vqgan_are_not_claimed(name):
    # The v2 VQGAN is Stable Cascade's stage A layout: the family picks its scale, not the file.
    assert detect_v2(shapes_of(load_manifest(name))) is None


@pytest.mark.parametrize("fused", [False, True], ids=["diffusers_keys", "original_keys"])
def test_tiny_vectors_round_trip(fused):
    for name, detect in (("v2_prior", detect_v2_prior), ("v2_decoder", detect_v2_decoder)):
        meta, sd, _ = load_v2(name)
        heads = meta["config"]["nhead"]  # not readable from shapes at tiny widths
        sd = dict(sd)
        if fused:
            fuse_attention_keys(sd)
        config = detect({k: tuple(v.shape) for k, v in sd.items()}, heads=heads)
        unreadable = ("dropout",)  # the released value is assumed
        assert {k: v for k, v in config.items() if k not in unreadable} == \
            {k: v for k, v in meta["config"].items() if k not in unreadable}, name


def test_text_towers():
    for name in ("v2_clip_text_prior", "v2_clip_text_decoder"):
        meta, sd, _ = load_v2(name)
        kind, config = detect_v2({k: tuple(v.shape) for k, v in sd.items()})
        assert kind == "text" and config["projection_dim"] is None and config["role"] == "custom"  # tiny widths
        assert config["width"] == meta["config"]["hidden_size"]
    _, with_projection, _ = load_parity("clip_text")  # Stable Cascade's tower (with projection)
    assert detect_v2_text({k: tuple(v.shape) for k, v in with_projection.items()}) is None
    bigg = {"text_model.embeddings.token_embedding.weight": (49408, 1280),
            "text_model.embeddings.position_embedding.weight": (77, 1280)}
    assert detect_v2_text(bigg)["role"] == "prior" and detect_v2_text(bigg)["heads"] == 20
