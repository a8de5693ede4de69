"""Benchmark: batch generation's jobs per second in this process and on a local Ray with 1 and 2
workers, on the tiny models (what Ray adds per job, and what a second worker brings).

The same jobs (``--jobs``, default 40: 64x64, 2 Stage C and 1 Stage B steps, each its own prompt
and seed) run through :func:`wuerstchen.batch.run.run_batch` into a fresh folder per mode, images
and manifest written as for real. Every worker has ``--threads`` torch threads (default 1: the
tiny models gain nothing from more) and runs one warm-up job first (models loaded, first calls
made), so the timed part is the steady state; ``startup_s`` (Ray start, workers loading the
models, warm-up) is reported apart. Ray is started here (``num_cpus`` = workers × threads) and shut
down after each mode.

``overhead_per_job_ms`` = (seconds per job on Ray with 1 worker − seconds per job in process) ×
1000: Ray's cost per job (the call, moving the job and its PNG, the driver's loop), with jobs sent
in groups of ``--group``.

Prints one JSON object. Usage: ``python bench/batch.py [--jobs 40] [--group 4] [--threads 1] [--output F]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wuerstchen import cli  # noqa: E402
from wuerstchen.batch.jobs import load_jobs  # noqa: E402
from wuerstchen.batch.local import LocalRunner  # noqa: E402
from wuerstchen.batch.manifest import Output  # noqa: E402
from wuerstchen.batch.run import run_batch  # noqa: E402
from wuerstchen.batch.worker import Worker  # noqa: E402
from wuerstchen.files.tiny import write_tiny_models  # noqa: E402

FAMILY = "stable_cascade"


def make_jobs(root: Path, n: int, warm: bool = False):
    rows = [{"prompt": f"{'warm-up' if warm else 'a cat'} number {i}", "seed": i, "c_steps": 2, "b_steps": 1,
             "width": 64, "height": 64} for i in range(n)]
    path = root / ("warm.jsonl" if warm else "jobs.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = cli.build_parser().parse_args(["batch", "--models", str(root / "models"), "--prompts", str(path), "--out", "x"])
    return load_jobs(str(path), str(root / "models"), str(root / "out"), FAMILY, args)


def timed(jobs, out: Path, runner, group: int) -> dict:
    start = time.perf_counter()
    summary = run_batch(jobs, Output(out), runner, group_size=group, progress=False)
    seconds = time.perf_counter() - start
    assert summary.ok and summary.done == len(jobs), summary.lines()
    return {"seconds": round(seconds, 3), "jobs_per_s": round(len(jobs) / seconds, 2)}


def in_process(root, jobs, warm, options, threads, group) -> dict:
    start = time.perf_counter()
    runner = LocalRunner(Worker(**options, threads=threads))
    runner.worker.run(warm[0])
    startup = time.perf_counter() - start
    return {"startup_s": round(startup, 3), **timed(jobs, root / "out_local", runner, group)}


def on_ray(root, jobs, warm, options, threads, group, workers) -> dict:
    import ray

    from wuerstchen.batch.ray_runner import RayRunner, init_ray

    start = time.perf_counter()
    init_ray(num_cpus=workers * threads, log_to_driver=False)
    try:
        runner = RayRunner(options, workers=workers, cpus_per_worker=threads)
        runner.start()
        ray.get([actor.run.remote(warm[i]) for i, actor in enumerate(runner.actors)])
        startup = time.perf_counter() - start
        result = timed(jobs, root / f"out_ray{workers}", runner, group)
        runner.stop()
    finally:
        ray.shutdown()
    return {"startup_s": round(startup, 3), **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=40)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="wuerstchen_bench_batch_") as tmp:
        root = Path(tmp)
        write_tiny_models(root / "models", families=[FAMILY])
        jobs, warm = make_jobs(root, a.jobs), make_jobs(root, 2, warm=True)
        options = dict(models=str(root / "models"), family=FAMILY, dtype="fp32")
        modes = {"in_process": in_process(root, jobs, warm, options, a.threads, a.group)}
        for workers in (1, 2):
            modes[f"ray_{workers}_worker{'s' if workers > 1 else ''}"] = on_ray(root, jobs, warm, options, a.threads,
                                                                                a.group, workers)
    per_job = {name: m["seconds"] / a.jobs for name, m in modes.items()}
    report = {
        "bench": "batch",
        "jobs": a.jobs, "group": a.group, "threads_per_worker": a.threads,
        "job": "64x64, Stage C 2 steps, Stage B 1 step, tiny models, fp32, CPU",
        "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "modes": modes,
        "overhead_per_job_ms": round((per_job["ray_1_worker"] - per_job["in_process"]) * 1000, 2),
        "speedup_2_workers_over_1": round(modes["ray_1_worker"]["seconds"] / modes["ray_2_workers"]["seconds"], 2),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if a.output:
        Path(a.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
