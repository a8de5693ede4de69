"""One batch from jobs to manifest: skip what is done, group the rest, run them on a runner (in this
process or on Ray), record each result as it comes, and sum up."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Protocol, Sequence

from .jobs import Job
from .manifest import Output
from .progress import Progress
from .worker import Result

GROUP_SIZE = 4  # jobs sent to a worker at once (a rerun after a worker died redoes at most these)

OnResult = Callable[[Job, Result], None]


class Runner(Protocol):
    def run(self, groups: List[List[Job]], on_result: OnResult) -> None:
        """Run every group's jobs, calling ``on_result`` once per job as its result arrives."""


@dataclass
class Plan:
    groups: List[List[Job]]  # the jobs to run, grouped by size and settings
    skipped: List[Job]  # done in an earlier run (manifest line and files present)
    duplicates: List[tuple]  # (job, the earlier line with the same content)

    @property
    def pending(self) -> int:
        return sum(len(g) for g in self.groups)


def plan(jobs: Sequence[Job], output: Output, group_size: int = GROUP_SIZE) -> Plan:
    done = output.finished()
    first: Dict[str, Job] = {}
    skipped, duplicates, by_key = [], [], {}
    for job in jobs:
        if job.name in first:
            duplicates.append((job, first[job.name].line))
            continue
        first[job.name] = job
        if job.name in done:
            skipped.append(job)
        else:
            by_key.setdefault(job.group_key(), []).append(job)
    groups = [same[i:i + group_size] for same in by_key.values() for i in range(0, len(same), group_size)]
    return Plan(groups, skipped, duplicates)


@dataclass
class Summary:
    total: int
    skipped: int
    duplicates: int
    done: int = 0
    failed: List[tuple] = field(default_factory=list)  # (job, error)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> List[str]:
        out = [f"{self.total} job(s): {self.done} done, {len(self.failed)} failed, {self.skipped} already done "
               f"(skipped), {self.duplicates} duplicate line(s); {self.seconds:.1f} s"]
        for job, error in self.failed[:20]:
            out.append(f"  failed: line {job.line} ({job.name}): {error}")
        if len(self.failed) > 20:
            out.append(f"  ... and {len(self.failed) - 20} more; every failure is in the manifest")
        return out


def run_batch(jobs: Sequence[Job], output: Output, runner: Runner, *, group_size: int = GROUP_SIZE,
              progress: bool = True) -> Summary:
    """Run the jobs not done yet; each result is written (images, then manifest line) as it arrives."""
    start = time.perf_counter()
    the_plan = plan(jobs, output, group_size)
    summary = Summary(len(jobs), len(the_plan.skipped), len(the_plan.duplicates))
    bar = Progress(the_plan.pending + len(the_plan.skipped), len(the_plan.skipped), enabled=progress)
    pending = {job.name for group in the_plan.groups for job in group}

    def on_result(job: Job, result: Result) -> None:
        if job.name not in pending:  # a result that came twice (a retried group) is written once
            return
        pending.discard(job.name)
        entry = output.record(job, result)
        ok = entry["status"] == "done"
        if ok:
            summary.done += 1
        else:
            summary.failed.append((job, entry["error"]))
        bar.update(ok)

    try:
        if the_plan.groups:
            runner.run(the_plan.groups, on_result)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary
