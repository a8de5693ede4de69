"""The output folder: the images, named by their jobs' content, and ``manifest.jsonl``.

The manifest holds one JSON line per finished job: its files, prompt, settings, seed and seconds, or
its error when it failed. A job is done when its last line says so and its files are all there, so
a rerun skips it. Images are written (through a temporary name, then renamed) before the line, and
each line is flushed to disk at once: a crash never leaves a line for a missing image.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from .jobs import Job
from .worker import Result

MANIFEST = "manifest.jsonl"


def read_manifest(path: Path) -> Iterator[dict]:
    """The manifest's records (a line cut short by a crash is skipped)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "name" in record:
                yield record


class Output:
    """Writes jobs' images and manifest lines into ``folder`` (one writer: the driver)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.manifest = self.folder / MANIFEST

    def finished(self) -> Dict[str, dict]:
        """Job name -> its manifest record, for the jobs done with every file present."""
        last: Dict[str, dict] = {}
        for record in read_manifest(self.manifest):
            last[record["name"]] = record
        return {name: r for name, r in last.items()
                if r.get("status") == "done" and all((self.folder / f).is_file() for f in r.get("files", []))}

    def record(self, job: Job, result: Result) -> dict:
        """Write ``result``'s images under the job's names, then its manifest line; returns the line."""
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = {"name": job.name, "line": job.line, "prompt": job.prompt, "family": job.family,
                 "seed": job.seed, "settings": job.settings, "seconds": round(result.seconds, 4),
                 "worker": result.worker}
        error = result.error
        if error is None and len(result.images) != len(job.files):
            error = f"the worker returned {len(result.images)} image(s) for a batch of {len(job.files)}"
        if error is None:
            try:
                for name, data in zip(job.files, result.images):
                    self._write(self.folder / name, data)
            except OSError as exc:
                error = f"could not write the image into {self.folder} ({exc})"
        if error is None:
            entry.update(status="done", files=job.files)
        else:
            entry.update(status="failed", error=error)
        self._append(entry)
        return entry

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)

    def _append(self, entry: dict) -> None:
        entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with open(self.manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def lines_for(folder, name: Optional[str] = None) -> List[dict]:
    """Every manifest record in ``folder`` (of job ``name`` only, when given)."""
    records = list(read_manifest(Path(folder) / MANIFEST))
    return records if name is None else [r for r in records if r["name"] == name]
