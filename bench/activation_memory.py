"""Activation memory of one Stage C / Stage B forward and one Stage A decode, against the estimate.

:mod:`wuerstchen.inputs.limits` refuses requests whose memory estimate exceeds the machine's, so the
estimate must not guess high. This measures, for the official widths, the peak memory one model
call adds and divides it by the estimate's unit (rows x tokens x width x element size at the widest
level, see :class:`wuerstchen.inputs.limits.UNetProfile`): the ``factor`` it prints is what
``STAGE_C_ACTIVATIONS`` / ``STAGE_B_ACTIVATIONS`` / ``STAGE_A_ACTIVATIONS`` must stay below.

Activations do not depend on depth (blocks run one after another, inputs freed), so the models
keep the official widths and heads but one block per level, which fits a small machine. Each case
runs in a fresh subprocess: the model is built and filled, the kernel's RSS high-water mark is
reset (``/proc/self/clear_refs``), one forward runs under ``torch.inference_mode`` and the peak
RSS growth is reported (CPU). With ``--device cuda``, ``torch.cuda.max_memory_allocated`` growth.

    python bench/activation_memory.py                 # all cases, fp32 and bf16 (~1 min on 2 cores)
    python bench/activation_memory.py --dtypes fp32 --stages c
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wuerstchen.inputs import limits  # noqa: E402
from wuerstchen.models.configs import STAGE_A, STAGE_B, STAGE_C, official  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
BATCH = 2  # one image with classifier-free guidance
CASES = {  # stage -> latent sides measured
    "c": [24, 48],  # 1024² and 2048² at compression 42.67
    "b": [128, 256],  # 512² and 1024²
    "a": [64, 128],  # 256² and 512² (decode; tiles are 128 cells)
}


def build(stage: str, dtype: torch.dtype, device: str):
    from wuerstchen.models import StageA, StageB, StageC

    if stage == "c":
        config = official(STAGE_C, "full")
        config.update(blocks=[[1, 1], [1, 1]])
        cls = StageC
    elif stage == "b":
        config = official(STAGE_B, "full")
        config.update(blocks=[[1, 1, 1, 1], [1, 1, 1, 1]], block_repeat=[[1, 1, 1, 1], [1, 1, 1, 1]])
        cls = StageB
    else:
        config = dict(STAGE_A, bottleneck_blocks=1)
        cls = StageA
    with torch.device("meta"):
        model = cls(**config)
    model = model.to_empty(device=device).to(dtype).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            if p.is_floating_point():
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(dtype))
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.fill_(1.0)
    return model


def inputs(stage: str, side: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(1)
    r = torch.full((BATCH,), 0.6)
    if stage == "c":
        return dict(x=torch.randn(BATCH, 16, side, side, generator=g), r=r, clip_text=torch.randn(BATCH, 77, 1280, generator=g),
                    clip_text_pooled=torch.randn(BATCH, 1, 1280, generator=g), clip_img=torch.randn(BATCH, 1, 768, generator=g))
    if stage == "b":
        return dict(x=torch.randn(BATCH, 4, side, side, generator=g), r=r,
                    effnet=torch.randn(BATCH, 16, side // 10 + 1, side // 10 + 1, generator=g),
                    clip=torch.randn(BATCH, 1, 1280, generator=g))
    return dict(x=torch.randn(1, 4, side, side, generator=g))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(stage: str, side: int, dtype_name: str, device: str) -> dict:
    dtype = DTYPES[dtype_name]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build(stage, dtype, device)
    kwargs = {k: v.to(device) for k, v in inputs(stage, side, dtype, device).items()}
    with torch.inference_mode():  # warm-up at a small size: kernels, thread pools
        n = 32 if stage == "b" else 8
        small = {k: (v[..., :n, :n] if v.dim() == 4 else v) for k, v in kwargs.items()}
        (model.decode(small["x"]) if stage == "a" else model(**small))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
    with torch.inference_mode():
        out = model.decode(kwargs["x"]) if stage == "a" else model(**kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status("VmHWM") - before
    rows = kwargs["x"].shape[0]
    element = torch.empty((), dtype=dtype).element_size()
    if stage == "a":
        unit = rows * 4 * side * side * model.in_block[1].out_channels * element
    else:
        unit = rows * limits.unet_profile(model).widest(side * side) * element
    del out
    return {"stage": stage, "latent": side, "dtype": dtype_name, "rows": rows, "peak_bytes": peak,
            "unit_bytes": unit, "factor": round(peak / unit, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="cba")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # stage:side:dtype, run in a subprocess
    args = p.parse_args()
    if args.case:
        stage, side, dtype = args.case.split(":")
        print(json.dumps(measure(stage, int(side), dtype, args.device)))
        return
    results = []
    for stage in args.stages:
        for side in CASES[stage]:
            for dtype in args.dtypes.split(","):
                print(f"stage {stage} latent {side} {dtype}", file=sys.stderr)
                out = subprocess.run([sys.executable, __file__, "--case", f"{stage}:{side}:{dtype}", "--device",
                                      args.device], capture_output=True, text=True, check=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    factors = {}
    for r in results:
        factors.setdefault(r["stage"], []).append(r["factor"])
    summary = {s: {"min_factor": min(f), "max_factor": max(f)} for s, f in factors.items()}
    used = {"c": limits.STAGE_C_ACTIVATIONS, "b": limits.STAGE_B_ACTIVATIONS, "a": limits.STAGE_A_ACTIVATIONS}
    for s in summary:
        summary[s]["estimate_factor"] = used[s]
        summary[s]["estimate_is_lower_bound"] = used[s] <= summary[s]["min_factor"]
    print(json.dumps({"device": args.device, "torch": torch.__version__, "cases": results, "summary": summary},
                     indent=1))


if __name__ == "__main__":
    main()
