"""Batch generation in this process: the prompts file checked line by line before any work, names
from content, the manifest, reruns that skip what is done, a failing job recorded while the others
go on, and the exit status."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from wuerstchen import cli
from wuerstchen.batch import worker as worker_module
from wuerstchen.batch.jobs import JobsError, load_jobs
from wuerstchen.batch.manifest import lines_for
from wuerstchen.files.tiny import STAGE_C_LITE, write_tiny_lora

FAST = {"width": 64, "height": 64, "c_steps": 2, "b_steps": 1}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (more only wait on each other on a shared machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batch(tiny_dir, prompts, out, *extra):
    return cli.main(["batch", "--models", str(tiny_dir), "--prompts", str(prompts), "--out", str(out), "--quiet",
                     "--family", "v3", "--dtype", "fp32", *extra])


def jobs_of(tiny_dir, path, out):
    args = cli.build_parser().parse_args(["batch", "--models", str(tiny_dir), "--prompts", str(path), "--out", str(out)])
    return load_jobs(str(path), str(tiny_dir), str(out), "stable_cascade", args)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_jsonl_and_csv_give_the_same_jobs_named_by_content(tiny_dir, tmp_path):
    lora = tmp_path / "loras" / "style.safetensors"
    lora.parent.mkdir()
    shutil.copy(tiny_dir / "wuerstchen_tiny_lora.safetensors", lora)
    rows = [{"prompt": "a cat", "seed": 1, **FAST},
            {"prompt": "a cat", "seed": 1, "c-steps": 2, "b_steps": 1, "width": 64, "height": 64, "c_cfg": 4.0},
            {"prompt": "a cat", "seed": 2, **FAST},
            {"prompt": "a cat", "seed": 1, **FAST, "lora": "loras/style.safetensors:0.5"},
            {"prompt": "a cat", "seed": 1, **FAST, "batch": 2}]
    jobs = jobs_of(tiny_dir, write_jsonl(tmp_path / "jobs.jsonl", rows), tmp_path / "out")
    assert [j.line for j in jobs] == [1, 2, 3, 4, 5]
    names = [j.name for j in jobs]
    assert names[0] == names[1]  # the official c_cfg written out is the same job as leaving it out
    assert len(set(names)) == 4 and all(n.startswith("a-cat-") for n in names)
    assert jobs[3].settings["lora"] == [{"path": str(lora.resolve()), "model": 0.5, "text": 0.5}]
    assert jobs[4].files == [f"{names[4]}_0.png", f"{names[4]}_1.png"]

    csv = tmp_path / "other" / "jobs.csv"  # another folder: the LoRA is counted by content, not path
    csv.parent.mkdir()
    shutil.copy(lora, csv.parent / "renamed.safetensors")
    csv.write_text("prompt,seed,width,height,c_steps,b_steps,lora,batch\n"
                   "a cat,1,64,64,2,1,,\n"
                   "a cat,2,64,64,2,1,,\n"
                   "a cat,1,64,64,2,1,renamed.safetensors:0.5,\n"
                   "a cat,1,64,64,2,1,,2\n")
    from_csv = jobs_of(tiny_dir, csv, tmp_path / "out")
    assert [j.line for j in from_csv] == [2, 3, 4, 5]
    assert [j.name for j in from_csv] == [names[0], names[2], names[3], names[4]]


def test_bad_lines_are_refused_with_their_line_numbers_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("a worker was made for a prompts file with bad lines")

    monkeypatch.setattr(worker_module.Worker, "__init__", no_models)
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"prompt": "fine", **FAST}) + "\n"
                    + json.dumps({"prompt": "x", "width": "wide"}) + "\n"
                    + "\n"
                    + "{not json\n"
                    + json.dumps({"prompt": "x", "c_steps": 0}) + "\n"
                    + json.dumps({"prompt": "x", "stepz": 3}) + "\n"
                    + json.dumps({"width": 64}) + "\n"
                    + json.dumps({"prompt": "x", "lora": "nowhere.safetensors"}) + "\n"
                    + json.dumps({"prompt": "x", "device": "cpu"}) + "\n")
    out = tmp_path / "out"
    assert batch(tiny_dir, path, out) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert [line.split(":")[2] for line in lines] == ["2", "4", "5", "6", "7", "8", "9"]
    assert "--width 'wide'" in lines[0] and "--c-steps" in lines[2] and "'stepz'" in lines[3]
    assert "no prompt" in lines[4] and "nowhere.safetensors" in lines[5] and "--device" in lines[6]
    assert not out.exists()

    csv = tmp_path / "jobs.csv"
    csv.write_text("text,seed\nhello,1\n")
    with pytest.raises(JobsError, match="'prompt' column"):
        jobs_of(tiny_dir, csv, out)


def test_run_records_each_job_and_a_rerun_does_no_work(tiny_dir, tmp_path, monkeypatch):
    rows = [{"prompt": "a cat", "seed": 3, **FAST}, {"prompt": "a dog", "seed": 4, **FAST, "batch": 2},
            {"prompt": "a cat", "seed": 3, **FAST}]  # the same job twice: made once
    path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    assert batch(tiny_dir, path, out) == 0
    records = lines_for(out)
    assert len(records) == 2 and all(r["status"] == "done" for r in records)
    files = sorted(f for r in records for f in r["files"])
    assert sorted(p.name for p in out.glob("*.png")) == files and len(files) == 3
    cat = next(r for r in records if r["prompt"] == "a cat")
    assert cat["seed"] == 3 and cat["settings"]["stage_c"]["steps"] == 2 and cat["seconds"] > 0

    # the same image as `generate` with the same settings
    single = tmp_path / "single.png"
    assert cli.main(["generate", "--prompt", "a cat", "--models", str(tiny_dir), "--out", str(single), "--family",
                     "v3", "--dtype", "fp32", "--seed", "3", "--width", "64", "--height", "64", "--c-steps", "2", "--b-steps", "1"]) == 0
    assert np.array_equal(pixels(single), pixels(out / cat["files"][0]))

    def no_work(self, job):
        raise AssertionError(f"{job.name} was run again")

    monkeypatch.setattr(worker_module.Worker, "run", no_work)
    assert batch(tiny_dir, path, out) == 0
    assert len(lines_for(out)) == 2

    monkeypatch.undo()
    (out / cat["files"][0]).unlink()  # a lost image is made again, and only it
    assert batch(tiny_dir, path, out) == 0
    records = lines_for(out)
    assert len(records) == 3 and records[-1]["name"] == cat["name"]
    assert np.array_equal(pixels(single), pixels(out / cat["files"][0]))


def test_a_failing_job_is_recorded_and_the_others_go_on(tiny_dir, tmp_path, capsys):
    write_tiny_lora(tmp_path / "lite_lora.safetensors", "official", STAGE_C_LITE)  # a LoRA for another Stage C
    rows = [{"prompt": "first", **FAST}, {"prompt": "wrong lora", **FAST, "lora": "lite_lora.safetensors"},
            {"prompt": "last", **FAST}]
    path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    assert batch(tiny_dir, path, out) == 1
    records = {r["prompt"]: r for r in lines_for(out)}
    assert records["first"]["status"] == records["last"]["status"] == "done"
    failed = records["wrong lora"]
    assert failed["status"] == "failed" and "lite_lora" in failed["error"] and "files" not in failed
    err = capsys.readouterr().err
    assert "3 job(s): 2 done, 1 failed" in err and "line 2" in err
    assert batch(tiny_dir, path, out) == 1  # a rerun tries only the failed job again
    assert [r["prompt"] for r in lines_for(out)][3:] == ["wrong lora"]


def test_wuerstchen_v2_jobs_make_generate_s_images(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "jobs.jsonl", [{"prompt": "a cat", "seed": 5, "width": 128, "height": 128,
                                                 "c_steps": 2, "b_steps": 1}])
    out = tmp_path / "out"
    assert batch(tiny_dir, path, out, "--family", "v2") == 0
    (record,) = lines_for(out)
    assert record["family"] == "wuerstchen_v2" and record["settings"]["prior"]["steps"] == 2
    single = tmp_path / "single.png"
    assert cli.main(["generate", "--prompt", "a cat", "--models", str(tiny_dir), "--out", str(single), "--family", "v2",
                     "--dtype", "fp32", "--seed", "5", "--width", "128", "--height", "128", "--c-steps", "2",
                     "--b-steps", "1"]) == 0
    assert np.array_equal(pixels(single), pixels(out / record["files"][0]))


def test_usage_errors(tiny_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "jobs.jsonl", [{"prompt": "a cat"}])
    assert batch(tiny_dir, path, tmp_path / "out", "--workers", "2") == 2
    assert "--ray" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert batch(tiny_dir, path, tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err
    assert batch(tiny_dir, tmp_path / "none.jsonl", tmp_path / "out") == 2
    assert "does not exist" in capsys.readouterr().err
