"""The Ray runner: one actor per GPU (or per set of CPUs), each a
:class:`~wuerstchen.batch.worker.Worker` holding the models; the driver hands out groups of jobs and
writes each group's results as they come back.

Nothing lost, nothing twice: only the driver writes (images and manifest lines), and only results it
received, each job once. An actor that dies (killed, out of host memory, its machine gone) loses at
most the group it was running; that group goes back to the front of the queue for the next free
worker, and Ray restarts the actor (``max_restarts``). A group whose worker died
``max_attempts`` times is recorded as failed. Jobs and results are plain data (PNG bytes come back),
so the workers need the models folder at the same path but no shared output folder.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from pathlib import Path
from typing import Dict, List, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

from .jobs import Job
from .run import OnResult
from .worker import Result, Worker

MAX_RESTARTS = 2  # Ray restarts a dead actor this many times
MAX_ATTEMPTS = 3  # a group is tried on this many workers that died under it before it counts as failed


class RayStartError(RuntimeError):
    """Ray could not be started or joined, or cannot hold the workers asked for."""


class RayRunner:
    """Runs groups of jobs on ``workers`` Ray actors (default: one per GPU of the cluster, else one).

    ``address``: ``"auto"`` for the Ray ``ray.init()`` finds or starts on this machine, or a cluster's
    address; with Ray already initialised in this process, that Ray is used. ``worker_options`` are
    :class:`Worker`'s arguments. ``cpus_per_worker``: the CPUs (and torch threads of a CPU worker)
    each worker takes (default: a CPU worker shares the cluster's CPUs with the others; a GPU
    worker takes up to 4)."""

    def __init__(self, worker_options: dict, workers: Optional[int] = None, address: str = "auto",
                 max_attempts: int = MAX_ATTEMPTS, cpus_per_worker: Optional[int] = None):
        self.worker_options = dict(worker_options)
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.address = address
        self.max_attempts = max_attempts
        self.actors: List = []
        self.deaths: Counter = Counter()  # actor index -> times it died under a group
        self.busy: Dict[int, List[Job]] = {}  # actor index -> the group it runs now
        self._started_ray = False

    # -- the actors ---------------------------------------------------------------------------

    def start(self) -> None:
        if not ray.is_initialized():
            try:
                init_ray(None if self.address == "auto" else self.address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RayStartError(f"--ray {self.address}: {exc}") from None
            self._started_ray = True
        try:
            self._start_actors()
        except RayStartError:
            self.stop()
            raise

    def _start_actors(self) -> None:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        count = self.workers or gpus or 1
        if gpus:
            if count > gpus:
                raise RayStartError(f"--workers {count}: the Ray cluster has {gpus} GPU(s), one per worker")
            cpus_each = self.cpus_per_worker or max(1, min(4, cpus // count))
            options, threads = {"num_gpus": 1, "num_cpus": cpus_each}, None
        else:
            cpus_each = self.cpus_per_worker or max(1, cpus // count)
            if count * cpus_each > cpus:
                raise RayStartError(f"--workers {count}: the Ray cluster has {cpus} CPU(s), "
                                    f"{cpus_each} per worker")
            options, threads = {"num_cpus": cpus_each}, cpus_each
        remote = ray.remote(Worker).options(max_restarts=MAX_RESTARTS, max_task_retries=0, **options)
        self.actors = [remote.remote(**self.worker_options, threads=threads) for _ in range(count)]
        try:
            ray.get([actor.ready.remote() for actor in self.actors])
        except RayError as exc:
            raise RayStartError(f"the Ray workers could not start: {_last_line(exc)}") from None

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    # -- the driver loop ----------------------------------------------------------------------

    def run(self, groups: List[List[Job]], on_result: OnResult) -> None:
        if not self.actors:
            self.start()
        queue = deque(groups)
        idle = deque(range(len(self.actors)))
        tries: Counter = Counter()  # job name -> workers that died under it
        running: Dict[ray.ObjectRef, int] = {}  # a group's results (or a restarted worker's ready call) -> worker
        coming_back = set()  # workers that died and are being restarted by Ray
        while queue or running:
            while queue and idle:
                index = idle.popleft()
                group = queue.popleft()
                self.busy[index] = group
                running[self.actors[index].run_group.remote(group)] = index
            if not running:  # every worker is gone: what is left cannot run
                for group in queue:
                    for job in group:
                        on_result(job, Result(job.name, error="every Ray worker died; rerun to finish it"))
                return
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                index = running.pop(ref)
                if index in coming_back:
                    self._came_back(ref, index, running, idle, coming_back)
                    continue
                group = self.busy.pop(index)
                try:
                    results = ray.get(ref)
                except RayActorError as exc:  # the worker died under the group: it goes to another
                    self.deaths[index] += 1
                    retry = []
                    for job in group:
                        tries[job.name] += 1
                        if tries[job.name] < self.max_attempts:
                            retry.append(job)
                        else:
                            on_result(job, Result(job.name, error=f"the Ray worker running it died "
                                                                  f"{tries[job.name]} times (last: {_first_line(exc)})"))
                    if retry:
                        queue.appendleft(retry)
                    if self.deaths[index] <= MAX_RESTARTS:  # Ray restarts it; it gets work once it is back
                        coming_back.add(index)
                        running[self.actors[index].ready.remote()] = index
                    continue
                except RayError as exc:  # the call itself failed: record it for each job of the group
                    for job in group:
                        on_result(job, Result(job.name, error=f"{exc.__class__.__name__}: {_first_line(exc)}"))
                    idle.append(index)
                    continue
                for job, result in zip(group, results):
                    on_result(job, result)
                idle.append(index)

    def _came_back(self, ref, index: int, running: dict, idle: deque, coming_back: set) -> None:
        """A restarted worker answered (it takes work again), or died again while loading (it is
        given another restart while Ray has one, else dropped)."""
        try:
            ray.get(ref)
        except ActorUnavailableError:  # still restarting: ask again
            time.sleep(0.05)
            running[self.actors[index].ready.remote()] = index
            return
        except RayActorError:
            self.deaths[index] += 1
            if self.deaths[index] <= MAX_RESTARTS:
                running[self.actors[index].ready.remote()] = index
            else:
                coming_back.discard(index)
            return
        coming_back.discard(index)
        idle.append(index)


def init_ray(address: Optional[str] = None, **options) -> None:
    """``ray.init`` with this package importable by the workers (its folder on their PYTHONPATH) and
    no dashboard; ``options`` go to ``ray.init`` (e.g. ``num_cpus``)."""
    root = str(Path(__file__).resolve().parents[2])
    current = os.environ.get("PYTHONPATH", "")
    path = os.pathsep.join([root] + ([current] if current else []))
    ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}}, **options)


def _last_line(exc: BaseException) -> str:
    """The last line of a Ray error: the worker's own exception ("FileNotFoundError: ...")."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else exc.__class__.__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
