"""The layered-editing nodes on tiny models: decompose, transform, fuse, edit-aware Stage B, and their errors."""

import pytest
import torch

from editing_helpers import box_mask, picture
from node_helpers import load, run
from nodes import NODE_CLASS_MAPPINGS, host
from nodes.host import NodeError
from wuerstchen.files import tiny
from wuerstchen.files.management import ModelManager

SIZE = (256, 256)
EDITING = ("WuerstchenLayerDecompose", "WuerstchenLayerTransform", "WuerstchenLayerFuse",
           "WuerstchenEditStageBSampler")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny.write_tiny_models(root / "wuerstchen")
    host.configure(root, manager=ModelManager())
    stage_c = load("WuerstchenStageCLoader", "stage_c.safetensors", dtype="auto")
    clip = load("WuerstchenCLIPTextLoader", "text_encoder/model.safetensors", dtype="auto")
    return dict(
        stage_c=stage_c, effnet=load("WuerstchenSemanticCompressorLoader", "effnet_encoder.safetensors"),
        stage_b=load("WuerstchenStageBLoader", "stage_b.safetensors", dtype="auto"),
        stage_a=load("WuerstchenStageALoader", "stage_a.safetensors"),
        positive=run("WuerstchenTextEncode", clip=clip, text="a ball and a cup")[0],
        negative=run("WuerstchenTextEncode", clip=clip, text="")[0])


def image_in():
    return picture(SIZE, seed=4).permute(0, 2, 3, 1)  # ComfyUI IMAGE


def decompose(models, masks, **extra):
    values = dict(stage_c=models["stage_c"], semantic_compressor=models["effnet"], positive=models["positive"],
                  image=image_in(), steps=6, refine=1, dilate=1, canvas="none", pan_x=0, pan_y=0, zoom=0.75)
    values.update(extra)
    return run("WuerstchenLayerDecompose", **values, **masks)


def transform(layers, layer, **extra):
    values = dict(layers=layers, layer=layer, dx=0, dy=0, scale=1.0, flip_h=False, flip_v=False, depth=0,
                  remove=False)
    values.update(extra)
    return run("WuerstchenLayerTransform", **values)[0]


def test_nodes_are_declared():
    for name in EDITING:
        cls = NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY == "wuerstchen/editing"
        for group in cls.INPUT_TYPES().values():
            for socket, spec in group.items():
                assert spec[1].get("tooltip"), f"{name}.{socket} has no tooltip"


def test_move_one_object_remove_another(models):
    ball = box_mask(SIZE, 100, 40, 60, 60)  # MASK [1, H, W]
    cup = box_mask(SIZE, 20, 170, 50, 50)
    layers, image = decompose(models, dict(mask=torch.cat([ball, cup])))
    assert image.shape == (1, 256, 256, 3)
    assert len(layers.layers.objects) == 2
    moved = transform(layers, 0, dx=90, dy=-40)  # snapped to 2, -1 cells
    assert (moved.layers.objects[0].transform.dx, moved.layers.objects[0].transform.dy) == (2, -1)
    edited = transform(moved, 1, remove=True)
    assert len(edited.layers.objects) == 1 and len(layers.layers.objects) == 2  # the input is not changed
    latent_c, edit_mask = run("WuerstchenLayerFuse", stage_c=models["stage_c"], layers=edited, fuse_at=0.8,
                              preserve=True, hole_seed=-1)
    assert latent_c["samples"].shape == (1, 16, 6, 6) and edit_mask.shape == (1, 256, 256)
    assert edit_mask[0, 130, 60] == 1 and edit_mask[0, 40, 190] == 1 and edit_mask[0, 240, 240] == 0
    source = run("WuerstchenStageAEncode", stage_a=models["stage_a"], image=image)[0]
    latent_b = run("WuerstchenEditStageBSampler", stage_b=models["stage_b"], stage_c=latent_c,
                   positive=models["positive"], negative=models["negative"], source=source, edit_mask=edit_mask,
                   seed=1, steps=2, cfg=1.1, sampler="ddpm", feather=2)[0]
    assert latent_b["samples"].shape == (1, 4, 64, 64)
    pixels = run("WuerstchenStageADecode", stage_a=models["stage_a"], latent=latent_b, tile_size=0)[0]
    round_trip = run("WuerstchenStageADecode", stage_a=models["stage_a"], latent=source, tile_size=0)[0]
    # far from the edit (beyond the feather and the decoder's reach) the pixels are the source's round trip
    far = torch.nn.functional.max_pool2d(edit_mask[None], 2 * 32 + 1, stride=1, padding=32)[0, 0] == 0
    assert far.any()
    assert float((pixels - round_trip).abs().amax(-1)[0][far].max()) <= 1e-3


def test_composition_pan_and_zoom(models):
    ball = box_mask(SIZE, 100, 40, 60, 60)
    layers, _ = decompose(models, dict(mask=ball))
    other, _ = decompose(models, dict(mask=box_mask(SIZE, 150, 150, 80, 80)), image=picture(SIZE, seed=9)
                         .permute(0, 2, 3, 1))
    latent_c, _ = run("WuerstchenLayerFuse", stage_c=models["stage_c"], layers=transform(layers, 0, flip_h=True),
                      fuse_at=0.5, preserve=False, hole_seed=3, more_layers=other)
    assert torch.isfinite(latent_c["samples"]).all()
    for canvas in ("pan", "zoomout"):
        panned, image = decompose(models, {}, canvas=canvas, pan_x=60, pan_y=0, zoom=0.6)
        assert panned.layers.background.hole.any() and not panned.layers.objects
        latent_c, edit_mask = run("WuerstchenLayerFuse", stage_c=models["stage_c"], layers=panned, fuse_at=0.8,
                                  preserve=True, hole_seed=-1)
        assert edit_mask.sum() > 0


def test_errors_name_the_node_and_socket(models):
    with pytest.raises(NodeError, match=r"WuerstchenLayerDecompose: 'mask_2' is 128x256 but the picture is 256x256"):
        decompose(models, dict(mask=box_mask(SIZE, 0, 0, 40, 40), mask_2=torch.ones(1, 256, 128)))
    with pytest.raises(NodeError, match=r"'mask' \[1\] is empty"):
        decompose(models, dict(mask=torch.cat([box_mask(SIZE, 0, 0, 40, 40), torch.zeros(1, *SIZE)])))
    layers, _ = decompose(models, dict(mask=box_mask(SIZE, 100, 40, 60, 60)))
    with pytest.raises(NodeError, match="there is no layer 3; these layers hold 1 object"):
        transform(layers, 3, dx=10)
    with pytest.raises(NodeError, match="moves layer 0 off the canvas"):
        transform(layers, 0, dx=-100)
    with pytest.raises(NodeError, match="'layers' must come from Wuerstchen Layer Decompose"):
        transform({"samples": torch.zeros(1)}, 0)
