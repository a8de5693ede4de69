"""Per-step forward benchmark: our StageC/StageB against diffusers' ``StableCascadeUNet``.

Both networks are built at the same (lite) config and carry the SAME random weights: ours is
built on the meta device and filled tensor by tensor with seeded random values in the target
dtype (no float32 copy of the model; bf16 and fp32 get the same values up to rounding), its
state dict is renamed into diffusers' layout (see :func:`to_diffusers_state_dict`) and loaded
into diffusers' model by assignment, so the two models share weight storage. In float32 the two
outputs must agree (``--rtol``, default 1e-3 of the output's max magnitude) before any time is
reported as meaningful.

Timing runs interleave the two models in one process (A B B A ...) so machine noise hits both,
and reports the median seconds per forward step. Peak memory is the growth of the resident set
during one forward in a fresh subprocess per model and dtype (CPU; the kernel's high-water mark
is reset through /proc/self/clear_refs), or ``torch.cuda.max_memory_allocated`` growth (CUDA).

Prints one JSON object on stdout; progress goes to stderr. diffusers is a bench-only extra:
``pip install -e .[bench]`` or ``pip install diffusers``. See bench/README.md for how to read it.

    python bench/step.py                       # lite Stage C + B, bf16 and fp32, official sizes
    python bench/step.py --quick               # smaller spatial sizes, fewer iterations
    python bench/step.py --stages c --dtypes fp32 --profile
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wuerstchen.models.configs import STAGE_B, STAGE_C, official  # noqa: E402
from wuerstchen.models import StageB, StageC  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
STAGE_NAMES = {"c": "stage_c_lite", "b": "stage_b_lite"}

#: Spatial sizes: Stage C latent side, Stage B latent side and its effnet side.
SIZES = {
    "official": {"c": 24, "b": 256, "b_effnet": 24},
    "quick": {"c": 16, "b": 128, "b_effnet": 12},
}
BATCH = 2  # classifier-free guidance batch
#: A mid-schedule time that bfloat16 represents exactly (0.6 rounded), so every dtype sees the same r.
#: diffusers still computes r * 10000 in the input dtype, which moves its bf16 time embedding.
MID_TIME = 77 / 128
TEXT_TOKENS = 77


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Models and weights
# ----------------------------------------------------------------------------------------------

def our_config(stage: str) -> dict:
    return official(STAGE_C if stage == "c" else STAGE_B, "lite")


#: Residual-branch output layers get smaller weights, as in the official init, so that the random
#: network is not chaotic and low-precision errors stay meaningful.
RESIDUAL_OUTPUTS = (".channelwise.4.weight", ".attn.out_proj.weight")


def init_std(name: str, shape) -> float:
    """Scale of the random weights: ~1/sqrt(fan_in) for matrices, small for vectors (biases, GRN)."""
    if name.endswith((".gamma", ".beta")):
        return 0.1
    if len(shape) < 2:
        return 0.02
    std = 1.0 / math.sqrt(math.prod(shape[1:]))
    return std * 0.25 if name.endswith(RESIDUAL_OUTPUTS) else std


def build_ours(stage: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Our lite model with seeded random weights, built on meta and filled tensor by tensor.

    Each tensor is drawn in float32 and cast at once, so every dtype gets the same weights (up to
    rounding) while at most one float32 tensor (<= 40 MB) exists besides the model itself.
    """
    cls = StageC if stage == "c" else StageB
    with torch.device("meta"):
        model = cls(**our_config(stage))
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        values = torch.empty(tensor.shape, dtype=torch.float32, device=device)
        state[name] = values.normal_(0.0, init_std(name, tensor.shape), generator=generator).to(dtype)
        del values
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def to_diffusers_state_dict(state: dict) -> dict:
    """Rename an official-layout Stage C/B state dict into diffusers' ``StableCascadeUNet`` layout.

    The only differences are the attention projections (the packed ``nn.MultiheadAttention``
    ``attn.in_proj_*`` [3c, ...] becomes ``to_q``/``to_k``/``to_v``, ``attn.out_proj`` becomes
    ``to_out.0``) and Stage B's pooled-text mapper (``clip_mapper`` -> ``clip_txt_pooled_mapper``).
    Every other key (``kv_mapper.1``, ``channelwise.{0,2,4}``, GRN ``gamma``/``beta``,
    ``depthwise``, time ``mapper*``, level changers, ``embedding``/``clf``, effnet/pixels
    mappers) is the same. Split tensors are views, so no weight memory is duplicated.
    """
    out = {}
    for key, value in state.items():
        prefix, dot, leaf = key.rpartition(".")
        if prefix.endswith(".attn") and leaf in ("in_proj_weight", "in_proj_bias"):
            base, kind = prefix[: -len(".attn")], leaf[len("in_proj_"):]
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{base}.{part}.{kind}"] = chunk
        elif prefix.endswith(".attn.out_proj"):
            out[f"{prefix[: -len('.attn.out_proj')]}.to_out.0.{leaf}"] = value
        elif prefix == "clip_mapper":
            out[f"clip_txt_pooled_mapper{dot}{leaf}"] = value
        else:
            out[key] = value
    return out


BLOCK_TYPES = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}


def diffusers_config(stage: str) -> dict:
    """``StableCascadeUNet`` keyword arguments equivalent to our lite config."""
    cfg = our_config(stage)
    common = dict(
        in_channels=cfg["c_in"], out_channels=cfg["c_out"], timestep_ratio_embedding_dim=cfg["c_r"],
        patch_size=cfg["patch_size"], conditioning_dim=cfg["c_cond"], block_out_channels=cfg["c_hidden"],
        num_attention_heads=cfg["nhead"], down_num_layers_per_block=cfg["blocks"][0],
        up_num_layers_per_block=cfg["blocks"][1], down_blocks_repeat_mappers=cfg["block_repeat"][0],
        up_blocks_repeat_mappers=cfg["block_repeat"][1],
        block_types_per_layer=[[BLOCK_TYPES[t] for t in level] for level in cfg["level_config"]],
        clip_seq=cfg["c_clip_seq"], kernel_size=cfg["kernel_size"], dropout=cfg["dropout"],
        self_attn=cfg["self_attn"], timestep_conditioning_type=cfg["t_conds"],
    )
    if stage == "c":
        return dict(common, clip_text_in_channels=cfg["c_clip_text"],
                    clip_text_pooled_in_channels=cfg["c_clip_text_pooled"],
                    clip_image_in_channels=cfg["c_clip_img"], switch_level=cfg["switch_level"])
    return dict(common, clip_text_pooled_in_channels=cfg["c_clip"], effnet_in_channels=cfg["c_effnet"],
                pixel_mapper_in_channels=cfg["c_pixels"], switch_level=None)


def build_diffusers(stage: str, our_state: dict) -> torch.nn.Module:
    """diffusers' model carrying ``our_state`` (shared storage, same dtype and device)."""
    from diffusers import StableCascadeUNet

    with torch.device("meta"):
        model = StableCascadeUNet(**diffusers_config(stage))
    model.load_state_dict(to_diffusers_state_dict(our_state), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build_pair_member(stage, which, dtype, device, seed=0):
    """One of the two models ("ours" or "diffusers"); diffusers' gets ours' weights."""
    ours = build_ours(stage, dtype, device, seed)
    if which == "ours":
        return ours
    model = build_diffusers(stage, ours.state_dict())
    del ours
    return model


# ----------------------------------------------------------------------------------------------
# Inputs and calls
# ----------------------------------------------------------------------------------------------

def make_inputs(stage: str, sizes: dict, dtype, device, seed: int = 1) -> dict:
    """Official-shape inputs (random, seeded, drawn in float32 then cast) in ``dtype``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    r = torch.full((BATCH,), MID_TIME).to(device=device, dtype=dtype)
    if stage == "c":
        side = sizes["c"]
        return dict(x=rand(BATCH, 16, side, side), r=r, clip_text=rand(BATCH, TEXT_TOKENS, 1280),
                    clip_text_pooled=rand(BATCH, 1, 1280), clip_img=rand(BATCH, 1, 768))
    side, eff = sizes["b"], sizes["b_effnet"]
    return dict(x=rand(BATCH, 4, side, side), r=r, effnet=rand(BATCH, 16, eff, eff), clip=rand(BATCH, 1, 1280))


def input_shapes(inputs: dict) -> dict:
    return {k: "x".join(map(str, v.shape)) for k, v in inputs.items()}


def call(stage: str, which: str, model, inputs: dict) -> torch.Tensor:
    i = inputs
    if which == "ours":
        if stage == "c":
            return model(i["x"], i["r"], i["clip_text"], i["clip_text_pooled"], i["clip_img"])
        return model(i["x"], i["r"], i["effnet"], i["clip"])
    if stage == "c":
        return model(i["x"], i["r"], clip_text_pooled=i["clip_text_pooled"], clip_text=i["clip_text"],
                     clip_img=i["clip_img"], return_dict=False)[0]
    return model(i["x"], i["r"], clip_text_pooled=i["clip"], effnet=i["effnet"], return_dict=False)[0]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_call(stage, which, model, inputs, device):
    """(wall seconds, process CPU seconds, output) of one forward step."""
    sync(device)
    cpu0, start = _cpu_seconds(), time.perf_counter()
    with torch.inference_mode():
        out = call(stage, which, model, inputs)
    sync(device)
    return time.perf_counter() - start, _cpu_seconds() - cpu0, out


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    ours, theirs = ours.double(), theirs.double()
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    return {"max_abs_diff": diff, "max_abs_output": scale, "rel_diff": diff / max(scale, 1e-30),
            "finite": bool(torch.isfinite(ours).all() and torch.isfinite(theirs).all())}


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(stage, which, dtype_name, size_name, device_name, threads) -> dict:
    """Run in a fresh process: build one model, then measure the peak memory of one forward."""
    device = torch.device(device_name)
    dtype = DTYPES[dtype_name]
    torch.set_num_threads(threads)
    model = build_pair_member(stage, which, dtype, device)
    inputs = make_inputs(stage, SIZES[size_name], dtype, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            call(stage, which, model, inputs)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"forward_peak_mb": (peak - before) / 2**20, "process_peak_mb": peak / 2**20,
                "method": "cuda max_memory_allocated"}
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    with torch.inference_mode():
        call(stage, which, model, inputs)
    peak = _status_kb("VmHWM")
    result = {"weights_and_runtime_rss_mb": rss_before / 1024, "process_peak_rss_mb": peak / 1024,
              "method": "VmHWM after clear_refs reset, first forward in a fresh process"}
    result["forward_peak_rss_mb"] = (peak - rss_before) / 1024 if reset else None
    return result


def run_memory_probe(stage, which, dtype_name, size_name, device_name, threads) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_probe",
           f"{stage},{which},{dtype_name},{size_name},{device_name},{threads}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["probe failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Profiling (where does each forward spend its time)
# ----------------------------------------------------------------------------------------------

def _label_calls(obj, method_name, label):
    """Wrap obj.method_name (instance attribute) in a profiler range named ``label``."""
    original = getattr(obj, method_name)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    setattr(obj, method_name, wrapped)


def label_blocks(model, which):
    """Profiler ranges per block type (both implementations run their blocks through ``forward``)."""
    names = ({"ResBlock": "ResBlock", "AttnBlock": "AttnBlock", "TimestepBlock": "TimestepBlock",
              "FeedForwardBlock": "FeedForwardBlock"} if which == "ours" else
             {"SDCascadeResBlock": "ResBlock", "SDCascadeAttnBlock": "AttnBlock",
              "SDCascadeTimestepBlock": "TimestepBlock"})
    for module in model.modules():
        name = names.get(type(module).__name__)
        if name:
            _label_calls(module, "forward", f"block::{name}")


MATMUL_OPS = {"aten::addmm", "aten::addmm_", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
              "aten::addmv", "aten::matmul", "aten::_mkl_linear"}


def profile_step(stage, which, model, inputs, top: int) -> dict:
    """Self time per op, per kind (matrix products, attention kernel, everything else) and per block
    type, for one forward after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    label_blocks(model, which)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        call(stage, which, model, inputs)
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) or 1
    blocks = {e.key[len("block::"):]: {"total_s": e.cpu_time_total / 1e6, "calls": e.count}
              for e in events if e.key.startswith("block::")}
    ops = sorted((e for e in events if not e.key.startswith("block::")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    by_shape = sorted((e for e in prof.key_averages(group_by_input_shape=True) if not e.key.startswith("block::")),
                      key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        if e.key.startswith("block::"):
            continue
        group = "matmul" if e.key in MATMUL_OPS else ("attention" if "scaled_dot_product" in e.key else "other")
        groups[group] += e.self_cpu_time_total / 1e6
    return {
        "total_self_s": total_self / 1e6,
        "self_s_by_kind": groups,
        "blocks": blocks,
        "top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                     "share": e.self_cpu_time_total / total_self} for e in ops],
        "top_ops_by_shape": [{"op": e.key, "shapes": str(e.input_shapes)[:200], "self_s": e.self_cpu_time_total / 1e6,
                              "calls": e.count} for e in by_shape],
    }


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def source_version() -> str:
    """git commit of the code under test, with '+dirty' when wuerstchen/ has local changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "wuerstchen"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def bench_case(stage, dtype_name, size_name, device, warmup, iters, rtol, profile_top) -> dict:
    dtype = DTYPES[dtype_name]
    log(f"[{STAGE_NAMES[stage]} {dtype_name}] building models ...")
    t0 = time.perf_counter()
    ours = build_ours(stage, dtype, device)
    theirs = build_diffusers(stage, ours.state_dict())
    inputs = make_inputs(stage, SIZES[size_name], dtype, device)
    build_s = time.perf_counter() - t0
    models = {"ours": ours, "diffusers": theirs}

    wall = {"ours": [], "diffusers": []}
    cpu = {"ours": [], "diffusers": []}
    first_out = {}
    for rep in range(warmup):
        for which in ("ours", "diffusers"):
            seconds, _, out = timed_call(stage, which, models[which], inputs, device)
            first_out.setdefault(which, out)
            log(f"  warm-up {which}: {seconds:.2f} s")
    if not first_out:  # no warm-up: the parity check still needs one output of each
        first_out = {which: timed_call(stage, which, models[which], inputs, device)[2] for which in models}
    check = compare(first_out["ours"], first_out["diffusers"])
    load_before = os.getloadavg()[0]
    for rep in range(iters):
        order = ("ours", "diffusers") if rep % 2 == 0 else ("diffusers", "ours")  # A B B A ...
        for which in order:
            seconds, cpu_seconds, _ = timed_call(stage, which, models[which], inputs, device)
            wall[which].append(seconds)
            cpu[which].append(cpu_seconds)
            log(f"  iter {rep} {which}: {seconds:.2f} s (cpu {cpu_seconds:.2f} s)")

    median = {k: statistics.median(v) for k, v in wall.items()}
    pair_ratios = [a / b for a, b in zip(wall["ours"], wall["diffusers"])]
    result = {
        "inputs": input_shapes(inputs),
        "params_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "build_s": round(build_s, 2),
        "ours_s": median["ours"],
        "diffusers_s": median["diffusers"],
        "ratio_ours_over_diffusers": median["ours"] / median["diffusers"],
        "ratio_median_of_pairs": statistics.median(pair_ratios),
        "ratio_of_min": min(wall["ours"]) / min(wall["diffusers"]),
        "ratio_of_cpu_time": statistics.median(cpu["ours"]) / statistics.median(cpu["diffusers"]),
        "ours_all_s": [round(t, 3) for t in wall["ours"]],
        "diffusers_all_s": [round(t, 3) for t in wall["diffusers"]],
        "ours_cpu_s": [round(t, 3) for t in cpu["ours"]],
        "diffusers_cpu_s": [round(t, 3) for t in cpu["diffusers"]],
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "parity": dict(check, rtol=rtol, ok=check["finite"] and check["rel_diff"] <= rtol)
        if dtype == torch.float32 else dict(check, note="low precision: informational, see error_vs_fp32"),
    }
    outputs = {which: out.float().cpu() for which, out in first_out.items()}
    del first_out
    if profile_top:
        log("  profiling one step of each ...")
        result["profile"] = {which: profile_step(stage, which, models[which], inputs, profile_top)
                             for which in ("ours", "diffusers")}
    del models, ours, theirs
    gc.collect()
    return result, outputs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--stages", default="c,b", help="comma list of c (Stage C lite) and b (Stage B lite)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32, fp16")
    p.add_argument("--quick", action="store_true",
                   help="smaller spatial sizes (Stage C 16x16, Stage B 128x128; 3 timed iterations on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each model first (default 1)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed runs of each model (default: 10 on CUDA, 2 on CPU, 3 on CPU with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-model peak-memory subprocesses")
    p.add_argument("--profile", type=int, nargs="?", const=15, default=0, metavar="TOP",
                   help="also profile one step of each model and list the TOP ops (default 15)")
    p.add_argument("--rtol", type=float, default=1e-3, help="fp32 parity tolerance, relative to max |output|")
    p.add_argument("--output", default=None, help="also write the JSON to this file")
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._probe:
        stage, which, dtype_name, size_name, device_name, threads = args._probe.split(",")
        print(json.dumps(memory_probe(stage, which, dtype_name, size_name, device_name, int(threads))))
        return 0
    try:
        import diffusers
    except ImportError:
        log("diffusers is needed for this benchmark: pip install diffusers psutil  (or pip install -e .[bench])")
        return 2

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    threads = args.threads or cpu_count()
    torch.set_num_threads(threads)
    size_name = "quick" if args.quick else "official"
    iters = args.iters if args.iters is not None else (10 if device.type == "cuda" else (3 if args.quick else 2))
    if iters < 1 or args.warmup < 0:
        raise SystemExit("--iters must be >= 1 and --warmup >= 0")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    dtype_names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for s in stages:
        if s not in STAGE_NAMES:
            raise SystemExit(f"unknown stage {s!r}: use c and/or b")
    for d in dtype_names:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}: use {', '.join(DTYPES)}")

    report = {
        "benchmark": "per-step forward, ours (wuerstchen) vs diffusers StableCascadeUNet, same weights",
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
        "source": source_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "sizes": size_name,
        "batch": BATCH,
        "warmup": args.warmup,
        "iters": iters,
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        "results": {},
    }
    started = time.perf_counter()
    all_ok = True
    outputs = {}
    # float32 first: the low-precision outputs are then compared with it
    for stage in stages:
        for dtype_name in sorted(dtype_names, key=lambda d: d != "fp32"):
            case, outputs[stage, dtype_name] = bench_case(stage, dtype_name, size_name, device, args.warmup, iters,
                                                          args.rtol, args.profile)
            reference = outputs.get((stage, "fp32"))
            if dtype_name != "fp32" and reference is not None:
                case["parity"]["error_vs_fp32"] = {which: compare(out, reference["diffusers"])["rel_diff"]
                                                   for which, out in outputs[stage, dtype_name].items()}
            if not args.no_memory:
                log(f"[{STAGE_NAMES[stage]} {dtype_name}] peak memory probes ...")
                case["memory"] = {which: run_memory_probe(stage, which, dtype_name, size_name, str(device), threads)
                                  for which in ("ours", "diffusers")}
            all_ok &= case["parity"].get("ok", True)
            report["results"][f"{STAGE_NAMES[stage]}/{dtype_name}"] = case
            log(f"  -> ours {case['ours_s']:.3f} s, diffusers {case['diffusers_s']:.3f} s, "
                f"ratio {case['ratio_ours_over_diffusers']:.3f}, rel diff {case['parity']['rel_diff']:.2e}")
    report["total_s"] = time.perf_counter() - started
    report["parity_ok"] = all_ok
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
