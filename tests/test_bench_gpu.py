"""bench/gpu.py runs end to end on CPU with tiny models (the GPU figures need a GPU; this keeps
the script working): every configuration runs, streamed runs stream and match the resident run
bit for bit with a lower weight peak, fp8 runs halve the matrix weights."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_runs_tiny_on_cpu(bench, tmp_path, capsys):
    result = bench.main(["--device", "cpu", "--tiny", "--variants", "lite", "--size", "64", "--batch", "1",
                         "--c-steps", "1", "--b-steps", "1", "--workdir", str(tmp_path), "--output",
                         str(tmp_path / "out.json")])
    assert (tmp_path / "out.json").exists() and '"runs"' in capsys.readouterr().out
    runs = {(r["dtype"], r["mode"]): r for r in result["runs"]}
    assert set(runs) == {("bf16", "resident"), ("bf16", "streamed"), ("fp8", "resident"), ("fp8", "streamed")}
    for (dtype, mode), run in runs.items():
        assert set(run["stages"]) == {"stage_c", "stage_b", "stage_a"}
        assert run["images_per_s"] > 0 and all(s["seconds"] > 0 for s in run["stages"].values())
        if mode == "streamed":
            assert run["identical_to_resident"] is True
            assert run["stages"]["stage_c"]["streamed_blocks"] > 0
            assert run["ratio_to_resident"]["stage_c_peak"] < 1
    fp8, bf16 = runs[("fp8", "resident")]["stages"]["stage_c"], runs[("bf16", "resident")]["stages"]["stage_c"]
    assert 0.5 < fp8["weights_mb"] / bf16["weights_mb"] < 0.6
    assert 0 < runs[("fp8", "resident")]["stage_c_latent_rel_diff_vs_bf16"] < 0.5
