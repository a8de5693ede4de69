"""Batch generation on a local Ray with 2 workers: the same images as in this process, every job
exactly once in the manifest even when a worker is killed half way, and a rerun that does no work
(the issue's done criterion: 40 jobs -> 40 manifest lines, 40 distinct files)."""

import json

import numpy as np
import pytest
from PIL import Image

import ray  # noqa: E402 (the batch extra; the README's test set-up installs it)

from wuerstchen import cli  # noqa: E402
from wuerstchen.batch.jobs import load_jobs  # noqa: E402
from wuerstchen.batch.local import LocalRunner  # noqa: E402
from wuerstchen.batch.manifest import Output, lines_for  # noqa: E402
from wuerstchen.batch.ray_runner import RayRunner, init_ray  # noqa: E402
from wuerstchen.batch.run import run_batch  # noqa: E402
from wuerstchen.batch.worker import Worker  # noqa: E402

JOBS = 40


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def jobs(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray_jobs")
    subjects = ["a cat", "a dog", "a red fox", "an owl", "a house"]
    rows = [{"prompt": f"{subjects[i % 5]} number {i}", "seed": i, "c_steps": 2, "b_steps": 1,
             "width": 64, "height": 64 if i % 3 else 96} for i in range(JOBS)]
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = cli.build_parser().parse_args(["batch", "--models", str(tiny_dir), "--prompts", str(path), "--out", "x"])
    return load_jobs(str(path), str(tiny_dir), str(folder / "out"), "stable_cascade", args)


@pytest.fixture(scope="module")
def options(tiny_dir):
    return dict(models=str(tiny_dir), family="stable_cascade", dtype="fp32")


@pytest.fixture(scope="module")
def in_process(jobs, options, tmp_path_factory):
    out = tmp_path_factory.mktemp("in_process")
    summary = run_batch(jobs, Output(out), LocalRunner(Worker(**options, threads=1)), progress=False)
    assert summary.ok and summary.done == JOBS
    return out


class KillOneWorker:
    """Wraps a RayRunner: once ``after`` results are in, kills a worker that is running a group."""

    def __init__(self, runner, after):
        self.runner, self.after, self.seen, self.killed = runner, after, 0, None

    def run(self, groups, on_result):
        def counting(job, result):
            on_result(job, result)
            self.seen += 1
            if self.seen == self.after and self.runner.busy:
                self.killed = next(iter(self.runner.busy))
                ray.kill(self.runner.actors[self.killed], no_restart=False)

        self.runner.run(groups, counting)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def check_complete(out, in_process, jobs):
    records = lines_for(out)
    assert len(records) == JOBS and all(r["status"] == "done" for r in records)
    assert sorted(r["name"] for r in records) == sorted(j.name for j in jobs)  # each job exactly once
    files = [f for r in records for f in r["files"]]
    assert len(set(files)) == JOBS and sorted(p.name for p in out.glob("*.png")) == sorted(files)
    for name in files:
        assert np.array_equal(pixels(out / name), pixels(in_process / name)), name


def test_two_ray_workers_make_the_in_process_images_even_when_one_is_killed(local_ray, jobs, options, in_process,
                                                                            tmp_path):
    runner = RayRunner(options, workers=2)
    runner.start()
    try:
        assert len(runner.actors) == 2
        plain = tmp_path / "plain"
        summary = run_batch(jobs, Output(plain), runner, progress=False)
        assert summary.ok and summary.done == JOBS
        check_complete(plain, in_process, jobs)
        assert {r["worker"] for r in lines_for(plain)}.__len__() == 2  # both workers took jobs

        killed = tmp_path / "killed"
        killer = KillOneWorker(runner, after=JOBS // 2)
        summary = run_batch(jobs, Output(killed), killer, progress=False)
        assert killer.killed is not None and runner.deaths[killer.killed] == 1
        assert summary.ok and summary.done == JOBS
        check_complete(killed, in_process, jobs)

        again = run_batch(jobs, Output(killed), runner, progress=False)  # a rerun does no work
        assert again.done == 0 and again.skipped == JOBS and len(lines_for(killed)) == JOBS
    finally:
        runner.stop()


def test_the_command_line_on_ray(local_ray, tiny_dir, in_process, jobs, tmp_path, capsys):
    lines = "".join(json.dumps({"prompt": j.prompt, "seed": j.seed, "c_steps": 2, "b_steps": 1, "width": 64,
                                "height": j.settings["height"]}) + "\n" for j in jobs[:4])
    (tmp_path / "jobs.jsonl").write_text(lines)
    argv = ["batch", "--models", str(tiny_dir), "--prompts", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out"),
            "--family", "v3", "--dtype", "fp32", "--quiet", "--ray", "auto"]
    assert cli.main(argv + ["--workers", "3"]) == 2  # 2 CPUs: at most 2 workers
    assert "has 2 CPU(s), 1 per worker" in capsys.readouterr().err
    assert cli.main(argv + ["--workers", "1"]) == 0
    assert "4 job(s): 4 done, 0 failed" in capsys.readouterr().out
    for job in jobs[:4]:
        assert np.array_equal(pixels(tmp_path / "out" / job.files[0]), pixels(in_process / job.files[0]))
    assert ray.is_initialized()  # the Ray it found is left running for its owner
