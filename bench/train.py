"""Stage C LoRA training: seconds per update and peak memory at the official sizes, with and without
gradient checkpointing of the Stage C blocks.

The official recipe (wuerstchen.train): rank 4 on every attention (``.attn``), AdamW, one 768x768
picture per update (a 24x24 Stage C latent), batch 1, accumulation 1, text pre-encoded (random
CLIP-G conditioning: the text encoder is not part of the measurement; text dropout off). The Stage C
weights are random (seeded, small), built on the meta device and allocated in the weight dtype. Each case runs in a fresh subprocess: the RSS high-water mark is reset
(``/proc/self/clear_refs``) once the weights are in memory, one warm-up update runs, then the timed
ones; ``peak_bytes`` is the peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA) over the
updates, weights included; ``over_weights_bytes`` is that minus the memory held before the first
update (the weights, and on CPU the interpreter): activations, gradients, LoRA and AdamW state.

    python bench/train.py                              # Stage C lite, CPU fp32, 2 updates per case
    python bench/train.py --device cuda --variants lite,full --dtype bf16 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wuerstchen.models.configs import STAGE_C, official  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def build(variant: str, dtype: torch.dtype, device: str):
    from wuerstchen.models import StageC

    with torch.device("meta"):
        model = StageC(**official(STAGE_C, variant)).to(dtype)
    model = model.to_empty(device=device).eval()  # only the weight dtype is ever allocated
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device).mul_(0.02))
    return model


def measure(variant: str, dtype_name: str, device: str, checkpointing: bool, steps: int, resolution: int) -> dict:
    from wuerstchen.train import LoraTrainer, TrainConfig
    from wuerstchen.train.dataset import LatentSet

    dtype = DTYPES[dtype_name]
    model = build(variant, dtype, device)
    side = resolution // 32
    g = torch.Generator().manual_seed(1)
    data = LatentSet([torch.randn(16, side, side, generator=g)], [""],
                     [(torch.randn(77, 1280, generator=g), torch.randn(1, 1280, generator=g))], {(side, side): [0]})
    precision = "fp32" if dtype == torch.float32 else dtype_name
    config = TrainConfig(steps=steps + 1, resolution=resolution, text_dropout=0.0, precision=precision,
                         gradient_checkpointing=checkpointing)
    trainer = LoraTrainer(model, None, data, config)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
    with trainer.session():
        trainer.train_step()  # warm-up: kernels, optimizer state (its memory counts in the peak)
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    return {"variant": variant, "dtype": dtype_name, "device": device, "gradient_checkpointing": checkpointing,
            "latent": [side, side], "batch": 1, "lora_params": sum(p.numel() for p in trainer.params),
            "model_params": params, "seconds_per_step": round(sorted(times)[len(times) // 2], 3),
            "step_times": [round(t, 3) for t in times], "peak_bytes": peak, "peak_gib": round(peak / 2**30, 2),
            "over_weights_bytes": peak - before if device == "cuda" else _status("VmHWM") - before,
            "over_weights_gib": round(((peak - before) if device == "cuda" else (_status("VmHWM") - before)) / 2**30, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="lite", help="lite, full or lite,full")
    p.add_argument("--dtype", default=None, help="fp32, bf16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2, help="timed updates per case (after one warm-up)")
    p.add_argument("--resolution", type=int, default=768)
    p.add_argument("--checkpointing", default="on,off", help="on, off or on,off")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # variant:dtype:on|off, in a subprocess
    args = p.parse_args()
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.case:
        variant, dt, ckpt = args.case.split(":")
        print(json.dumps(measure(variant, dt, args.device, ckpt == "on", args.steps, args.resolution)))
        return
    results = []
    for variant in args.variants.split(","):
        for ckpt in args.checkpointing.split(","):
            print(f"Stage C {variant} {dtype} checkpointing {ckpt}", file=sys.stderr)
            out = subprocess.run([sys.executable, __file__, "--case", f"{variant}:{dtype}:{ckpt}", "--device",
                                  args.device, "--steps", str(args.steps), "--resolution", str(args.resolution)],
                                 capture_output=True, text=True)
            if out.returncode:
                results.append({"variant": variant, "gradient_checkpointing": ckpt == "on",
                                "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"})
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "load_average": os.getloadavg(), "cases": results}, indent=1))


if __name__ == "__main__":
    main()
