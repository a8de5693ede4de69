"""The in-process runner: one :class:`~wuerstchen.batch.worker.Worker` in this process (no Ray)."""

from __future__ import annotations

from typing import List

from .jobs import Job
from .run import OnResult
from .worker import Worker


class LocalRunner:
    def __init__(self, worker: Worker):
        self.worker = worker

    def run(self, groups: List[List[Job]], on_result: OnResult) -> None:
        for group in groups:
            for job in group:  # each result is written before the next job starts
                on_result(job, self.worker.run(job))
