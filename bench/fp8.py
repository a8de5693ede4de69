"""fp8 weight storage: accuracy against the official float32 outputs, and memory against bf16.

* Parity: the official parity vectors (../shared/reference/parity: stage_c, stage_c_switch,
  stage_b) run with the matrix weights stored in bf16, fp8_e4m3fn and fp8_e5m2 (all computing in
  bf16, other parameters in bf16), compared with the recorded float32 outputs of the official
  code: max |error| and RMS error, each relative to the reference's max |value| / RMS.
* Memory: the resident weight bytes of each released Stage C / Stage B config in fp8 over bf16,
  from the module built on the meta device with the loader's fp8 plan (exact bytes, nothing
  allocated).

Prints one JSON object. ``python bench/fp8.py [--output out.json]`` (a few seconds, CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wuerstchen.models import configs  # noqa: E402
from wuerstchen.models import StageB, StageC  # noqa: E402
from wuerstchen.models.ops import fp8_weight_names  # noqa: E402
from wuerstchen.sampling.streaming import module_bytes  # noqa: E402

STORAGE = {"bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
COMPUTE = torch.bfloat16
VECTORS = {"stage_c": StageC, "stage_c_switch": StageC, "stage_b": StageB}


def stored(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` with its fp8-eligible weights in ``dtype`` and everything else in bf16."""
    low = set(fp8_weight_names(model))
    for name, p in model.named_parameters():
        p.data = p.data.to(dtype if name in low else COMPUTE)
    return model


def parity(reference: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name, cls in VECTORS.items():
        meta = json.loads((reference / f"{name}.json").read_text())
        weights = load_file(str(reference / f"{name}.weights.safetensors"))
        io = load_file(str(reference / f"{name}.io.safetensors"))
        for label, dtype in STORAGE.items():
            model = cls(**meta["config"])
            model.load_state_dict(weights, strict=True)
            model = stored(model.eval().requires_grad_(False), dtype)
            for call in meta["calls"]:
                kwargs = {}
                for a in call["args"]:
                    if "list" in a:
                        kwargs[a["name"]] = [None if i is None else io[i["key"]] for i in a["list"]]
                    else:
                        kwargs[a["name"]] = io[a["key"]]
                ref = io[call["outputs"][0]["key"]]
                with torch.no_grad():
                    got = model(**kwargs).float()
                err = got - ref
                out.setdefault(f"{name}.{call['id']}", {})[label] = {
                    "max_abs_rel": round((err.abs().max() / ref.abs().max()).item(), 5),
                    "rms_rel": round((err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item(), 5),
                }
    return out


def memory() -> dict:
    out = {}
    for stage, cls, table in (("stage_c", StageC, configs.STAGE_C), ("stage_b", StageB, configs.STAGE_B)):
        for variant in table:
            with torch.device("meta"):
                model = cls(**configs.official(table, variant))
            sizes = {label: module_bytes(stored(model, dtype)) for label, dtype in STORAGE.items() if label != "fp8_e5m2"}
            out[f"{stage}_{variant}"] = {"bf16_gb": round(sizes["bf16"] / 1e9, 3),
                                          "fp8_gb": round(sizes["fp8_e4m3fn"] / 1e9, 3),
                                          "ratio": round(sizes["fp8_e4m3fn"] / sizes["bf16"], 4)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", default=str(ROOT.parent / "shared" / "reference" / "parity"))
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    result = {"compute_dtype": "bf16", "parity_vs_official_fp32": parity(Path(args.reference)),
              "resident_weights": memory()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return result


if __name__ == "__main__":
    main()
