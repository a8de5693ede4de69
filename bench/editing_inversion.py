"""Round-trip error of the Stage C DDIM inversion (layered editing), by step count and refinement.

Inverts a random clean latent with the tiny Stage C (random weights, wuerstchen/tiny.py), regenerates
it with the same conditioning at cfg 1 (shift 2, our schedule) and reports the largest and the mean
absolute difference to the source, as JSON:

    python bench/editing_inversion.py                      # 24x24 latent (1024²), steps 5..80, refine 0/3/6
    python bench/editing_inversion.py --size 6 --steps 5 10 --refine 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wuerstchen.files.checkpoints import build_module  # noqa: E402
from wuerstchen.editing.guidance import Guidance  # noqa: E402
from wuerstchen.editing.inversion import invert, regenerate  # noqa: E402
from wuerstchen.pipeline.stages import Conditioning  # noqa: E402
from wuerstchen.files.tiny import STAGE_C, tiny_state  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=24, help="latent side in cells (24 = 1024 px)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40, 80])
    parser.add_argument("--refine", type=int, nargs="+", default=[0, 3, 6])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_module("stage_c", STAGE_C)
    model.load_state_dict(tiny_state("stage_c", "full", args.seed))
    model = model.eval().to(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    cond = Conditioning(torch.randn(1, 77, STAGE_C["c_clip_text"], generator=gen),
                        torch.randn(1, 1, STAGE_C["c_clip_text_pooled"], generator=gen))
    guidance = Guidance.prepare(model, cond)
    latent = torch.randn(1, 16, args.size, args.size, generator=gen).to(args.device)
    rows = []
    for refine in args.refine:
        for steps in args.steps:
            start = time.perf_counter()
            trajectory = invert(model, latent, guidance, steps=steps, shift=2.0, refine=refine)
            back = regenerate(model, trajectory, guidance)
            diff = (back - latent).abs()
            rows.append({"steps": steps, "refine": refine, "model_calls": steps * (1 + refine) + steps,
                         "max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean()),
                         "latent_std": float(latent.std()), "seconds": round(time.perf_counter() - start, 3)})
    print(json.dumps({"bench": "editing_inversion", "model": "tiny stage_c (random weights)", "shift": 2.0,
                      "cfg": 1.0, "latent": [1, 16, args.size, args.size], "device": args.device,
                      "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
