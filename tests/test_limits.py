"""Every bad input is answered before any work, in the library, the CLI and the nodes (issue 8).

Each refusal test makes the model forwards (or the model loading) fail, so a refusal that came
late, after sampling had started, fails the test too. Sizes and steps are tiny: the tiny
checkpoints of :mod:`wuerstchen.files.tiny`, 1-2 steps, 64-264 pixels.
"""

import math
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nodes import NODE_CLASS_MAPPINGS, host
from nodes.host import NodeError
from wuerstchen import cli
from wuerstchen.options import generate as options
from wuerstchen.pipeline import control
from wuerstchen.inputs import limits
from wuerstchen.pipeline import stages as pipeline
from wuerstchen.inputs import preprocess
from wuerstchen.files import tiny
from wuerstchen.pipeline.cascade import Cascade, CascadeFiles
from wuerstchen.files.checkpoints import load
from wuerstchen.inputs.limits import NonFiniteError, RequestError
from wuerstchen.files.management import ModelManager
from wuerstchen.models.controlnet import ControlNet
from wuerstchen.models.effnet import EfficientNetEncoder
from wuerstchen.models.stage_a import StageA
from wuerstchen.models.stage_b import StageB
from wuerstchen.models.stage_c import StageC
from wuerstchen.pipeline.stages import StageBSettings, StageCSettings


@pytest.fixture(scope="module")
def cascade(tiny_dir):
    return Cascade(CascadeFiles.from_dir(tiny_dir), ModelManager(device="cpu"), root=str(tiny_dir))


@pytest.fixture(scope="module")
def prompts(cascade):
    return cascade.encode_prompts(["a cat"]), cascade.encode_prompts([""])


@pytest.fixture()
def no_forward(monkeypatch):
    """Any model forward fails the test: a refusal must come before the first one."""
    def fail(*args, **kwargs):
        raise AssertionError("a model ran before the request was refused")

    for cls in (StageC, StageB, ControlNet):
        monkeypatch.setattr(cls, "forward", fail)
    monkeypatch.setattr(StageA, "decode", fail)


@pytest.fixture()
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr(ModelManager, "load", fail)


FAST_C, FAST_B = StageCSettings(steps=1), StageBSettings(steps=1)


# ------------------------------------------------------------------------------------------------
# Sizes: every side from 64 to 8192 pixels works


def test_stage_b_latents_are_even_and_official_where_the_official_size_works():
    for side in range(64, 2049):
        h, w = pipeline.stage_b_latent_size(side, side + 4)
        assert h % 2 == 0 and w % 2 == 0
        assert math.ceil(side / 4) <= h < math.ceil(side / 4) + 2
        if side % 8 == 0:  # the official Stage B latent (side / 4) is kept wherever it works
            assert (h, w) == (side // 4, math.ceil((side + 4) / 4) + (math.ceil((side + 4) / 4) % 2))


@pytest.mark.parametrize("width,height", [(260, 64), (100, 70)])
def test_odd_stage_b_sizes_run_and_come_back_at_the_size_asked_for(cascade, width, height):
    """Today these end in a raw pixel_unshuffle error after Stage C ran."""
    images = cascade.generate("a cat", width=width, height=height, stage_c=FAST_C, stage_b=FAST_B)
    assert images.shape == (1, 3, height, width) and torch.isfinite(images).all()


def test_sizes_out_of_range_are_refused_before_any_model_loads(cascade, no_loading):
    for width, height in ((32, 64), (64, 9000), (64.5, 64)):
        with pytest.raises(RequestError, match="size"):
            cascade.generate("a cat", width=width, height=height, stage_c=FAST_C, stage_b=FAST_B)


# ------------------------------------------------------------------------------------------------
# Settings that are not finite or not sane


@pytest.mark.parametrize("settings,setting", [
    (dict(cfg=float("nan")), "Stage C cfg"), (dict(cfg=float("inf")), "Stage C cfg"),
    (dict(shift=0.0), "Stage C shift"), (dict(shift=-1.0), "Stage C shift"), (dict(shift=float("nan")), "Stage C shift"),
    (dict(cfg_rho=float("nan")), "Stage C cfg_rho"), (dict(cfg_rho=1.5), "Stage C cfg_rho"),
    (dict(denoise=0.0), "Stage C denoise"), (dict(denoise=1.5), "Stage C denoise"),
    (dict(denoise=float("nan")), "Stage C denoise"), (dict(steps=0), "Stage C steps"),
    (dict(steps=10 ** 6), "Stage C steps"), (dict(steps=2.5), "Stage C steps"), (dict(sampler="bogus"), "Stage C sampler"),
])
def test_stage_c_settings_refuse_values_that_cannot_run(settings, setting):
    with pytest.raises(RequestError, match=setting):
        StageCSettings(**settings)


@pytest.mark.parametrize("settings", [dict(shift=0.0), dict(cfg=float("-inf")), dict(steps=-3)])
def test_stage_b_settings_refuse_values_that_cannot_run(settings):
    with pytest.raises(RequestError, match="Stage B"):
        StageBSettings(**settings)


def test_settings_changed_after_construction_are_refused_before_sampling(cascade, prompts, no_forward):
    cond, uncond = prompts
    settings = StageCSettings(steps=2)
    settings.shift = 0.0  # a dataclass can be changed after it was checked
    with pytest.raises(RequestError, match="Stage C shift"):
        pipeline.sample_stage_c(cascade.model("stage_c").module, cond, uncond, shape=(1, 16, 2, 2),
                                settings=settings)


@pytest.mark.parametrize("shape,message", [((0, 16, 2, 2), "at least 1"), ((65, 16, 2, 2), "batch"),
                                           ((1, 4, 2, 2), "16")])
def test_latent_shapes_are_checked_before_sampling(cascade, prompts, no_forward, shape, message):
    cond, uncond = prompts
    with pytest.raises(RequestError, match=message):
        pipeline.sample_stage_c(cascade.model("stage_c").module, cond, uncond, shape=shape, settings=FAST_C)


@pytest.mark.parametrize("compression", [0.0, -2.0, float("nan"), float("inf")])
def test_compression_must_be_a_positive_number(cascade, no_loading, compression):
    with pytest.raises(RequestError, match="compression"):
        cascade.generate("a cat", width=64, height=64, compression=compression, stage_c=FAST_C, stage_b=FAST_B)


@pytest.mark.parametrize("batch", [0, -1, 10_000])
def test_batch_must_be_between_one_and_the_cap(cascade, no_loading, batch):
    with pytest.raises(RequestError, match="batch"):
        cascade.generate("a cat", width=64, height=64, batch=batch, stage_c=FAST_C, stage_b=FAST_B)


def test_non_finite_conditioning_is_refused(cascade, prompts, no_forward):
    cond, uncond = prompts
    broken = pipeline.Conditioning(cond.clip_text * float("nan"), cond.clip_text_pooled)
    with pytest.raises(RequestError, match="positive conditioning's text embedding holds NaN"):
        pipeline.sample_stage_c(cascade.model("stage_c").module, broken, uncond, shape=(1, 16, 2, 2), settings=FAST_C)


def test_image_variation_strength_must_be_finite(prompts):
    cond, _ = prompts
    with pytest.raises(RequestError, match="image variation strength"):
        pipeline.with_image_embeds(cond, torch.ones(1, tiny.VISION["projection_dim"]), [float("nan")])


# ------------------------------------------------------------------------------------------------
# NaN or inf in a stage's result: which stage, at which step, what to try


def test_a_non_finite_stage_c_step_stops_the_run_and_names_the_stage(cascade, prompts, monkeypatch):
    cond, uncond = prompts
    calls = []

    def nan_forward(self, x, *args, **kwargs):
        calls.append(1)
        return torch.full_like(x, float("nan"))

    monkeypatch.setattr(StageC, "forward", nan_forward)
    with pytest.raises(NonFiniteError, match=r"Stage C produced NaN or inf values at step 1 of 5") as info:
        pipeline.sample_stage_c(cascade.model("stage_c").module, cond, uncond, shape=(1, 16, 2, 2),
                                settings=StageCSettings(steps=5))
    assert info.value.stage == "Stage C" and len(calls) == 1  # stopped at once, not after 5 steps


def test_non_finite_stage_b_and_stage_a_results_name_their_stage(cascade, prompts, monkeypatch):
    cond, uncond = prompts
    sb, sa = cascade.model("stage_b").module, cascade.model("stage_a").module
    latent_c = torch.zeros(1, 16, 2, 2)
    monkeypatch.setattr(StageB, "forward", lambda self, x, *a, **k: torch.full_like(x, float("inf")))
    with pytest.raises(NonFiniteError, match="Stage B produced NaN or inf values at step 1 of 2"):
        pipeline.sample_stage_b(sb, latent_c, cond.clip_text_pooled, uncond.clip_text_pooled, size=(64, 64),
                                settings=StageBSettings(steps=2))
    monkeypatch.setattr(StageA, "decode", lambda self, x: torch.full((x.shape[0], 3, 64, 64), float("nan")))
    with pytest.raises(NonFiniteError, match="Stage A decode produced NaN"):
        pipeline.decode_stage_a(sa, torch.zeros(1, 4, 16, 16))
    with pytest.raises(NonFiniteError, match="the Stage B latent given to Stage A"):
        pipeline.decode_stage_a(sa, torch.full((1, 4, 16, 16), float("nan")))
    monkeypatch.setattr(EfficientNetEncoder, "forward", lambda self, x: torch.full((x.shape[0], 16, 2, 2), float("nan")))
    with pytest.raises(NonFiniteError, match="The semantic encoder"):
        pipeline.encode_semantic(cascade.model("effnet").module, torch.rand(1, 3, 64, 64))


def test_what_to_try_follows_the_weights_dtype():
    nan = torch.tensor([float("nan")])
    with pytest.raises(NonFiniteError, match="bf16 or fp32.*fp16_guard"):
        limits.check_finite(nan, "Stage C", torch.float16)
    with pytest.raises(NonFiniteError, match="even with the fp16 guard"):
        limits.check_finite(nan, "Stage C", torch.float16, fp16_guard=True)
    with pytest.raises(NonFiniteError, match="model file.*try fp32"):
        limits.check_finite(nan, "Stage B", torch.bfloat16)
    limits.check_finite(torch.ones(3), "Stage C", torch.float16)  # finite: nothing to say


# ------------------------------------------------------------------------------------------------
# Bounding the work


def test_a_request_that_cannot_fit_is_refused_with_the_numbers_before_any_model_loads(cascade, no_loading):
    with pytest.raises(RequestError) as info:
        cascade.generate("a cat", width=1024, height=1024, compression=0.01, stage_c=FAST_C, stage_b=FAST_B)
    message = str(info.value)
    assert "compression 0.01" in message and "Stage C sampling needs at least" in message
    assert "TB" in message and "factor of about" in message and "\n" not in message


def test_a_huge_latent_is_refused_before_it_is_allocated(cascade, prompts, no_forward, monkeypatch):
    cond, uncond = prompts
    monkeypatch.setattr(limits, "device_memory", lambda device: 8 * 1024 ** 3)  # an 8 GB machine
    with pytest.raises(RequestError, match="Stage C with a 24000x24000 latent, batch 1: .* 8.6 GB of RAM here"):
        pipeline.sample_stage_c(cascade.model("stage_c").module, cond, uncond, shape=(1, 16, 24000, 24000),
                                settings=FAST_C)


def test_the_estimate_scales_with_the_request_and_is_modest_for_the_official_one():
    from wuerstchen.models import configs
    from wuerstchen.files.checkpoints import build_module

    with torch.device("meta"):
        sc = build_module("stage_c", configs.official(configs.STAGE_C, "full"))
        sb = build_module("stage_b", configs.official(configs.STAGE_B, "full"))

    def total(batch, side, c_cfg=4.0):
        latent_c = pipeline.stage_c_latent_size(side, side)
        latent_b = pipeline.stage_b_latent_size(side, side)
        needs = limits.estimate(batch=batch, size=(side, side), stage_c=(sc, latent_c, c_cfg != 1),
                                stage_b=(sb, latent_b, True), dtype=torch.bfloat16)
        return {n.what: n.nbytes for n in needs}

    official = total(1, 1024)
    # Stage C at 1024²: 12 activations x 2 rows (CFG) x 576 tokens x 2048 wide x 2 bytes, plus the latents.
    assert official["Stage C sampling"] == 12 * 2 * 576 * 2048 * 2 + 6 * 2 * 16 * 576 * 4
    # Stage B's widest level is its first: 128x128 tokens (patch 2) x 320 wide.
    assert official["Stage B sampling"] == 12 * 2 * 128 * 128 * 320 * 2 + 6 * 2 * 4 * 256 * 256 * 4
    assert sum(official.values()) < 1024 ** 3
    assert total(4, 1024)["Stage B sampling"] == 4 * official["Stage B sampling"]
    assert total(1, 1024, c_cfg=1.0)["Stage C sampling"] * 2 == official["Stage C sampling"]


def test_a_long_thin_variation_reference_stays_small(monkeypatch):
    """A 2x4000 reference asked the official resize for a 768x1,536,000 image (14 GB)."""
    real = preprocess.F.interpolate
    largest = []

    def bounded(x, size=None, **kwargs):
        assert math.prod(size) <= 768 * 768 * preprocess.MAX_ASPECT, f"asked to resize to {size}"
        largest.append(math.prod(size))
        return real(x, size=size, **kwargs)

    monkeypatch.setattr(preprocess.F, "interpolate", bounded)
    out = preprocess.clip_preprocess(torch.rand(1, 2, 4000, 3))
    assert out.shape == (1, 3, 224, 224) and torch.isfinite(out).all() and largest


def test_an_ordinary_aspect_is_preprocessed_exactly_as_officially():
    image = torch.rand(1, 40, 300, 3, generator=torch.Generator().manual_seed(0))  # 1:7.5, under MAX_ASPECT
    pieces = preprocess.to_float_images(image)
    official = preprocess._normalize(preprocess._center_crop(preprocess._resize(
        preprocess._resize(pieces[0], 768, "bilinear", True), 224, "bicubic", False), 224))
    assert torch.equal(preprocess.clip_preprocess(image)[0], official)


# ------------------------------------------------------------------------------------------------
# Images and masks


def _write_png16(path, array):
    Image.fromarray(array.astype(np.uint16)).save(path)


def test_16_bit_and_float_pictures_keep_their_values(tmp_path):
    grey = (np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)  # 0 .. 61400 of 65535
    _write_png16(tmp_path / "g16.png", grey)
    img = options._load_image(str(tmp_path / "g16.png"))
    assert img.shape == (1, 3, 32, 48)
    expected = torch.from_numpy(grey.astype(np.float32) / 65535.0)
    assert torch.allclose(img[0, 0], expected, atol=1e-6) and torch.equal(img[0, 0], img[0, 2])
    mask = options._load_image(str(tmp_path / "g16.png"), "L", "--mask")
    assert mask.shape == (1, 1, 32, 48) and torch.allclose(mask[0, 0], expected, atol=1e-6)

    values = np.linspace(0, 1, 32 * 48, dtype=np.float32).reshape(32, 48)
    Image.fromarray(values).save(tmp_path / "f.tiff")
    img = options._load_image(str(tmp_path / "f.tiff"))
    assert torch.allclose(img[0, 1], torch.from_numpy(values), atol=1e-6)
    # the CLIP preprocessing reads pictures the same way
    with Image.open(tmp_path / "g16.png") as picture:
        assert torch.allclose(preprocess.to_float_images(picture)[0][0], expected, atol=1e-6)


def test_8_bit_pictures_read_as_before(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img = options._load_image(str(tmp_path / "rgb.png"))
    assert torch.equal(img[0], torch.from_numpy(rgb).float().permute(2, 0, 1) / 255.0)


def _bomb(path, width=30000, height=30000):
    """A PNG whose header says 900 megapixels (never decoded: it is refused from the header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_grey_reference_works_for_variations(cascade):
    vis = cascade.model("clip_vision").module
    grey = torch.rand(1, 1, 48, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pipeline.encode_image_embeds(vis, grey), pipeline.encode_image_embeds(vis, grey.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize("images,message", [
    (torch.zeros(1, 3, 0, 8), "empty"), (torch.zeros(1, 2, 8, 8), "expected images"),
    (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
])
def test_unusable_images_are_refused_by_name(cascade, images, message):
    with pytest.raises(RequestError, match=f"Stage A encode image.*{message}|{message}"):
        pipeline.encode_stage_a(cascade.model("stage_a").module, images)


def test_masks_pair_with_images_by_a_clear_rule():
    images = torch.rand(2, 3, 8, 8)
    top, bottom = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    top[:, :4], bottom[:, 4:] = 1, 1
    two = control.control_input("inpainting", images, torch.cat([top, bottom]))
    assert torch.equal(two[0, 3], top[0]) and torch.equal(two[1, 3], bottom[0])  # one mask per image
    one = control.control_input("inpainting", images, top)
    assert torch.equal(one[1, 3], top[0])  # one mask for every image
    broadcast = control.control_input("inpainting", images[:1], torch.cat([top, bottom]))
    assert broadcast.shape[0] == 2 and torch.equal(broadcast[1, 3], bottom[0])  # one image for every mask
    with pytest.raises(RequestError, match="2 masks for 3 images"):
        control.control_input("inpainting", torch.rand(3, 3, 8, 8), torch.cat([top, bottom]))
    four_d = control.control_input("inpainting", images, torch.cat([top, bottom])[:, None])
    assert torch.equal(four_d, two)
    with pytest.raises(RequestError, match="inpainting mask: the mask is empty"):
        control.control_input("inpainting", images, torch.zeros(0, 8, 8))


# ------------------------------------------------------------------------------------------------
# A ControlNet made for another Stage C width


def test_a_controlnet_for_the_full_stage_c_is_refused_by_the_lite_one(tiny_dir, prompts, no_forward):
    cond, uncond = prompts
    lite = load(tiny_dir / "stage_c_lite.safetensors").module  # 24 wide; the tiny ControlNets are 32 wide
    canny = load(tiny_dir / "controlnet" / "canny.safetensors").module
    hint = control.Hint(canny, torch.zeros(1, 1, 64, 64))
    with pytest.raises(RequestError, match="canny ControlNet does not fit this Stage C: its maps are 32 wide but this "
                                           "Stage C is 24 wide"):
        pipeline.sample_stage_c(lite, cond, uncond, shape=(1, 16, 2, 2), settings=FAST_C, control=[hint])


def test_the_cascade_checks_controlnet_widths_from_the_files(tiny_dir, tmp_path, no_loading):
    models = tmp_path / "models"
    shutil.copytree(tiny_dir, models, ignore=shutil.ignore_patterns("stage_c.safetensors", "stage_c_bf16.*",
                                                                    "stable_cascade_stage_c.*"))
    cascade = Cascade(CascadeFiles.from_dir(models), ModelManager(device="cpu"), root=str(models))
    hint = control.Control("canny", torch.rand(1, 3, 64, 64))
    with pytest.raises(RequestError, match="canny ControlNet does not fit this Stage C"):
        cascade.generate("a cat", width=64, height=64, stage_c=FAST_C, stage_b=FAST_B, controls=[hint])


# ------------------------------------------------------------------------------------------------
# Library requests that were silently ignored


def test_img2img_with_full_denoise_or_a_mismatched_batch_is_refused(cascade, no_loading):
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(RequestError, match="denoise is 1"):
        cascade.generate("a cat", width=64, height=64, image=image, stage_c=FAST_C, stage_b=FAST_B)
    with pytest.raises(RequestError, match="2 img2img images for a batch of 3"):
        cascade.generate("a cat", width=64, height=64, batch=3, image=torch.rand(2, 3, 64, 64),
                         stage_c=StageCSettings(steps=1, denoise=0.5), stage_b=FAST_B)
    with pytest.raises(RequestError, match="image_mode"):
        cascade.generate("a cat", width=64, height=64, image=image, image_mode="inpaint", stage_c=FAST_C,
                         stage_b=FAST_B)


def test_devices_this_machine_lacks_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RequestError, match="'bogus' is not a device"):
        limits.check_device("bogus")
    with pytest.raises(RequestError, match="CUDA is not available"):
        limits.check_device("cuda:0")
    assert limits.check_device("cpu") == torch.device("cpu") and limits.check_device(None) is None


# ------------------------------------------------------------------------------------------------
# The CLI: one line, exit code 2, nothing loaded, nothing written


def run_cli(tiny_dir, out, *extra):
    return cli.main(["generate", "--prompt", "a cat", "--models", str(tiny_dir), "--out", str(out), "--width", "64",
                     "--height", "64", "--c-steps", "1", "--b-steps", "1", *extra])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "red.png")
    (folder / "not_a_picture.png").write_bytes(b"hello")
    _bomb(folder / "bomb.png")  # Pillow itself refuses this one on opening
    _bomb(folder / "big.png", 12000, 9000)  # 108 megapixels: only a warning for Pillow
    (folder / "a_file").write_text("x")
    return folder


@pytest.mark.parametrize("args,message", [
    (["--out", "FOLDER"], "is a folder; give a file name such as"),
    (["--out", "FOLDER/picture"], "has no suffix; end it with .png"),
    (["--out", "FOLDER/picture.xyz"], "has the suffix '.xyz'"),
    (["--out", "FOLDER/a_file/picture.png"], "is a file, so no folder can be made there"),
    (["--image", "FOLDER/not_a_picture.png"], "cannot read the image"),
    (["--image", "FOLDER/bomb.png"], "has more than the 100 megapixels read here"),
    (["--image", "FOLDER/big.png"], "is 12000x9000 pixels, more than the 100 megapixels read here"),
    (["--image", "FOLDER"], "is a folder; give a picture file"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--models", "FOLDER/nowhere"], "--models 'FOLDER/nowhere' does not exist"),
    (["--models", "FOLDER/a_file"], "is a file; give the folder that holds the weight files"),
    (["--variation"], "--variation needs --image"),
    (["--denoise", "0.5"], "--denoise is the img2img strength: it is only used with --image"),
    (["--image", "FOLDER/red.png", "--variation", "--denoise", "0.5"], "only used with --image and without --variation"),
    (["--image", "FOLDER/red.png", "--denoise", "0"], "--denoise must be a finite number above 0 and at most 1"),
    (["--image", "FOLDER/red.png", "--denoise", "1.5"], "--denoise must be"),
    (["--image", "FOLDER/red.png", "--denoise", "nan"], "--denoise must be"),
    (["--c-cfg", "nan"], "--c-cfg must be a finite number, got nan"),
    (["--b-cfg", "inf"], "--b-cfg must be a finite number"),
    (["--c-shift", "0"], "--c-shift must be a finite number above 0"),
    (["--b-shift", "-1"], "--b-shift must be a finite number above 0"),
    (["--cfg-rho", "nan"], "--cfg-rho must be"),
    (["--compression", "0"], "--compression must be a finite number above 0"),
    (["--compression", "nan"], "--compression must be"),
    (["--batch", "0"], "--batch must be a whole number at least 1 and at most 64"),
    (["--batch", "10000"], "every image of a batch is in memory at once"),
    (["--c-steps", "1000000"], "--c-steps must be a whole number at least 1 and at most 1000"),
    (["--b-steps", "0"], "--b-steps must be"),
    (["--width", "63"], "is too small"),
])
def test_cli_refusals_are_one_line_before_any_model_loads(tiny_dir, files, tmp_path, no_loading, capsys, args,
                                                          message):
    args = [a.replace("FOLDER", str(files)) for a in args]
    message = message.replace("FOLDER", str(files))
    out = tmp_path / "o.png"
    assert run_cli(tiny_dir, out, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_cuda_without_a_gpu(tiny_dir, tmp_path, no_loading, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli(tiny_dir, tmp_path / "o.png", "--device", "cuda") == 2
    assert "--device 'cuda': CUDA is not available here" in capsys.readouterr().err


def test_cli_refuses_what_cannot_fit_before_any_model_loads(tiny_dir, tmp_path, no_loading, capsys):
    assert run_cli(tiny_dir, tmp_path / "o.png", "--width", "1024", "--height", "1024", "--compression", "0.01",
                   "--family", "v3") == 2  # the tiny release holds both families: no note about the choice
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Stage C sampling needs at least" in err[0] and "raise the compression" in err[0]


def test_cli_refuses_a_controlnet_for_another_stage_c_before_any_model_loads(tiny_dir, files, tmp_path, no_loading,
                                                                             capsys):
    models = tmp_path / "models"
    shutil.copytree(tiny_dir, models, ignore=shutil.ignore_patterns("stage_c.safetensors", "stage_c_bf16.*",
                                                                    "stable_cascade_stage_c.*"))
    assert run_cli(models, tmp_path / "o.png", "--control", f"canny={files / 'red.png'}") == 2
    assert "the canny ControlNet does not fit this Stage C" in capsys.readouterr().err


def test_cli_tiny_models_into_a_file_is_refused(files, capsys):
    assert cli.main(["tiny-models", str(files / "a_file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert (files / "a_file").read_text() == "x"


def test_cli_odd_size_and_non_finite_run(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "odd.png"
    assert run_cli(tiny_dir, out, "--width", "260", "--height", "68") == 0
    assert Image.open(out).size == (260, 68)
    monkeypatch.setattr(StageC, "forward", lambda self, x, *a, **k: torch.full_like(x, float("nan")))
    capsys.readouterr()
    assert run_cli(tiny_dir, tmp_path / "nan.png") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: Stage C produced NaN or inf values at step 1 of 1")
    assert not (tmp_path / "nan.png").exists()


def test_cli_never_loses_a_finished_image(tiny_dir, tmp_path, capsys, monkeypatch):
    """The output turned unwritable while sampling: the image goes to a safe name, and the line says where."""
    out = tmp_path / "gone" / "o.png"
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if str(fp) == str(out):
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    assert run_cli(tiny_dir, out) == 1
    captured = capsys.readouterr()
    line = [l for l in captured.err.splitlines() if l.startswith("error:")][0]
    assert "could not write" in line and "No space left on device" in line and "the image was saved to" in line
    saved = line.rsplit("saved to ", 1)[1].split(" instead")[0]
    try:
        assert Image.open(saved).size == (64, 64) and f"wrote {saved}" in captured.out
    finally:
        shutil.os.remove(saved)


# ------------------------------------------------------------------------------------------------
# The nodes: a NodeError naming the node, before any model runs


@pytest.fixture(scope="module")
def node_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("node_models")
    tiny.write_tiny_models(root / "wuerstchen")
    host.configure(root, manager=ModelManager())
    return root


def node(node_type, **kwargs):
    cls = NODE_CLASS_MAPPINGS[node_type]
    return getattr(cls(), cls.FUNCTION)(**kwargs)


@pytest.fixture(scope="module")
def graph(node_models):
    stage_c = node("WuerstchenStageCLoader", model_name="stage_c.safetensors", dtype="auto")[0]
    clip = node("WuerstchenCLIPTextLoader", model_name="text_encoder/model.safetensors", dtype="auto")[0]
    positive = node("WuerstchenTextEncode", clip=clip, text="a cat")[0]
    negative = node("WuerstchenTextEncode", clip=clip, text="")[0]
    return dict(stage_c=stage_c, positive=positive, negative=negative)


def sample_c(graph, latent, **settings):
    values = dict(seed=0, steps=1, cfg=4.0, shift=2.0, sampler="ddpm", denoise=1.0, cfg_rho=0.7)
    values.update(settings)
    return node("WuerstchenStageCSampler", stage_c=graph["stage_c"], positive=graph["positive"],
                negative=graph["negative"], latent=latent, **values)[0]


def test_nodes_make_any_size_and_crop_back(graph):
    latent_c, latent_b = node("WuerstchenEmptyLatent", width=260, height=264, compression=42.67, batch_size=1)
    assert latent_b["samples"].shape[-2:] == (66, 66)
    sampled_c = sample_c(graph, latent_c)
    stage_b = node("WuerstchenStageBLoader", model_name="stage_b.safetensors", dtype="auto")[0]
    sampled_b = node("WuerstchenStageBSampler", stage_b=stage_b, stage_c=sampled_c, positive=graph["positive"],
                     negative=graph["negative"], seed=0, steps=1, cfg=1.1, shift=1.0, sampler="ddpm", width=0,
                     height=0, cfg_rho=0.7)[0]
    stage_a = node("WuerstchenStageALoader", model_name="stage_a.safetensors", dtype="auto")[0]
    pixels = node("WuerstchenStageADecode", stage_a=stage_a, latent=sampled_b, tile_size=0)[0]
    assert pixels.shape == (1, 264, 260, 3)
    resized = dict(sampled_b, samples=torch.nn.functional.interpolate(sampled_b["samples"], scale_factor=2))
    assert node("WuerstchenStageADecode", stage_a=stage_a, latent=resized, tile_size=0)[0].shape == (1, 528, 528, 3)


@pytest.mark.parametrize("settings,message", [
    (dict(cfg=float("nan")), "WuerstchenStageCSampler: Stage C cfg must be a finite number"),
    (dict(shift=0.0), "WuerstchenStageCSampler: Stage C shift must be a finite number above 0"),
    (dict(denoise=float("nan")), "Stage C denoise"),
    (dict(steps=10 ** 6), "Stage C steps"),
])
def test_stage_c_sampler_node_refuses_settings(graph, no_forward, settings, message):
    latent_c, _ = node("WuerstchenEmptyLatent", width=256, height=256, compression=42.67, batch_size=1)
    with pytest.raises(NodeError, match=message):
        sample_c(graph, latent_c, **settings)


@pytest.mark.parametrize("inputs,message", [
    (dict(compression=float("nan")), "WuerstchenEmptyLatent: compression must be"),
    (dict(compression=0.0), "compression must be a finite number above 0"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(width=32), "too small"),
])
def test_empty_latent_node_refuses_inputs(node_models, inputs, message):
    values = dict(width=256, height=256, compression=42.67, batch_size=1)
    values.update(inputs)
    with pytest.raises(NodeError, match=message):
        node("WuerstchenEmptyLatent", **values)


def test_stage_c_sampler_node_reports_a_non_finite_step(graph, monkeypatch):
    latent_c, _ = node("WuerstchenEmptyLatent", width=256, height=256, compression=42.67, batch_size=1)
    monkeypatch.setattr(StageC, "forward", lambda self, x, *a, **k: torch.full_like(x, float("nan")))
    with pytest.raises(NodeError, match="WuerstchenStageCSampler: Stage C produced NaN or inf values at step 1"):
        sample_c(graph, latent_c)


def test_controlnet_node_refuses_a_lite_stage_c_and_bad_masks(graph, no_forward):
    lite = node("WuerstchenStageCLoader", model_name="stage_c_lite.safetensors", dtype="auto")[0]
    canny = node("WuerstchenControlNetLoader", model_name="controlnet/canny.safetensors", dtype="auto")[0]
    image = torch.rand(1, 64, 64, 3)
    hint = node("WuerstchenControlNetApply", controlnet=canny, image=image, strength=1.0, start_percent=0.0,
                end_percent=1.0)[0]
    latent_c, _ = node("WuerstchenEmptyLatent", width=256, height=256, compression=42.67, batch_size=1)
    with pytest.raises(NodeError, match="WuerstchenStageCSampler: the canny ControlNet does not fit this Stage C"):
        node("WuerstchenStageCSampler", stage_c=lite, positive=graph["positive"], negative=graph["negative"],
             latent=latent_c, seed=0, steps=1, cfg=4.0, shift=2.0, sampler="ddpm", denoise=1.0, cfg_rho=0.7,
             control=hint)

    inpaint = node("WuerstchenControlNetLoader", model_name="controlnet/inpainting.safetensors", dtype="auto")[0]

    def apply(images, mask):
        return node("WuerstchenControlNetApply", controlnet=inpaint, image=images, strength=1.0, start_percent=0.0,
                    end_percent=1.0, mask=mask)[0]

    four_d = apply(image, torch.ones(1, 1, 64, 64))  # [B, 1, H, W] masks are masks too
    assert four_d.control_input.shape == (1, 4, 64, 64) and torch.equal(four_d.control_input[:, 3], torch.ones(1, 64, 64))
    with pytest.raises(NodeError, match="WuerstchenControlNetApply: 'mask': the mask is empty"):
        apply(image, torch.zeros(1, 0, 0))
    with pytest.raises(NodeError, match="WuerstchenControlNetApply: .*2 masks for 3 images"):
        apply(torch.rand(3, 64, 64, 3), torch.ones(2, 64, 64))
    with pytest.raises(NodeError, match="WuerstchenControlNetApply: 'image': the image is empty"):
        apply(torch.zeros(1, 0, 64, 3), None)


def test_image_variation_node_takes_grey_images_and_refuses_a_nan_strength(graph, node_models):
    vision = node("WuerstchenCLIPVisionLoader", model_name="image_encoder/model.safetensors", dtype="auto")[0]
    grey = torch.rand(1, 48, 64, 1)
    out = node("WuerstchenImageVariation", conditioning=graph["positive"], clip_vision=vision, image=grey,
               strength=1.0)[0]
    rgb = node("WuerstchenImageVariation", conditioning=graph["positive"], clip_vision=vision,
               image=grey.expand(-1, -1, -1, 3), strength=1.0)[0]
    key = "wuerstchen_clip_img"
    assert torch.equal(out[0][1][key], rgb[0][1][key])
    with pytest.raises(NodeError, match="WuerstchenImageVariation: strength must be a finite number"):
        node("WuerstchenImageVariation", conditioning=graph["positive"], clip_vision=vision, image=grey,
             strength=float("inf"))
