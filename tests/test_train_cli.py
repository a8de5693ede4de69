"""``python -m wuerstchen train-lora`` on the tiny release: the loss falls, resume, the file works, bad input."""

import json

import pytest
import torch
from train_helpers import write_pictures

from wuerstchen.cli import main


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    return write_pictures(tmp_path_factory.mktemp("train_data"), n=8)


def _train(tiny_dir, data, out, *extra):
    return main(["train-lora", "--models", str(tiny_dir), "--data", str(data), "--out", str(out),
                 "--resolution", "128", "--lr", "1e-2", "--device", "cpu", *extra])


def test_loss_falls_and_the_lora_changes_the_image(tiny_dir, pictures, tmp_path, capsys):
    from wuerstchen.pipeline.cascade import Cascade, CascadeFiles
    from wuerstchen.lora import load_lora
    from wuerstchen.files.management import ModelManager
    from wuerstchen.pipeline.stages import LoraUse, StageBSettings, StageCSettings

    out, log = tmp_path / "my_lora.safetensors", tmp_path / "loss.jsonl"
    assert _train(tiny_dir, pictures, out, "--steps", "200", "--seed", "0", "--log", str(log),
                  "--token", "[dog]:^dog</w>") == 0
    assert "wrote" in capsys.readouterr().out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 201))
    losses = [r["loss"] for r in records]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
    lora = load_lora(out)
    assert len(lora.stage_c_indexed) == 8 and lora.metadata["dataset_size"] == "8"

    cascade = Cascade(CascadeFiles.from_dir(tiny_dir), ModelManager(device="cpu"), root=str(tiny_dir))
    kw = dict(width=128, height=128, seed=1, stage_c=StageCSettings(steps=3), stage_b=StageBSettings(steps=2))
    plain = cascade.generate("a photo of a [dog]", "", **kw)
    with_lora = cascade.generate("a photo of a [dog]", "", loras=[LoraUse(lora)], **kw)
    again = cascade.generate("a photo of a [dog]", "", **kw)
    assert torch.equal(plain, again)  # the base model is unchanged afterwards
    assert (plain - with_lora).abs().max() > 1e-3


def test_resume_from_a_checkpoint_equals_the_straight_run(tiny_dir, pictures, tmp_path):
    from safetensors.torch import load_file

    common = ("--batch", "2", "--accum", "2", "--warmup", "4", "--token", "[dog]:^dog</w>")
    straight, half, resumed = (tmp_path / f"{n}.safetensors" for n in ("straight", "half", "resumed"))
    assert _train(tiny_dir, pictures, straight, "--steps", "10", *common) == 0
    assert _train(tiny_dir, pictures, half, "--steps", "5", "--save-every", "5", *common) == 0
    ckpt = tmp_path / "half.safetensors.ckpt"
    assert ckpt.is_file()
    assert _train(tiny_dir, pictures, resumed, "--steps", "10", "--resume", str(ckpt), *common) == 0
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("change, message", [
    ({"--data": "missing"}, "no such folder"),
    ({"--out": "lora.pt"}, "end it with .safetensors"),
    ({"--token": "[dog]:("}, "not a regular expression"),
    ({"--resolution": "100"}, "multiple of 32"),
    ({"--resume": "nope.ckpt"}, "no such checkpoint"),
    ({"--steps": "0"}, "steps must be at least 1"),
])
def test_bad_input_is_one_error_line_before_loading(tiny_dir, pictures, tmp_path, capsys, change, message):
    args = {"--models": str(tiny_dir), "--data": str(pictures), "--out": str(tmp_path / "l.safetensors")}
    for k, v in change.items():
        args[k] = str(tmp_path / v) if k in ("--data", "--resume") else v
    argv = ["train-lora"] + [x for kv in args.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


def test_a_folder_without_captions_is_refused(tiny_dir, tmp_path, capsys):
    data = write_pictures(tmp_path / "data", n=2)
    (data / "pic0.txt").unlink()
    assert _train(tiny_dir, data, tmp_path / "l.safetensors") == 2
    assert "pic0.png needs pic0.txt" in capsys.readouterr().err
