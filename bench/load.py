"""Benchmark: our checkpoint loader against the naive way of loading a Stable Cascade file.

Measures time and peak resident memory of loading a full-size Stage C lite (1B parameters,
bfloat16, ~2 GB) from a random file with the official layout, each method in its own
subprocess so its peak RSS is its own:

* ``ours``:  ``wuerstchen.files.checkpoints.load(path)``: identify the file from its header, build
  the model on the meta device, read every tensor straight into its final buffer, assign.
* ``naive``: what a user writes without a loader: ``StageC(**cfg)`` (real parameter init, fp32),
  ``.to(torch.bfloat16)``, ``safetensors.torch.load_file(path)``, ``load_state_dict(sd)``,
  ``.eval().requires_grad_(False)``.

Every child imports the same modules (torch, safetensors, wuerstchen and its models) before
measuring, reports its resident set after ``import torch`` alone and after all imports
(``baseline``: almost all of it is torch's own libraries), and its high-water mark
(VmHWM) after loading. Where the kernel allows (/proc/self/clear_refs), the high-water mark is
reset after the imports, so ``peak_minus_baseline`` is what the load itself added.

The random file is written once, tensor by tensor (no 1B-parameter fp32 module ever exists),
and cached (default: $TMPDIR/wuerstchen_bench/), or taken from --file. The page cache is warmed
before timing, so times are those of a second load (disk speed is not measured).

Prints one JSON object to stdout. Usage: ``python bench/load.py [--file PATH] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = REPO_ROOT.parent / "shared" / "reference" / "manifests" / "stage_c_lite.json"
METHODS = ("ours", "naive")
MB = 2**20


def stage_c_lite_config() -> dict:
    if MANIFEST.exists():
        return json.loads(MANIFEST.read_text())["config"]
    from wuerstchen.models import configs

    return configs.official(configs.STAGE_C, "lite")


# ---------------------------------------------------------------------------- the random file


def _expected_shapes(cfg: dict) -> dict:
    import torch

    from wuerstchen.models import StageC

    with torch.device("meta"):
        module = StageC(**cfg)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def write_random_bf16(path: Path, shapes: dict, seed: int = 0) -> None:
    """Stream a valid bf16 safetensors file: header first, then one random tensor at a time."""
    import torch

    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for key, shape in shapes.items():
            tensor = torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(partial, path)  # a half-written file is never mistaken for the cache


def cached_file_is_valid(path: Path, shapes: dict) -> bool:
    from wuerstchen.storage.weights_io import SafetensorsFile, WeightFileError

    if not path.exists():
        return False
    try:
        src = SafetensorsFile(path)
    except WeightFileError:
        return False
    return src.shapes() == shapes and set(map(str, src.dtypes().values())) == {"torch.bfloat16"}


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as fh:
        while fh.read(64 * MB):
            pass


# ---------------------------------------------------------------------------- one measured child


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(method: str, path: Path) -> dict:
    import resource

    import torch

    torch_import = _status_bytes("VmRSS")
    import safetensors.torch

    import wuerstchen  # noqa: F401
    from wuerstchen.files import checkpoints
    from wuerstchen.models import StageC

    cfg = stage_c_lite_config()
    baseline = _status_bytes("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    if method == "ours":
        model = checkpoints.load(path).module
    elif method == "naive":
        model = StageC(**cfg).to(torch.bfloat16)
        model.load_state_dict(safetensors.torch.load_file(str(path)))
        model.eval().requires_grad_(False)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    return dict(
        seconds=seconds, rss_after_import_torch_mb=torch_import / MB, baseline_rss_mb=baseline / MB,
        peak_rss_mb=peak / MB,
        peak_minus_baseline_mb=(peak - baseline) / MB if reset else None, peak_reset=reset,
        ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB, dtypes=dtypes,
        torch_threads=torch.get_num_threads(),
    )


def run_child(method: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--child", method, "--file", str(path)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--file", type=Path, help="random Stage C lite bf16 file (made here if missing)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per method; the fastest is reported")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.file)))
        return

    sys.path.insert(0, str(REPO_ROOT))
    path = args.file or Path(tempfile.gettempdir()) / "wuerstchen_bench" / "stage_c_lite_bf16_random.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = _expected_shapes(stage_c_lite_config())
    generated_s = None
    if not cached_file_is_valid(path, shapes):
        start = time.perf_counter()
        write_random_bf16(path, shapes)
        generated_s = time.perf_counter() - start
    warm_page_cache(path)

    runs = {m: [] for m in METHODS}
    for _ in range(max(1, args.repeat)):
        for method in METHODS:  # interleaved, so drift hits every method alike
            runs[method].append(run_child(method, path))
    best = {m: min(r, key=lambda x: x["seconds"]) for m, r in runs.items()}
    file_mb = path.stat().st_size / MB
    ours, naive = best["ours"], best["naive"]
    report = {
        "model": "stage_c_lite (1,030,785,040 params), random bf16",
        "file": str(path),
        "file_mb": round(file_mb, 1),
        "file_generated_s": None if generated_s is None else round(generated_s, 1),
        "cpu_count": os.cpu_count(),
        "naive_means": ("StageC(**cfg) real fp32 init -> .to(bfloat16) -> "
                        "load_state_dict(safetensors.torch.load_file(path)) -> eval, no grad"),
        "ours_means": "wuerstchen.files.checkpoints.load(path): meta build, tensors read into final buffers, assign=True",
        "repeat": max(1, args.repeat),
        "methods": {m: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in best[m].items()} for m in METHODS},
        "all_seconds": {m: [round(r["seconds"], 3) for r in rs] for m, rs in runs.items()},
        "ratio_time_ours_over_naive": round(ours["seconds"] / naive["seconds"], 3),
        "ratio_peak_rss_ours_over_file": round(ours["peak_rss_mb"] / file_mb, 3),
        "ratio_peak_minus_baseline_ours_over_file": (
            round(ours["peak_minus_baseline_mb"] / file_mb, 3) if ours["peak_minus_baseline_mb"] is not None else None),
        "ratio_peak_rss_naive_over_file": round(naive["peak_rss_mb"] / file_mb, 3),
    }
    report["goal_time_le_0.5x_naive"] = report["ratio_time_ours_over_naive"] <= 0.5
    report["goal_peak_le_1.1x_file_absolute"] = report["ratio_peak_rss_ours_over_file"] <= 1.1
    if report["ratio_peak_minus_baseline_ours_over_file"] is not None:
        report["goal_peak_le_1.1x_file_minus_baseline"] = report["ratio_peak_minus_baseline_ours_over_file"] <= 1.1
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
