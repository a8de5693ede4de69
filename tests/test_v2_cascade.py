"""Würstchen v2 from a folder and from the command line: files found in both release layouts, the
recipe wired as the hub pipeline (checked against pipeline_v2, itself checked against the hub run),
seeds, negative prompts, img2img, sizes, family choice and per-family defaults.

Tiny random models, 128x128 images (a 3x3 prior latent) and 2-3 steps keep it cheap."""

import pytest
import torch
from PIL import Image

from wuerstchen.files import checkpoints
from wuerstchen import cli
from wuerstchen.options import generate as options
from wuerstchen.files import kinds
from wuerstchen.files import tiny
from wuerstchen.pipeline import stages_v2 as v2
from wuerstchen.pipeline.cascade import CascadeFiles, MissingWeightsError
from wuerstchen.pipeline.cascade_v2 import CascadeV2
from wuerstchen.files.management import ModelManager
from wuerstchen.storage.weights_io import save_safetensors

SIZE = 128
FEW = dict(prior=v2.PriorSettings(steps=3), decoder=v2.DecoderSettings(steps=2))


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2_release")
    tiny.write_tiny_models(root, families=[kinds.WUERSTCHEN_V2])
    return root


@pytest.fixture(scope="module")
def cascade(v2_dir):
    return CascadeV2(CascadeFiles.from_dir(v2_dir), ModelManager(cache_budget=None), root=str(v2_dir))


def test_only_the_v2_release_is_written_for_the_v2_family(v2_dir):
    names = sorted(p.relative_to(v2_dir).as_posix() for p in v2_dir.rglob("*") if p.is_file())
    expected = sorted({f.name for k in kinds.KINDS.values() for f in k.files_of(kinds.WUERSTCHEN_V2)})
    assert names == expected and len(names) == 10
    assert CascadeFiles.from_dir(v2_dir).complete_families() == [kinds.WUERSTCHEN_V2]


@pytest.mark.parametrize("kind, hub, original", [
    ("v2_prior", "wuerstchen-prior/prior/diffusion_pytorch_model.safetensors", "model_v3_stage_c.pt"),
    ("v2_decoder", "wuerstchen/decoder/diffusion_pytorch_model.safetensors", "model_v2_stage_b.pt"),
    ("stage_a", "wuerstchen/vqgan/diffusion_pytorch_model.safetensors", "vqgan_f4_v1_500k.pt"),
])
def test_both_release_layouts_load_to_the_same_network(v2_dir, kind, hub, original):
    """The tiny release writes one set of weights in both spellings (q/k/v split in the hub files,
    packed in_proj in the .pt containers); loaded by content they are one network."""
    a = checkpoints.load(v2_dir / hub, kinds=[kind])
    b = checkpoints.load(v2_dir / original, kinds=[kind])
    assert a.kind == b.kind == kind and a.config == b.config
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_bin_revision_of_a_hub_file_loads_by_content(v2_dir, tmp_path):
    """Some hub revisions ship only diffusion_pytorch_model.bin: a flat pickled dict, read weights_only."""
    hub = checkpoints.load(v2_dir / "wuerstchen/decoder/diffusion_pytorch_model.safetensors", kinds=["v2_decoder"])
    state = kinds.get("v2_decoder").spellings["diffusers"](hub.module.state_dict())
    torch.save(dict(state), tmp_path / "diffusion_pytorch_model.bin")
    loaded = checkpoints.load(tmp_path / "diffusion_pytorch_model.bin")
    assert loaded.kind == "v2_decoder" and loaded.config == hub.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.module.state_dict().values(), hub.module.state_dict().values()))


def test_reference_prior_loads_by_content_and_matches_the_hub_class(tmp_path):
    """The reference vector's weights (diffusers keys), saved as a renamed file with its config hint,
    load through detection and reproduce the recorded outputs; bf16 files stay bf16."""
    from conftest import load_v2

    meta, weights, io = load_v2("v2_prior")
    path = tmp_path / "my_prior.safetensors"
    save_safetensors(weights, path, metadata=tiny._meta(v2_prior=meta["config"]))
    loaded = checkpoints.load(path)
    assert loaded.kind == "v2_prior" and loaded.config == meta["config"]
    call = meta["calls"][0]
    kwargs = {a["name"]: io[a["key"]] for a in call["args"] if "key" in a}
    with torch.no_grad():
        out = loaded.module(**kwargs)
    assert (out - io["call0.out"]).abs().max() < call.get("suggested_atol", 1e-4)
    save_safetensors({k: v.to(torch.bfloat16) for k, v in weights.items()}, path,
                     metadata=tiny._meta(v2_prior=meta["config"]))
    assert {p.dtype for p in checkpoints.load(path).module.parameters()} == {torch.bfloat16}


def test_generate_is_the_hub_recipe_on_the_files_found(cascade, v2_dir):
    """CascadeV2 = both towers on prompt and negative, prior, x·42 − 1, decoder on one generator, VQGAN."""
    got = cascade.generate("a cat", "blurry", width=SIZE, height=SIZE, seed=3, **FEW)
    load = lambda kind: cascade.model(kind).module  # noqa: E731
    prior_text = v2.encode_text_v2(load("v2_prior_text"), "a cat", "blurry")
    decoder_text = v2.encode_text_v2(load("v2_decoder_text"), "a cat", "blurry")
    ref = v2.text_to_image_v2(load("v2_prior"), load("v2_decoder"), load("stage_a"), prior_text, decoder_text,
                              height=SIZE, width=SIZE, seed=3, prior_settings=FEW["prior"],
                              decoder_settings=FEW["decoder"])
    assert got.shape == (1, 3, SIZE, SIZE) and torch.equal(got, ref.images)
    assert got.std() > 0


def test_seeds_negative_prompts_and_batches(cascade):
    run = lambda **kw: cascade.generate("a cat", width=SIZE, height=SIZE, **FEW, **kw)  # noqa: E731
    a = run(seed=1)
    assert torch.equal(a, run(seed=1))
    assert not torch.equal(a, run(seed=2))
    assert not torch.equal(a, run(seed=1, negative="a dog"))
    two = run(seed=1, batch=2)
    assert two.shape == (2, 3, SIZE, SIZE) and not torch.equal(two[0], two[1])


def test_img2img_starts_from_the_v2_effnet_encoding(cascade):
    picture = torch.linspace(0, 1, 3 * 96 * 80).reshape(1, 3, 96, 80)
    run = lambda **kw: cascade.generate("a cat", width=SIZE, height=SIZE, seed=5, **FEW, **kw)  # noqa: E731
    text_only = run()
    low, high = run(image=picture, denoise=0.3), run(image=picture, denoise=0.9)
    assert low.shape == (1, 3, SIZE, SIZE)
    assert not torch.equal(low, text_only) and not torch.equal(low, high)
    assert torch.equal(low, run(image=picture, denoise=0.3))
    with pytest.raises(ValueError, match="denoise"):
        run(image=picture, denoise=0.0)


def test_sizes_the_decoder_cannot_take_are_refused_before_loading(v2_dir):
    manager = ModelManager(cache_budget=None)
    cv2 = CascadeV2(CascadeFiles.from_dir(v2_dir), manager, root=str(v2_dir))
    with pytest.raises(ValueError, match=r"cannot make 960x1024.*use 1024x1024"):
        cv2.generate("a cat", width=960, height=1024)
    assert manager.cached() == []
    assert v2.output_size(1000, 1000) == (1024, 1024) and v2.round_size_v2(960, 700) == (1024, 640)


def test_img2img_without_the_v2_effnet_names_the_file(tmp_path, v2_dir):
    import shutil

    root = tmp_path / "no_effnet"
    shutil.copytree(v2_dir, root, ignore=shutil.ignore_patterns("model_v2_stage_b.pt"))
    cv2 = CascadeV2(CascadeFiles.from_dir(root), ModelManager(cache_budget=None), root=str(root))
    with pytest.raises(MissingWeightsError) as info:
        cv2.generate("a cat", width=SIZE, height=SIZE, image=torch.rand(1, 3, 64, 64), **FEW)
    text = str(info.value)
    assert kinds.title("v2_effnet") in text and "model_v2_stage_b.pt" in text and kinds.HF_WUERSTCHEN_ORIGINAL in text


# ------------------------------------------------------------------------------------------------
# Command line


def _generate(*args):
    return cli.main(["generate", "--prompt", "a cat", *args])


def test_cli_picks_the_family_from_the_files(v2_dir, tmp_path, capsys):
    out = tmp_path / "v2.png"
    assert _generate("--models", str(v2_dir), "--out", str(out), "--width", "1000", "--height", str(SIZE),
                     "--c-steps", "2", "--b-steps", "1") == 0
    assert Image.open(out).size == (1024, SIZE)
    assert "Würstchen v2 makes 1024x128 for 1000x128" in capsys.readouterr().err
    # Stable Cascade options mean the user thinks these are other weights: one line, before loading.
    assert _generate("--models", str(v2_dir), "--out", str(out), "--lora", "x.safetensors") == 2
    assert _generate("--models", str(v2_dir), "--out", str(out), "--cfg-rho", "0.5") == 2
    err = capsys.readouterr().err
    assert "--cfg-rho is a Stable Cascade option" in err and "plain CFG" in err
    assert _generate("--models", str(v2_dir), "--out", str(out), "--sampler", "euler") == 2
    assert "own DDPM scheduler" in capsys.readouterr().err
    assert _generate("--models", str(v2_dir), "--out", str(out), "--width", "700") == 2
    assert "cannot make 700x1024" in capsys.readouterr().err
    # Forcing the other family on these files lists what it misses.
    assert _generate("--models", str(v2_dir), "--out", str(out), "--family", "v3") == 2
    err = capsys.readouterr().err
    assert "Missing model weights" in err and "stage_c.safetensors" in err


def test_cli_with_both_or_neither_family(tmp_path, capsys):
    both = tmp_path / "both"
    tiny.write_tiny_models(both)
    files = CascadeFiles.from_dir(both)
    family, note = files.choose_family(both)
    assert family == kinds.STABLE_CASCADE and "--family v2" in note
    assert files.choose_family(both, kinds.WUERSTCHEN_V2) == (kinds.WUERSTCHEN_V2, None)
    out = tmp_path / "img.png"
    assert _generate("--models", str(both), "--out", str(out), "--width", str(SIZE), "--height", str(SIZE),
                     "--family", "v2", "--c-steps", "1", "--b-steps", "1") == 0
    assert "note:" not in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert _generate("--models", str(tmp_path / "nothing"), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "no model family is complete" in err and "--family v3" in err and "--family v2" in err
    assert err.index("stage_c.safetensors") < err.index("model_v3_stage_c.pt")


def test_an_incomplete_other_family_is_named_when_one_is_picked(tmp_path):
    """A broken Stable Cascade file beside a complete v2 set: v2 is used, and the note says why."""
    root = tmp_path / "both"
    tiny.write_tiny_models(root)
    for name in ("stage_b_bf16.safetensors", "stage_b_lite.safetensors", "stage_b_lite_bf16.safetensors",
                 "stable_cascade_stage_b.safetensors"):
        (root / name).unlink()
    raw = (root / "stage_b.safetensors").read_bytes()
    (root / "stage_b.safetensors").write_bytes(raw[:-100])
    family, note = CascadeFiles.from_dir(root).choose_family(root)
    assert family == kinds.WUERSTCHEN_V2
    assert "Stable Cascade (Würstchen v3) set here is incomplete (missing: Stage B" in note
    assert "stage_b.safetensors" in note and "truncated" in note and "--family v3" in note


def test_cli_defaults_are_each_familys_official_ones():
    from wuerstchen.pipeline.stages import StageBSettings, StageCSettings

    def parsed(*extra):
        return cli.build_parser().parse_args(["generate", "--prompt", "p", "--models", "m", "--out", "o", *extra])

    prior, decoder, denoise = options.v2_settings(parsed())
    assert prior.steps is None and prior.cfg == 4.0 and prior.grid().numel() == 30  # the hub's 29-step grid
    assert (decoder.steps, decoder.cfg, denoise) == (12, 0.0, 1.0)
    prior, decoder, denoise = options.v2_settings(parsed("--c-steps", "60", "--b-cfg", "2", "--image", "x.png"), True)
    assert prior.grid().numel() == 61 and decoder.cfg == 2.0 and denoise == options.IMG2IMG_DENOISE
    with pytest.raises(options.UsageError, match="--b-steps must be a whole number at least 1"):
        options.v2_settings(parsed("--b-steps", "0"))
    assert options._parse_settings(parsed(), image_given=False) == (StageCSettings(), StageBSettings())
