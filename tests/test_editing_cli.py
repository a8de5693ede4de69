"""``python -m wuerstchen edit`` on the tiny models, and its one-line refusals before any model loads."""

import numpy as np
import pytest
from PIL import Image

from wuerstchen import cli
from wuerstchen.files.management import ModelManager

FAST = ["--steps", "6", "--refine", "1", "--b-steps", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit_pictures")
    rng = np.random.default_rng(0)
    rgb = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).resize((256, 256), Image.BILINEAR).save(folder / "in.png")
    for name, box in (("ball", (100, 40, 160, 100)), ("cup", (30, 150, 80, 210))):
        mask = np.zeros((256, 256), np.uint8)
        top, left, bottom, right = box
        mask[top:bottom, left:right] = 255
        Image.fromarray(mask).save(folder / f"{name}.png")
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(folder / "empty.png")
    Image.fromarray(np.full((128, 256), 255, np.uint8)).save(folder / "small.png")
    return folder


def edit(tiny_dir, files, out, *extra):
    return cli.main(["edit", "--models", str(tiny_dir), "--image", str(files / "in.png"), "--out", str(out), *FAST,
                     *extra])


def test_edit_writes_the_picture(tiny_dir, files, tmp_path, capsys):
    out = tmp_path / "moved.png"
    rc = edit(tiny_dir, files, out, "--mask", str(files / "ball.png"), "--op", "move:50,-40", "--prompt", "a ball")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert Image.open(out).size == (256, 256)
    assert "moved by 1, -1 Stage C cells (43, -43 pixels) for 50, -40" in err
    rc = edit(tiny_dir, files, tmp_path / "zoom.png", "--op", "zoomout:0.75")
    assert rc == 0 and (tmp_path / "zoom.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--mask", "{small}", "--op", "remove"], "--mask '.*small.png' is 256x128 but the picture is 256x256"),
    (["--mask", "{empty}", "--op", "remove"], "--mask '.*empty.png' is empty"),
    (["--mask", "{ball}", "--mask", "{cup}", "--op", "move:60,0"], "move:60,0 moves --mask '.*cup.png' off the canvas"),
    (["--op", "remove"], "remove needs at least one mask"),
    (["--mask", "{ball}", "--op", "pan:10,0"], "pan acts on the whole picture and takes no mask"),
    (["--mask", "{ball}", "--op", "twist"], "unknown --op 'twist'"),
    (["--mask", "{ball}", "--op", "remove", "--fuse-at", "1"], "fuse_at must be a fraction"),
    (["--mask", "{ball}", "--op", "remove", "--steps", "1"], "edit steps must be"),
    (["--mask", "{nothing}", "--op", "remove"], "no such file"),
])
def test_refusals_before_any_model_loads(tiny_dir, files, tmp_path, capsys, monkeypatch, extra, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ModelManager, "load", no_loading)
    names = {"small": files / "small.png", "empty": files / "empty.png", "ball": files / "ball.png",
             "cup": files / "cup.png", "nothing": files / "nothing.png"}
    extra = [e.format(**{k: str(v) for k, v in names.items()}) for e in extra]
    rc = edit(tiny_dir, files, tmp_path / "x.png", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    import re
    assert re.search(message, err[0]), err[0]
