"""Layered editing: layers and their placement, fusion, operations, edit-aware Stage B, the whole edit."""

import pytest
import torch
import torch.nn.functional as F

from editing_helpers import box_mask, picture, tiny_cascade
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.editing import operations
from wuerstchen.editing.editor import EditRequest, LayeredEditor
from wuerstchen.editing.fusion import EditSettings, composite, decompose, fill_background, fuse
from wuerstchen.editing.guidance import Guidance
from wuerstchen.editing.layers import Transform, flip_box, scaled_source, shift_cells
from wuerstchen.editing.masks import as_mask, feather, hole_cells, object_cells
from wuerstchen.inputs.limits import RequestError
from wuerstchen.pipeline.stages import StageBSettings

SIZE = (256, 256)  # 6x6 Stage C cells of 42.7 pixels, a 64x64 Stage B latent
FAST = EditSettings(steps=8, refine=1)
FAST_B = StageBSettings(steps=3)


@pytest.fixture(scope="module")
def cascade(tiny_dir):
    return tiny_cascade(tiny_dir)


@pytest.fixture(scope="module")
def parts(cascade):
    stage_c = cascade.model("stage_c").module
    cond = cascade.encode_prompts(["a ball"])
    latent = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(3))
    return stage_c, Guidance.prepare(stage_c, cond), latent


def test_masks_become_cells():
    mask = box_mask(SIZE, 0, 0, 128, 86)[0]  # 3 cells down, 2 across (86 px ≈ 2.01 cells)
    cells = object_cells(mask, (6, 6))
    assert cells[:3, :2].all() and int(cells.sum()) == 6
    hole = hole_cells([mask], (6, 6), dilate_cells=1)
    assert hole[:4, :4].all() and int(hole.sum()) == 16  # touched cells (3x3: 86 px spills into a third column), +1
    soft = feather(torch.zeros(10, 10, dtype=torch.bool).index_put_((torch.tensor([5]), torch.tensor([5])),
                                                                     torch.tensor(True)), 2)
    assert soft[5, 5] == 1 and 0 < soft[5, 7] < 1 and soft[5, 0] == 0 and soft[0, 0] == 0


def test_mask_checks_name_the_problem():
    with pytest.raises(RequestError, match="is 64x32 but the picture is 256x256"):
        as_mask(torch.ones(32, 64), SIZE, "mask 1")
    with pytest.raises(RequestError, match="mask 2 is empty"):
        as_mask(torch.zeros(1, *SIZE), SIZE, "mask 2")


def test_shift_and_flip_are_exact():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    moved = shift_cells(x, 2, -1)
    assert torch.equal(moved[..., 0:5, 2:6], x[..., 1:6, 0:4])
    assert moved[..., :, :2].abs().sum() == 0 and moved[..., 5, :].abs().sum() == 0
    flipped = flip_box(x, (1, 1, 3, 4), horizontal=True, vertical=False)
    assert torch.equal(flipped[..., 1:3, 1:4], x[..., 1:3, 1:4].flip(-1))
    assert torch.equal(flipped[..., 0, :], x[..., 0, :])


def test_a_move_by_whole_cells_moves_the_inverted_latent_by_exactly_that(parts):
    stage_c, guidance, latent = parts
    mask = box_mask(SIZE, 43, 43, 85, 85)[0]  # cells 1..2 x 1..2
    layers = decompose(stage_c, latent, [mask], guidance, FAST, SIZE)
    dx, dy = layers.snap(128, 43)  # 3 cells right, 1 down
    assert (dx, dy) == (3, 1)
    layer = layers.transformed(0, Transform(dx=dx, dy=dy)).objects[0]
    trajectory, cells = layer.placed()
    source = layers.source.latents
    assert cells[2:4, 4:6].all() and int(cells.sum()) == 4
    # every step of the inverted trajectory, moved by exactly (3, 1) cells
    assert torch.equal(trajectory.latents[..., 2:4, 4:6], source[..., 1:3, 1:3])
    assert torch.equal(trajectory.source[..., 2:4, 4:6], layers.source.source[..., 1:3, 1:3])
    # and fused: inside the new cells the canvas is the moved layer latent at the fusion step
    step = FAST.fuse_step()
    canvas = torch.zeros_like(source[0])
    fused = composite(canvas, [(trajectory, cells)], step)
    assert torch.equal(fused[..., 2:4, 4:6], source[step][..., 1:3, 1:3])
    assert fused[..., ~cells].abs().sum() == 0


def test_depth_orders_the_paste(parts):
    stage_c, guidance, latent = parts
    a, b = box_mask(SIZE, 0, 0, 86, 86)[0], box_mask(SIZE, 0, 86, 86, 86)[0]
    layers = decompose(stage_c, latent, [a, b], guidance, FAST, SIZE)
    layers = layers.transformed(0, Transform(dx=1, depth=2))  # object 1 onto object 2's left column, on top
    from wuerstchen.editing.layers import ordered
    placed = [layer.placed() for layer in ordered(layers.objects)]
    assert [layer.name for layer in ordered(layers.objects)] == ["object 2", "object 1"]
    fused = composite(torch.zeros_like(latent), placed, 3)
    assert torch.equal(fused[..., 0:2, 2], layers.source.at(3)[..., 0:2, 1])  # object 1 wins the overlap


def test_scale_resamples_the_clean_latent_about_the_centre():
    source = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    cells = torch.zeros(6, 6, dtype=torch.bool)
    cells[2:4, 2:4] = True
    latent, scaled = scaled_source(source, cells, 2.0)
    assert scaled[1:5, 1:5].all() and int(scaled.sum()) == 16
    expected = F.interpolate(source[..., 2:4, 2:4], size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(latent[..., 1:5, 1:5], expected)
    assert torch.equal(latent[..., 0, :], source[..., 0, :])


def test_background_fill_keeps_the_source_trajectory_outside_the_hole(parts):
    stage_c, guidance, latent = parts
    mask = box_mask(SIZE, 0, 0, 40, 40)[0]
    layers = decompose(stage_c, latent, [mask], guidance, FAST, SIZE)
    hole = layers.background.hole
    filled = fill_background(stage_c, layers.background, guidance, 5)
    assert torch.equal(filled[..., ~hole], layers.source.at(5)[..., ~hole])
    assert not torch.allclose(filled[..., hole], layers.source.at(5)[..., hole], atol=1e-3)
    result, edit = fuse(stage_c, layers.replace_objects([]), guidance, FAST)
    assert torch.equal(edit, hole)
    assert torch.equal(result[..., ~hole], latent[..., ~hole])  # preserve: the source latent outside


def test_operations_parse_and_check():
    assert operations.parse("move:12,-4") == operations.Operation("move", dx=12, dy=-4)
    assert operations.parse("flip:v").flip == "v" and operations.parse("zoomout:0.5").factor == 0.5
    for bad, message in (("spin", "unknown operation"), ("move:1", "DX,DY"), ("flip:x", "flip:h"),
                         ("zoomout:1.5", "0 < F < 1"), ("scale:0", "above 0"), ("move:0,0", "moves nothing"),
                         ("pan:a,1", "not a finite number")):
        with pytest.raises(RequestError, match=message):
            operations.parse(bad)
    mask = box_mask(SIZE, 100, 200, 40, 40)[0]
    with pytest.raises(RequestError, match="moves mask 1 off the canvas.*x -200..16"):
        operations.check(operations.parse("move:30,0"), [mask], SIZE)
    operations.check(operations.parse("move:16,-100"), [mask], SIZE)
    with pytest.raises(RequestError, match="needs at least one mask"):
        operations.check(operations.parse("remove"), [], SIZE)
    with pytest.raises(RequestError, match="takes no mask"):
        operations.check(operations.parse("pan:10,0"), [mask], SIZE)
    with pytest.raises(RequestError, match="larger than the canvas"):
        operations.check(operations.parse("scale:4"), [mask], SIZE)


def test_pan_and_zoomout_pictures():
    image = picture(SIZE)
    panned, hole = operations.picture(operations.parse("pan:40,-8"), image)
    assert torch.equal(panned[..., 0:248, 40:], image[..., 8:, :216])
    assert hole[:, :40].eq(1).all() and hole[248:, :].eq(1).all() and hole[:248, 40:].eq(0).all()
    zoomed, border = operations.picture(operations.parse("zoomout:0.5"), image)
    assert border[64:192, 64:192].eq(0).all() and border[:64].eq(1).all() and zoomed.shape == image.shape


def _outside(mask, radius):
    grown = F.max_pool2d(mask[None, None].float(), 2 * radius + 1, stride=1, padding=radius)[0, 0]
    return grown == 0


def test_remove_keeps_the_source_pixels_outside_the_dilated_mask(cascade):
    image = picture(SIZE, seed=1)
    mask = box_mask(SIZE, 20, 30, 40, 40)[0]
    request = EditRequest(image, [mask], operations.parse("remove"), prompt="a table", settings=FAST,
                          stage_b=FAST_B, feather=2)
    result = LayeredEditor(cascade).run(request)
    stage_a = cascade.model("stage_a").module
    round_trip = pipeline.decode_stage_a(stage_a, pipeline.encode_stage_a(stage_a, image))
    # the dilated mask: the cells the mask touches, one more cell (dilate 1), the Stage B feather
    # (2 x 2 latent cells of 4 pixels) and the decoder's reach (8 pixels)
    cell = 256 / 6
    cells_touched = 2 * cell  # 30 + 40 px = 70 px: two cells across and down
    radius = int(cells_touched + cell + 2 * 2 * 4 + 8) - 40 - 20
    keep = _outside(mask, radius)
    assert keep.float().mean() > 0.5
    diff = (result.image - round_trip).abs().amax(dim=1)[0]
    assert float(diff[keep].max()) <= 1e-3
    assert float(diff[mask > 0.5].max()) > 1e-2  # the object's place was regenerated


def test_every_operation_runs(cascade):
    image = picture(SIZE, seed=2)
    mask = box_mask(SIZE, 100, 100, 60, 60)[0]
    shapes = set()
    for spec in ("move:-43,43", "scale:1.5", "flip:h", "pan:40,0", "zoomout:0.7"):
        op = operations.parse(spec)
        request = EditRequest(image, [mask] if op.needs_masks else [], op, settings=FAST, stage_b=FAST_B)
        result = LayeredEditor(cascade).run(request)
        shapes.add(tuple(result.image.shape))
        assert torch.isfinite(result.image).all()
        if spec.startswith("move"):
            assert result.offset_cells == (-1, 1)
    assert shapes == {(1, 3, 256, 256)}


def test_a_move_that_snaps_off_the_canvas_is_refused():
    mask = box_mask(SIZE, 100, 200, 40, 30)[0]  # x 200..230; its cell is the last column (213..256)
    operations.check(operations.parse("move:10,0"), [mask], SIZE)  # 0 cells once snapped
    with pytest.raises(RequestError, match="is 1, 0 Stage C cells once snapped.*off the 6x6-cell canvas"):
        operations.check(operations.parse("move:26,0"), [mask], SIZE)  # fits in pixels, not in cells


def test_stage_b_mask_is_feathered_and_exactly_zero_away_from_the_edit():
    from wuerstchen.editing.stage_b import latent_mask

    cells = torch.zeros(6, 6, dtype=torch.bool)
    cells[0, 0] = True  # one Stage C cell of a 64x64 Stage B latent: latent rows/cols 0..10
    soft = latent_mask(cells, (64, 64), feather_cells=2)
    assert soft[:10, :10].eq(1).all()
    assert 0 < float(soft[5, 12]) < 1  # the ramp just outside the edit
    assert soft[:, 15:].eq(0).all() and soft[15:, :].eq(0).all()


def test_objects_from_another_picture_must_match(parts):
    from wuerstchen.editing.fusion import with_objects_from

    stage_c, guidance, latent = parts
    mask = box_mask(SIZE, 0, 0, 86, 86)[0]
    here = decompose(stage_c, latent, [mask], guidance, FAST, SIZE)
    other = decompose(stage_c, torch.randn(1, 16, 6, 6), [mask], guidance, FAST, SIZE)
    assert len(with_objects_from(here, other).objects) == 2
    fewer = decompose(stage_c, latent, [mask], guidance, EditSettings(steps=4, refine=0), SIZE)
    with pytest.raises(ValueError, match="same size and steps"):
        with_objects_from(here, fewer)
