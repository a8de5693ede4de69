"""The command line on the tiny models: text-to-image, img2img, variations, stacked LoRAs and chained
ControlNets, and one-line usage errors (exit code 2) before any model loads."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from wuerstchen import cli

from wuerstchen.options import generate as options
from wuerstchen.files.management import ModelManager
from wuerstchen.models.stage_c import StageC
from wuerstchen.text.encoder import CLIPTextEncoder

OUT_PROJ = "down_blocks.0.2.attention.attn.out_proj.weight"  # a module both tiny LoRAs patch
TEXT_OUT_PROJ = "text_model.encoder.layers.0.self_attn.out_proj.weight"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A picture with a bright square (edges for canny) and a mask of its top half."""
    folder = tmp_path_factory.mktemp("pictures")
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[16:48, 16:48] = (250, 200, 90)
    Image.fromarray(rgb).save(folder / "square.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def generate(tiny_dir, tmp_path, *extra):
    return cli.main(["generate", "--prompt", "a cat", "--models", str(tiny_dir), "--out", str(tmp_path / "o.png"),
                     "--width", "64", "--height", "64", "--c-steps", "2", "--b-steps", "1", *extra])


def test_generate_and_missing_weights(tiny_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = cli.main(["generate", "--prompt", "a cat", "--models", str(tiny_dir), "--out", str(out), "--width", "64",
                   "--height", "64", "--c-steps", "2", "--b-steps", "2", "--seed", "7"])
    assert rc == 0 and out.exists()
    assert Image.open(out).size == (64, 64)
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    rc = cli.main(["generate", "--prompt", "a cat", "--models", str(tmp_path / "empty"), "--out", str(out)])
    assert rc == 2
    assert "Missing model weights" in capsys.readouterr().err


def test_img2img_variation_and_samplers(tiny_dir, tmp_path):
    src = tmp_path / "src.png"
    Image.new("RGB", (80, 64), (200, 30, 30)).save(src)
    for extra in (["--image", str(src), "--denoise", "0.5"], ["--image", str(src), "--variation"],
                  ["--sampler", "dpmpp_2m", "--b-sampler", "euler_ancestral", "--batch", "2"]):
        assert generate(tiny_dir, tmp_path, *extra) == 0


def test_tiny_models_writes_every_official_name(tmp_path):
    assert cli.main(["tiny-models", str(tmp_path)]) == 0
    for name in ("stage_a", "stage_b", "stage_b_bf16", "stage_b_lite", "stage_b_lite_bf16", "stage_c", "stage_c_bf16",
                 "stage_c_lite", "stage_c_lite_bf16", "effnet_encoder", "previewer", "text_encoder/model",
                 "image_encoder/model", "controlnet/canny", "controlnet/inpainting", "controlnet/super_resolution",
                 "stable_cascade_stage_c", "stable_cascade_stage_b", "wuerstchen_tiny_lora"):
        assert (tmp_path / f"{name}.safetensors").exists(), name


def test_stacked_loras_and_a_canny_controlnet_on_the_first_half_of_the_steps(tiny_dir, pictures, tmp_path,
                                                                              monkeypatch):
    """Two LoRAs (official + kohya) and canny with :0:0.5 at 20 steps, shift 2: the hint reaches Stage C
    in exactly the first 10 calls, Stage C runs with base + both LoRA deltas, CLIP-G with the kohya
    text delta, and every weight is back to the file's afterwards."""
    calls, text_calls = [], []
    stage_c_forward, encode_prompts = StageC.forward, CLIPTextEncoder.encode_prompts

    def recording_forward(self, *args, **kwargs):
        calls.append((self, kwargs.get("cnet") is not None, self.get_parameter(OUT_PROJ).detach().clone()))
        return stage_c_forward(self, *args, **kwargs)

    def recording_encode(self, *args, **kwargs):
        name, rows = self.hf_key_to_param(TEXT_OUT_PROJ)
        assert rows is None
        text_calls.append((self, name, self.get_parameter(name).detach().clone()))
        return encode_prompts(self, *args, **kwargs)

    monkeypatch.setattr(StageC, "forward", recording_forward)
    monkeypatch.setattr(CLIPTextEncoder, "encode_prompts", recording_encode)
    official = tiny_dir / "wuerstchen_tiny_lora.safetensors"
    kohya = tiny_dir / "wuerstchen_tiny_lora_kohya.safetensors"
    rc = cli.main(["generate", "--prompt", "a cat", "--models", str(tiny_dir), "--out", str(tmp_path / "o.png"),
                   "--width", "64", "--height", "64", "--c-steps", "20", "--c-shift", "2", "--b-steps", "1",
                   "--dtype", "fp32", "--lora", str(official), "--lora", f"{kohya}:0.5:0.25",
                   "--control", f"canny={pictures / 'square.png'}:0:0.5"])
    assert rc == 0

    # The ControlNet: exactly the first half of the 20 steps (one batched CFG call per step).
    assert [with_cnet for _, with_cnet, _ in calls] == [True] * 10 + [False] * 10

    # Stage C ran with base + 1.0 * official delta + 0.5 * kohya delta, each scaled by alpha / rank (the
    # official LoRA module has alpha 1; kohya stores alpha). The official trainer's first entry is the
    # first attention block's out_proj (tests/test_lora.py checks that order).
    base = load_file(str(tiny_dir / "stage_c.safetensors"))
    lo, lk = load_file(str(official)), load_file(str(kohya))
    official_scale = 1.0 / lo["weights.0.lora_down"].shape[0]
    key = "lora_unet_down_blocks_0_2_attention_attn_out_proj"
    kohya_scale = float(lk[f"{key}.alpha"]) / lk[f"{key}.lora_down.weight"].shape[0]
    expected = (base[OUT_PROJ] + official_scale * lo["weights.0.lora_up"] @ lo["weights.0.lora_down"]
                + 0.5 * kohya_scale * lk[f"{key}.lora_up.weight"] @ lk[f"{key}.lora_down.weight"])
    assert not torch.allclose(expected, base[OUT_PROJ], atol=1e-3)
    for _, _, seen in calls:
        assert torch.allclose(seen, expected, atol=1e-6)

    # CLIP-G encoded both prompts with the kohya text part at text strength 0.25.
    te_base = load_file(str(tiny_dir / "text_encoder" / "model.safetensors"))
    tkey = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"
    t_scale = float(lk[f"{tkey}.alpha"]) / lk[f"{tkey}.lora_down.weight"].shape[0]
    t_expected = te_base[TEXT_OUT_PROJ] + 0.25 * t_scale * lk[f"{tkey}.lora_up.weight"] @ lk[f"{tkey}.lora_down.weight"]
    assert len(text_calls) == 2
    for _, _, seen in text_calls:
        assert torch.allclose(seen, t_expected, atol=1e-6)

    # Undone: the cached modules hold exactly the file's weights again.
    stage_c = calls[0][0]
    for name, value in stage_c.state_dict().items():
        assert torch.equal(value, base[name]), name
    te, name = text_calls[0][0], text_calls[0][1]
    assert torch.equal(te.get_parameter(name), te_base[TEXT_OUT_PROJ])


def test_inpainting_and_super_resolution_controls_chain(tiny_dir, pictures, tmp_path, monkeypatch):
    seen = []
    stage_c_forward = StageC.forward

    def recording_forward(self, *args, **kwargs):
        seen.append(kwargs.get("cnet") is not None)
        return stage_c_forward(self, *args, **kwargs)

    monkeypatch.setattr(StageC, "forward", recording_forward)
    rc = generate(tiny_dir, tmp_path, "--c-steps", "4", "--control", f"inpainting={pictures / 'square.png'}:0.8:0:0.25",
                  "--mask", str(pictures / "mask.png"), "--control",
                  f"super_resolution={pictures / 'square.png'}:1.2:0.5:1")
    assert rc == 0 and seen == [True, False, True, True]


@pytest.mark.parametrize("args,message", [
    (["--control", "depth=x.png"], "expected KIND=IMAGE[:STRENGTH][:START:END] with KIND one of canny, inpainting"),
    (["--control", "canny=PICTURE:1:0.6:0.4"], "ControlNet end (0.4) is before start (0.6)"),
    (["--control", "canny=PICTURE:nan"], "nan is not a finite number"),
    (["--control", "canny=PICTURE:1:0:1.5"], "between 0 and 1"),
    (["--control", "canny=missing.png"], "no such image 'missing.png'"),
    (["--control", "inpainting=PICTURE"], "inpainting needs --mask"),
    (["--mask", "PICTURE"], "--mask is only used with --control inpainting=IMAGE"),
    (["--lora", "missing.safetensors:0.5"], "no such file 'missing.safetensors'"),
    (["--lora", "PICTURE"], "not a valid safetensors file"),
    (["--image", "missing.png"], "--image 'missing.png': no such file"),
])
def test_usage_errors_are_one_line_before_any_model_loads(tiny_dir, pictures, tmp_path, monkeypatch, capsys, args,
                                                          message):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the command line was checked")

    monkeypatch.setattr(ModelManager, "load", no_loading)
    args = [a.replace("PICTURE", str(pictures / "square.png")) for a in args]
    assert generate(tiny_dir, tmp_path, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("spec,expected", [
    ("canny=PICTURE", (1.0, 0.0, 1.0)),
    ("canny=PICTURE:0.7", (0.7, 0.0, 1.0)),
    ("canny=PICTURE:0.2:0.6", (1.0, 0.2, 0.6)),
    ("canny=PICTURE:0.7:0.2:0.6", (0.7, 0.2, 0.6)),
])
def test_control_strength_and_range(pictures, spec, expected):
    control = options.parse_control(spec.replace("PICTURE", str(pictures / "square.png")), None)
    assert control.kind == "canny" and control.image.shape == (1, 3, 64, 64)
    assert (control.strength, control.start, control.end) == expected


def test_lora_strengths(tiny_dir):
    path = tiny_dir / "wuerstchen_tiny_lora_kohya.safetensors"
    assert (options.parse_lora(str(path)).model_strength, options.parse_lora(str(path)).text_strength) == (1.0, 1.0)
    use = options.parse_lora(f"{path}:0.5")
    assert (use.model_strength, use.text_strength) == (0.5, 0.5)
    use = options.parse_lora(f"{path}:0.5:-1")
    assert (use.model_strength, use.text_strength) == (0.5, -1.0)


def test_a_missing_controlnet_is_named_before_any_sampling(tiny_dir, pictures, tmp_path, capsys, monkeypatch):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_dir, models, ignore=shutil.ignore_patterns("controlnet"))
    sampled = []
    monkeypatch.setattr(StageC, "forward", lambda *a, **k: sampled.append(1))
    rc = generate(models, tmp_path, "--control", f"canny={pictures / 'square.png'}")
    err = capsys.readouterr().err
    assert rc == 2 and not sampled
    assert "no canny ControlNet" in err and "controlnet/canny.safetensors" in err


def test_the_cli_says_what_a_lora_applies_and_refuses_one_for_another_model(tiny_dir, tmp_path, caplog, capsys,
                                                                            monkeypatch):
    """Library and CLI report a LoRA like the node does; a LoRA that fits nothing stops before sampling."""
    import logging

    from safetensors.torch import save_file

    from wuerstchen.files.tiny import STAGE_C, write_tiny_lora

    partial = write_tiny_lora(None, "kohya", STAGE_C, seed=4)
    partial["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 8)
    partial["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, 2)
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with caplog.at_level(logging.INFO, logger="wuerstchen.lora"):
        assert generate(tiny_dir, tmp_path, "--lora", str(tmp_path / "partial.safetensors")) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generate: partial.safetensors")]
    assert len(lines) == 1 and "applied" in lines[0] and "keys not for this model" in lines[0]

    wider = write_tiny_lora(None, "official", dict(STAGE_C, c_hidden=[48, 48], c_cond=48), seed=1)
    save_file(wider, str(tmp_path / "wider.safetensors"))
    sampled = []
    monkeypatch.setattr(StageC, "forward", lambda *a, **k: sampled.append(1))
    assert generate(tiny_dir, tmp_path, "--lora", str(tmp_path / "wider.safetensors")) != 0
    assert "wider.safetensors" in capsys.readouterr().err and not sampled
