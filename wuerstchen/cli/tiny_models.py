"""``python -m wuerstchen tiny-models DIR``: tiny random checkpoints in every official layout (smoke tests)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..options.generate import UsageError, _writable_folder


def register(subparsers) -> None:
    t = subparsers.add_parser("tiny-models", help="write tiny random checkpoints in every official layout (smoke tests)")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny_models)


def cmd_tiny_models(args) -> int:
    from ..files.tiny import write_tiny_models

    folder = Path(args.dir)
    try:
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"tiny-models {args.dir!r} is a file; give a folder to write the checkpoints into")
        _writable_folder(folder, f"tiny-models {args.dir!r}")
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = write_tiny_models(args.dir, seed=args.seed)
    for path in written:
        print(path)
    print(f"wrote {len(written)} tiny random checkpoints to {args.dir} (noise generators for smoke tests, not real models)")
    return 0
