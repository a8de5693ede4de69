"""ControlNet hints in the core: the official input recipes, and step ranges on the sampling clock.

The Canny detector is checked on synthetic pictures whose edges follow from OpenCV's rules by hand
(a 3x3 Sobel, L1 magnitude, non-maximum suppression that keeps the first of two equal neighbours,
thresholds 100/200 with hysteresis). The clock is checked by counting the Stage C calls that get a
``cnet``: a range is a fraction of the steps run, whatever the shift and the sampler.
"""

import pytest
import torch
import torch.nn.functional as F

from wuerstchen.pipeline import control
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.files import tiny
from wuerstchen.pipeline.control import ControlSchedule, Hint, active_steps, canny_edges
from wuerstchen.models import ControlNet, EfficientNetEncoder
from wuerstchen.pipeline.stages import Conditioning, StageCSettings
from wuerstchen.sampling.samplers import SAMPLERS


def _randomize_zeros(module, seed):
    """Tiny test nets start with zero output projections (an untrained ControlNet); make them count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


class RecordingStageC(torch.nn.Module):
    """Stands in for Stage C in the clock tests: Stage C's conditioning widths, a zero prediction, and
    a record of the ``cnet`` argument of every call (None, or the list of per-ResBlock maps)."""

    def __init__(self):
        super().__init__()
        self.clip_txt_mapper = torch.nn.Linear(tiny.TEXT["hidden_size"], 1)
        self.clip_txt_pooled_mapper = torch.nn.Linear(tiny.TEXT["projection_dim"], 1)
        self.clip_img_mapper = torch.nn.Linear(tiny.VISION["projection_dim"], 1)
        self.calls = []

    def forward(self, x, r, clip_text, clip_text_pooled, clip_img, cnet=None):
        self.calls.append(cnet)
        return torch.zeros_like(x)

    def with_cnet(self):
        return [c is not None for c in self.calls]


@pytest.fixture()
def stage_c():
    return RecordingStageC()


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(2)
    out = {kind: _randomize_zeros(ControlNet(**cfg), 3 + i) for i, (kind, cfg) in enumerate(tiny.CONTROLNETS.items())}
    out["effnet"] = EfficientNetEncoder(**tiny.EFFNET).eval()
    return out


def conditioning(batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    text, pooled = tiny.TEXT["hidden_size"], tiny.TEXT["projection_dim"]
    return Conditioning(torch.randn(batch, 77, text, generator=gen), torch.randn(batch, 1, pooled, generator=gen))


# ------------------------------------------------------------------------------------------------
# Canny


def square(size=224, top=80, left=80, side=64, value=1.0):
    img = torch.zeros(1, 3, size, size)
    img[:, :, top:top + side, left:left + side] = value
    return img


def test_canny_finds_the_edges_of_a_square_where_opencv_puts_them():
    # 224x224 is CannyFilter's working size, so the resize steps leave the picture as it is. A white
    # square on black: along each side two pixels have the same gradient (|dx| = 4 * 255); the
    # comparison keeps the first one in scan order, i.e. the pixel just outside on the top and left
    # sides and the last pixel inside on the bottom and right sides.
    edges = canny_edges(square())[0, 0]
    assert edges.shape == (224, 224) and set(edges.unique().tolist()) <= {0.0, 1.0}
    rows, cols = range(84, 140), range(84, 140)  # away from the corners
    assert edges[list(rows), 79].eq(1).all() and edges[list(rows), 143].eq(1).all()
    assert edges[79, list(cols)].eq(1).all() and edges[143, list(cols)].eq(1).all()
    inside = edges[81:142, 81:142]
    assert inside.sum() == 0
    outside = edges.clone()
    outside[76:148, 76:148] = 0
    assert outside.sum() == 0
    # one-pixel-wide lines: the neighbours across each side are not edges
    assert edges[list(rows), 78].eq(0).all() and edges[list(rows), 80].eq(0).all()
    assert edges[list(rows), 142].eq(0).all() and edges[list(rows), 144].eq(0).all()


@pytest.mark.parametrize("step,kept", [
    (20 / 255, False),  # |dx| = 4 * 20 = 80: below the low threshold 100
    (40 / 255, False),  # 160: between the thresholds, and connected to no strong edge
    (60 / 255, True),   # 240: above the high threshold 200
])
def test_canny_thresholds(step, kept):
    img = torch.zeros(1, 3, 64, 64)
    img[..., 32:] = step
    edges = canny_edges(img, size=None)[0, 0]
    assert bool(edges[:, 31].eq(1).all()) is kept
    assert edges.sum() == (64 if kept else 0)


def test_canny_hysteresis_keeps_weak_edges_joined_to_strong_ones():
    weak = torch.zeros(1, 3, 64, 64)
    weak[..., 32:] = 40 / 255  # a weak vertical edge down the whole picture (no corners)
    joined = weak.clone()
    joined[:, :, :10, 32:] = 60 / 255  # ... strong along its top 10 rows
    assert canny_edges(weak, size=None).sum() == 0
    edges = canny_edges(joined, size=None)[0, 0]
    # every row keeps its one edge pixel beside the step (one column aside where the strong part
    # meets the weak part): the weak rows survive because they are joined to the strong ones
    assert edges[:, 30:34].sum(dim=1).eq(1).all() and edges.sum() == 64
    assert edges[20:, 31].eq(1).all()


def test_canny_uses_the_strongest_colour_channel():
    img = torch.zeros(1, 3, 64, 64)
    img[:, 2, :, 32:] = 1.0  # an edge in blue only
    img[:, 0, :, 32:] = 30 / 255  # and a faint one in red
    edges = canny_edges(img, size=None)[0, 0]
    assert edges[:, 31].eq(1).all() and edges.sum() == 64


def test_canny_filter_works_at_224_and_resizes_back():
    img = square(size=448, top=160, left=160, side=128)
    edges = canny_edges(img)
    assert edges.shape == (1, 1, 448, 448)
    assert 0 <= float(edges.min()) and float(edges.max()) <= 1
    small = canny_edges(F.interpolate(img, size=(224, 224), mode="bilinear"))
    assert torch.equal(edges, F.interpolate(small, size=(448, 448), mode="bilinear"))


def test_an_edge_map_passes_through_and_a_picture_is_turned_into_edges():
    edge_map = torch.zeros(1, 3, 96, 128)
    edge_map[:, :, 40, 10:100] = 1.0  # e.g. from ComfyUI's Canny node (three equal channels of 0/1)
    assert control.is_edge_map(edge_map)
    assert torch.equal(control.canny_input(edge_map), edge_map[:, :1])
    assert torch.equal(control.canny_input(edge_map[:, :1]), edge_map[:, :1])
    noisy = (edge_map + torch.rand(edge_map.shape, generator=torch.Generator().manual_seed(0)) * 0.05).clamp(0, 1)
    noisy = noisy.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)  # a JPEG-ish grey edge map
    assert control.is_edge_map(noisy)
    picture = square(size=224, value=0.8) * torch.tensor([1.0, 0.5, 0.2])[:, None, None]
    assert not control.is_edge_map(picture)
    assert torch.equal(control.canny_input(picture), canny_edges(picture))


# ------------------------------------------------------------------------------------------------
# Inpainting and super-resolution


def test_inpainting_input_whitens_the_masked_area_and_appends_the_mask():
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 16, 24)
    mask[..., :8, :] = 1.0  # top half, at half resolution
    out = control.control_input("inpainting", image, mask)
    assert out.shape == (2, 4, 32, 48)
    assert out[:, :3, :16].eq(1).all() and torch.equal(out[:, :3, 16:], image[:, :, 16:])
    assert out[:, 3, :16].eq(1).all() and out[:, 3, 16:].eq(0).all()
    with pytest.raises(control.ControlInputError, match="needs a mask") as err:
        control.control_input("inpainting", image)
    assert err.value.missing == "mask"


def test_super_resolution_input_is_the_upscaled_effnet_latent(nets):
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    out = control.control_input("super_resolution", image, effnet=nets["effnet"])
    latent = pipeline.encode_semantic(nets["effnet"], image, (2, 3))
    assert out.shape == (1, 16, 4, 6)
    assert torch.equal(out, latent.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    with pytest.raises(control.ControlInputError, match="semantic compressor"):
        control.control_input("super_resolution", image)


def test_the_recipe_follows_the_controlnet():
    assert [control.kind_of(cfg) for cfg in tiny.CONTROLNETS.values()] == ["canny", "inpainting", "super_resolution"]
    with pytest.raises(ValueError, match="512 input channels"):
        control.kind_of({"c_in": 512, "bottleneck_mode": "effnet"})


# ------------------------------------------------------------------------------------------------
# The sampling clock


@pytest.mark.parametrize("start,end,steps,expected", [
    (0.0, 0.5, 20, range(0, 10)),
    (0.5, 1.0, 20, range(10, 20)),
    (0.0, 1.0, 7, range(0, 7)),
    (0.3, 0.6, 10, range(3, 6)),  # 0.3 * 10 is 3.0000000000000004 in floats
    (0.25, 0.25, 8, range(2, 2)),
    (0.0, 0.5, 3, range(0, 2)),  # step 1 starts at 1/3 < 0.5
])
def test_active_steps_are_fractions_of_the_run(start, end, steps, expected):
    assert active_steps(start, end, steps) == expected


@pytest.mark.parametrize("bad,match", [
    (dict(start=0.6, end=0.4), r"end \(0.4\) is before start \(0.6\)"),
    (dict(end=1.5), "between 0 and 1"),
    (dict(strength=float("nan")), "finite"),
])
def test_bad_ranges_are_refused(nets, bad, match):
    with pytest.raises(ValueError, match=match):
        Hint(nets["canny"], torch.zeros(1, 1, 64, 64), **bad)


@pytest.mark.parametrize("shift", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_hint_is_applied_at_exactly_its_fraction_of_the_steps(stage_c, nets, sampler, shift):
    hint = Hint(nets["canny"], torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)), 1.0, 0.0, 0.5)
    pipeline.sample_stage_c(stage_c, conditioning(), conditioning(seed=1), shape=(1, 16, 2, 2), seed=0,
                            settings=StageCSettings(steps=20, shift=shift, sampler=sampler), control=[hint])
    assert stage_c.with_cnet() == [True] * 10 + [False] * 10


def test_img2img_counts_the_steps_it_runs(stage_c, nets):
    """20 steps at denoise 0.5 run 10 steps; a hint over 0 to 0.5 is on for the first 5 of them."""
    hint = Hint(nets["canny"], torch.rand(1, 1, 64, 64), 1.0, 0.0, 0.5)
    init = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(3))
    settings = StageCSettings(steps=20, denoise=0.5)
    pipeline.sample_stage_c(stage_c, conditioning(), conditioning(seed=1), init_latent=init, seed=0,
                            settings=settings, control=[hint])
    assert settings.steps_to_run(img2img=True) == 10
    assert stage_c.with_cnet() == [True] * 5 + [False] * 5


def test_chained_hints_add_their_scaled_maps_at_the_steps_they_share(stage_c, nets):
    gen = torch.Generator().manual_seed(4)
    canny_in = torch.rand(1, 1, 64, 64, generator=gen)
    inpaint_in = torch.rand(1, 4, 64, 64, generator=gen)
    a = Hint(nets["canny"], canny_in, 0.5, 0.0, 0.5)
    b = Hint(nets["inpainting"], inpaint_in, 2.0, 0.25, 0.75)
    with torch.no_grad():
        maps_a, maps_b = nets["canny"](canny_in), nets["inpainting"](inpaint_in)
    batch = 2
    pipeline.sample_stage_c(stage_c, conditioning(), conditioning(seed=1), shape=(batch, 16, 2, 2), seed=0,
                            settings=StageCSettings(steps=8), control=[a, b])
    assert stage_c.with_cnet() == [True] * 6 + [False] * 2
    for step, cnet in enumerate(stage_c.calls[:6]):
        assert len(cnet) == len(maps_a)
        for i, (ma, mb) in enumerate(zip(maps_a, maps_b)):
            if ma is None:
                assert cnet[i] is None
                continue
            expected = (0.5 * ma if step < 4 else 0) + (2.0 * mb if 2 <= step < 6 else 0)
            # one control image serves the whole batch, and both CFG halves get the same maps
            assert cnet[i].shape == (2 * batch,) + ma.shape[1:]
            assert torch.allclose(cnet[i], expected.expand(2 * batch, -1, -1, -1), atol=1e-6), (step, i)


def test_control_maps_are_computed_once_per_run(stage_c, nets):
    calls = []
    handle = nets["canny"].register_forward_hook(lambda *a: calls.append(1))
    try:
        hint = Hint(nets["canny"], torch.rand(1, 1, 64, 64), 1.0, 0.0, 1.0)
        pipeline.sample_stage_c(stage_c, conditioning(), conditioning(seed=1), shape=(1, 16, 2, 2), seed=0,
                                settings=StageCSettings(steps=5), control=[hint])
    finally:
        handle.remove()
    assert len(calls) == 1


def test_control_images_must_fit_the_batch(nets):
    hint = Hint(nets["canny"], torch.rand(2, 1, 64, 64), 1.0)
    with pytest.raises(ValueError, match="2 control images do not fit a batch of 3 latents"):
        ControlSchedule([hint], batch=3)
    schedule = ControlSchedule([hint], batch=4)  # two images tile over four latents
    first = next(m for m in schedule.at(0, 1) if m is not None)
    assert first.shape[0] == 4 and torch.equal(first[:2], first[2:])


def test_the_sampling_loop_asks_step_inputs_at_every_step():
    """A StepInput gets (step, steps) before each model call; its value is batched like any input
    (shared by both CFG halves when only cond has it) and reused while the same object comes back."""
    from wuerstchen.sampling import samplers as sampling

    asked = []

    class StepIndex(sampling.StepInput):
        def at(self, step, steps):
            asked.append((step, steps))
            return torch.full((1, 1), float(step // 2))  # a new object every step

    seen = []

    def model(x, r, clip, index):
        seen.append(index.flatten().tolist())
        return torch.zeros_like(x)

    clip = torch.zeros(1, 3)
    sampling.sample(model, torch.zeros(1, 4, 2, 2), {"clip": clip, "index": StepIndex()}, {"clip": clip}, steps=4,
                    cfg=3.0, shift=1.0)
    assert asked == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert seen == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    seen.clear()
    sampling.sample(model, torch.zeros(1, 4, 2, 2), {"clip": clip, "index": StepIndex()}, None, steps=2, cfg=1.0,
                    shift=1.0)
    assert seen == [[0.0], [0.0]]
