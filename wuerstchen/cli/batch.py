"""``python -m wuerstchen batch --models DIR --prompts FILE --out FOLDER [--ray auto|ADDRESS] [--workers N]``

Many images from a prompts file (JSON Lines, or CSV with a ``prompt`` column; each line ``prompt``
plus any ``generate`` setting), in this process or on Ray (``--ray auto``: a Ray started here, or the
one ``ray.init()`` finds; ``--ray ADDRESS``: join that cluster). Every line is checked before any
model loads; each image is named by its job's content and recorded in ``FOLDER/manifest.jsonl``, so
a rerun only does what is not done. Exit code 0 when every job finished, 1 when any failed (the
summary lists them), 2 for input that cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..options.generate import UsageError, _writable_folder, generate_parser
from .common import files_and_family, report_failure

_SHARED = ("family", "embeddings", "stage_c_variant", "stage_b_variant", "dtype", "vram_budget", "device")


def register(subparsers) -> None:
    b = subparsers.add_parser("batch", help="many images from a JSON Lines / CSV prompts file, here or on Ray")
    b.add_argument("--models", required=True, help="folder holding the weight files (the same path on every Ray node)")
    b.add_argument("--prompts", required=True,
                   help="JSON Lines (one {\"prompt\": ..., setting: value} per line) or CSV with a prompt column; "
                        "settings are generate's (negative, width, height, seed, c_steps, lora, ...)")
    b.add_argument("--out", required=True, help="output folder: the images and manifest.jsonl")
    b.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="run on Ray: auto = a local Ray (or the one ray.init() finds), ADDRESS = join that cluster "
                        "(needs pip install 'ray>=2.9'); default: in this process")
    b.add_argument("--workers", type=int, default=None,
                   help="Ray workers, each holding the models (default: one per GPU of the cluster, else 1)")
    b.add_argument("--group", type=int, default=None,
                   help="jobs of the same size and settings sent to a worker at once (default 4)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    generate = generate_parser()  # the whole batch's options are generate's own
    for action in generate._actions:
        if action.dest in _SHARED:
            b._add_action(_copy(action))
    b.set_defaults(func=run)


def _copy(action: argparse.Action) -> argparse.Action:
    return type(action)(option_strings=action.option_strings, dest=action.dest, default=action.default,
                        type=action.type, choices=action.choices, help=action.help, metavar=action.metavar)


def _check(args) -> None:
    models = Path(args.models)
    if not models.is_dir():
        problem = "is a file" if models.exists() else "does not exist"
        raise UsageError(f"--models {args.models!r} {problem}; give the folder that holds the weight files")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a folder for the images and manifest.jsonl")
    _writable_folder(out, f"--out {args.out!r}")
    if args.workers is not None and args.ray is None:
        raise UsageError("--workers is the number of Ray workers; add --ray auto (or --ray ADDRESS)")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: give at least 1")
    if args.group is not None and args.group < 1:
        raise UsageError(f"--group {args.group}: give at least 1")
    if args.ray is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--ray needs Ray: pip install 'ray>=2.9' (or the comfyui-wuerstchen[batch] extra)") from None


def worker_options(args, family: str) -> dict:
    return dict(models=str(Path(args.models).resolve()), family=family, dtype=args.dtype, device=args.device,
                vram_budget=args.vram_budget, embeddings=args.embeddings, stage_c_variant=args.stage_c_variant,
                stage_b_variant=args.stage_b_variant)


def run(args) -> int:
    from ..batch.jobs import JobsError, load_jobs
    from ..batch.manifest import Output
    from ..batch.run import GROUP_SIZE, run_batch
    from ..pipeline.cascade import MissingWeightsError

    try:
        _check(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        files, family, note = files_and_family(args)
    except MissingWeightsError as exc:
        return report_failure(exc)
    try:
        jobs = load_jobs(args.prompts, args.models, args.out, family, args, check_device=args.ray is None)
    except JobsError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    if note:
        print(f"note: {note}", file=sys.stderr)
    options = worker_options(args, family)
    if args.ray is None:
        from ..batch.local import LocalRunner
        from ..batch.worker import Worker

        runner = LocalRunner(Worker(**options))
    else:
        from ..batch.ray_runner import RayRunner, RayStartError

        runner = RayRunner(options, workers=args.workers, address=args.ray)
        try:
            runner.start()
        except RayStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        summary = run_batch(jobs, Output(args.out), runner, group_size=args.group or GROUP_SIZE,
                            progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted: the jobs finished so far are in {Path(args.out) / 'manifest.jsonl'}; run the same "
              "command again to do the rest", file=sys.stderr)
        return 130
    finally:
        if hasattr(runner, "stop"):
            runner.stop()
    stream = sys.stdout if summary.ok else sys.stderr
    for line in summary.lines():
        print(line, file=stream)
    print(f"manifest: {Path(args.out) / 'manifest.jsonl'}", file=stream)
    return 0 if summary.ok else 1
