"""Finding weight files in model folders: symlinks followed, cycles cut, unusable files explained.

Model stores are often shared between tools by symlinking files or whole folders into each
tool's model folder, so links are followed; a folder reached twice (a link cycle, or two links
to one store) is walked once. Nothing here opens a file: deciding what a file holds is
``checkpoints``' job, and why a file cannot be used is kept as a :class:`SkippedFile`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

from ..storage.weights_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WeightFileError

WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


def walk(root: os.PathLike | str, suffixes: Sequence[str] = WEIGHT_SUFFIXES) -> Iterator[Path]:
    """Every entry below ``root`` that is not a folder and whose name ends in one of ``suffixes``.

    Paths are spelled under ``root`` (links are not resolved in them) and sorted within each
    folder. Entries that are not regular files (broken links, link loops, FIFOs) are yielded too:
    callers that list files check them, callers that report problems name them.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    seen = set()
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable folder: nothing to list there
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        subfolders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links; False for broken links and loops
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(Path(entry.path))
            elif entry.name.lower().endswith(suffixes):
                yield Path(entry.path)
        stack.extend(reversed(subfolders))


def is_regular_file(path: os.PathLike | str) -> bool:
    """True for a regular file, also behind symlinks; False for loops, broken links, FIFOs, folders."""
    try:
        return Path(path).is_file()
    except OSError:
        return False


@dataclass(frozen=True)
class SkippedFile:
    """A file in a model folder that cannot be used, why, and what it seems meant to be.

    ``kinds`` is filled when the header could still be read (a truncated download, say), so a
    missing-weights message can say "stage_b.safetensors was found but is truncated".
    """

    path: Path
    reason: str
    kinds: Tuple[str, ...] = ()

    @classmethod
    def from_error(cls, path: Path, exc: BaseException) -> "SkippedFile":
        if isinstance(exc, WeightFileError):
            return cls(path, exc.reason, _kinds_from_header(exc))
        text = str(exc).strip().splitlines()
        reason = text[0] if text else type(exc).__name__
        prefix = f"{path.name}: "
        return cls(path, reason[len(prefix):] if reason.startswith(prefix) else reason)

    def describe(self) -> str:
        """One line: ``stage_b.safetensors (Stage B (latent decoder)) was found but cannot be used: …``."""
        from .kinds import KINDS

        what = f" ({' + '.join(KINDS[k].title if k in KINDS else k for k in self.kinds)})" if self.kinds else ""
        return f"{self.path}{what} was found but cannot be used: {self.reason}"


def _kinds_from_header(exc: WeightFileError) -> Tuple[str, ...]:
    if not exc.shapes:
        return ()
    from .checkpoints import detect_parts

    try:
        return tuple(dict.fromkeys(d.kind for d in detect_parts(exc.shapes, exc.metadata)))
    except Exception:  # a header too odd to identify: the reason alone still says what is wrong
        return ()


def skipped_for(skipped: List[SkippedFile], kind: str) -> List[SkippedFile]:
    """The skipped files that seem to hold ``kind`` (for a missing-weights message)."""
    return [s for s in skipped if kind in s.kinds]
