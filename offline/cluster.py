"""Fold-runs as Ray tasks: N at a time on this machine, or on an existing Ray cluster.

``ser-offline loso ... --workers N`` starts a local Ray with N fold-run slots;
``--ray-address ADDR`` joins a cluster (``ray start --head`` on one machine,
``ray start --address ADDR`` on the others). Each fold-run is one task: it gets
the corpus listing from Ray's object store (put there once), reads the audio and
the log-Mel cache from the same paths as the driver (a shared filesystem on a
cluster; a node that cannot see the cache recomputes the features), trains,
tests, and returns its record, which the driver saves the moment it arrives, so
an interrupted distributed run resumes exactly like a local one. A task that
raises or whose worker dies is retried once, then reported as failed.

Ray is an optional dependency (``pip install 'stream_ser[cluster]'``); nothing
imports this module unless one of the flags is given.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

INSTALL_HINT = "Ray is not installed: pip install 'stream_ser[cluster]' (or: pip install ray)"
TASK_RETRIES = 1  # a failed fold-run is tried once more, then reported


def _fold_run_task(corpus, cfg, cache_dir, fingerprint, job, device_name: str, threads: int):
    """The Ray task body: one fold-run, with the thread count the driver asked for (so a record does not
    depend on how many cores the worker's machine happens to have). -> (record, log lines, where)."""
    import torch

    from .evaluate import fold_run_record
    from .train import FeatureBank

    torch.set_num_threads(threads)
    lines: list[str] = []
    device = torch.device(device_name)
    bank = FeatureBank(corpus, cfg.frontend_config(), Path(cache_dir) if cache_dir else None, device, lines.append)
    rec = fold_run_record(corpus, cfg, bank, job, device, fingerprint, lines.append, None)
    where = {"host": platform.node(), "pid": os.getpid(), "threads": threads, "device": device_name}
    return rec, lines, where


@dataclass
class RayExecutor:
    """Runs fold-runs as Ray tasks, at most ``workers`` at a time (None: as many as the cluster schedules).

    ``cpus_per_run`` is both the Ray CPU request of a task and its torch thread count; ``gpus_per_run``
    may be fractional (0.25: four fold-runs share one GPU) and makes the tasks train on CUDA.
    """

    workers: int | None = None
    address: str | None = None
    cpus_per_run: int = 1
    gpus_per_run: float = 0.0
    ran_on: list = field(default_factory=list)

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.cpus_per_run < 1:
            raise ValueError("--cpus-per-run must be at least 1")
        if not 0 <= self.gpus_per_run <= 64:
            raise ValueError("--gpus-per-run must be between 0 and 64 (fractions share a GPU: 0.25)")
        if self.address is None and self.workers is None:
            raise ValueError("a local Ray needs --workers N")

    def _init_ray(self, log):
        try:
            import ray
        except ImportError:
            raise RuntimeError(INSTALL_HINT) from None
        if not ray.is_initialized():
            if self.address:
                log(f"joining the Ray cluster at {self.address}")
                ray.init(address=self.address, log_to_driver=False)
            else:
                # a local Ray sized to the fold-runs asked for; the GPUs it sees are this machine's
                ray.init(num_cpus=self.workers * self.cpus_per_run, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            res = ray.cluster_resources()
            log(f"Ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; {self.describe()['summary']}")
        return ray

    def describe(self) -> dict:
        slots = "as many as the cluster fits" if self.workers is None else str(self.workers)
        return {"workers": self.workers, "address": self.address or "local", "cpus_per_run": self.cpus_per_run,
                "gpus_per_run": self.gpus_per_run, "ran_on": self.ran_on,
                "summary": f"{slots} concurrent fold-runs on {self.address or 'a local Ray'}, "
                           f"{self.cpus_per_run} CPU(s)" + (f" and {self.gpus_per_run:g} GPU" if self.gpus_per_run else "")
                           + " each"}

    def run(self, corpus, cfg, cache_dir, fingerprint: str, jobs: list, log=print) -> Iterator[tuple]:
        """Yield ``(job, record or None, error or None)`` for every job, in the order they finish."""
        ray = self._init_ray(log)
        from ray.exceptions import RayError

        task = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=True)(_fold_run_task)
        corpus_ref = ray.put(corpus)  # once, not once per task
        device_name = "cuda" if self.gpus_per_run > 0 else "cpu"
        cache = str(Path(cache_dir).resolve()) if cache_dir else None
        limit = self.workers or len(jobs)
        queue = list(jobs)
        running: dict = {}
        while queue or running:
            while queue and len(running) < limit:
                job = queue.pop(0)
                ref = task.options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                   name=f"fold-run {job.name}").remote(corpus_ref, cfg, cache, fingerprint, job,
                                                                       device_name, self.cpus_per_run)
                running[ref] = job
                log(f"fold {job.fold.name} run {job.run} (seed {job.seed}): submitted to Ray")
            ready, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ready[0])
            try:
                rec, lines, where = ray.get(ready[0])
            except RayError as e:
                yield job, None, _task_error(e)
                continue
            for line in lines:
                log(f"[{job.name}] {line}")
            self.ran_on.append({"fold_run": job.name, **where})
            yield job, rec, None


def _task_error(e: BaseException) -> str:
    """The user's error in one line, as a local fold-run reports it (Ray wraps it in its own traceback)."""
    from .evaluate import _error_line
    return _error_line(getattr(e, "cause", None) or e) + f" (after {TASK_RETRIES} retry)"
