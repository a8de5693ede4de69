"""What the commands that run models do alike: say in one line why a run stopped, with the exit
code that says whose fault it is (2: the request or the files, 1: the run itself)."""

from __future__ import annotations

import sys

from ..inputs.limits import NonFiniteError, RequestError
from ..options.generate import FAMILY_FLAGS
from ..pipeline.cascade import CascadeFiles, MissingWeightsError

# What a run may raise that is reported, not a traceback.
RUN_ERRORS = (MissingWeightsError, RequestError, NonFiniteError, ValueError, OSError)


def report_failure(exc: BaseException) -> int:
    """Print why the run stopped; the exit code: 2 for missing files or a refused request, else 1."""
    if isinstance(exc, MissingWeightsError):  # already a whole message naming the files
        print(str(exc), file=sys.stderr)
        return 2
    print(f"error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, RequestError) else 1


def files_and_family(args):
    """(files, family, note) of ``--models`` as ``--family`` and the variant flags pick; raises
    MissingWeightsError (a whole message) when no family is complete there."""
    files = CascadeFiles.from_dir(args.models, args.stage_c_variant, args.stage_b_variant)
    family, note = files.choose_family(args.models, FAMILY_FLAGS.get(args.family))
    return files, family, note


def close_bars(bars: dict) -> None:
    for bar in bars.values():
        bar.close()
