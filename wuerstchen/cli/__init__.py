"""Command line: ``python -m wuerstchen COMMAND …``, one module per command.

Each command module has ``register(subparsers)``, which adds its sub-parser and sets ``func``; the
top layer of the core: a command may import any library layer, nothing imports a command.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import batch, edit, generate, tiny_models, train_lora

COMMANDS = (generate, tiny_models, batch, edit, train_lora)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wuerstchen",
                                description="Stable Cascade (Würstchen v3) and Würstchen v2 text-to-image.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
