"""Where a job's embedding tasks run: the resources they ask for, and which worker takes the next.

Every embedding worker keeps :data:`TASKS_PER_EMBED_WORKER` tasks of the job — one running,
one queued behind it — and no more. Submitting all of them at once would not be faster, and
would starve the job's other work: the scheduler holds back tasks without dependencies
(reading, chunking, the diff) from a worker whose slots are taken by tasks waiting for its
embed slot. Each task goes to the worker with the fewest unfinished ones (a loose restriction:
if that worker dies the task runs elsewhere); left to itself the scheduler placed both queued
tasks on one worker while the other sat idle.

A remote model (backend ``openai``) loads nothing and needs no device: its tasks ask for no
resource and no embed slot, run on the CPU workers (every worker if all have GPUs), and each
worker process gets an equal share of the job's request and token limits
(``EmbedderSpec.rate_share``). Those workers are the ones the job saw first; workers that
join later get no tasks, which would take shares the others already use.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from typing import Any

from embedfleet.config import EmbedderSpec
from embedfleet.embedders.cache import get_embedder
from embedfleet.pipeline.cluster import embed_resources, embed_workers, worker_threads

__all__ = ["Placement", "Preload", "TASKS_PER_EMBED_WORKER", "WORKERS_REFRESH_SECONDS"]

#: Embedding tasks kept on each embedding worker: one running, one queued behind it.
TASKS_PER_EMBED_WORKER = 2
#: How often a job looks for embedding workers that joined or left the cluster.
WORKERS_REFRESH_SECONDS = 5.0
#: Stands for the worker of a task assigned to a worker that has since left.
_GONE = "<gone>"


class Placement:
    """The cluster's embedding workers as one job sees them, and the job's tasks on each.

    A key of None stands for "any embedding worker", when tasks are not pinned (see
    :meth:`refresh`).
    """

    def __init__(self, client, embedder: EmbedderSpec):
        self.client = client
        self._configured = embedder
        self.remote = embedder.model.remote is not None
        self._remote_workers: list[str] | None = None
        self.resources = None if self.remote else embed_resources(client)
        self.embedder = self._with_threads(embedder)
        self.workers: list[str] = []
        self.assigned: dict[str | None, int] = {}
        self._assigned_to: dict[int, str | None] = {}
        self._last_given: dict[str | None, int] = {}
        self._given = itertools.count()
        self._seen = 0.0
        # A cluster with no worker yet (scaling up from zero) leaves the job's resources and
        # torch threads unresolved: they are resolved from the first workers that join.
        self._unresolved: bool | None = None  # decided by the first look at the cluster
        self.refresh()

    def _with_threads(self, embedder: EmbedderSpec) -> EmbedderSpec:
        if self._configured.threads is not None or self.remote:
            return embedder
        return dataclasses.replace(embedder, threads=worker_threads(self.client, self.resources))

    def refresh(self) -> None:
        """Follow the cluster's embedding workers as they come and go (adaptive clusters).

        Tasks are pinned only when every worker may embed: a loose pin lets Dask run a task on
        another worker when its own is gone or paused, which must never send a GPU task to a
        CPU worker. Otherwise the scheduler places them (key None), two per embedding worker.
        """
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        if self._unresolved is None:
            self._unresolved = not workers
        if self._unresolved and workers:
            self.resources = None if self.remote else embed_resources(self.client)
            self.embedder = self._with_threads(self._configured)
            self._unresolved = False
        eligible = self._remote_eligible(workers) if self.remote else embed_workers(self.client, self.resources,
                                                                                     workers=workers)
        current = set(eligible) if eligible and (self.remote or len(eligible) == len(workers)) else {None}
        gone = set(self.assigned) - current
        self.assigned = {w: self.assigned.get(w, 0) for w in current}
        for slot, worker in self._assigned_to.items():
            if worker in gone:
                self._assigned_to[slot] = _GONE  # finishing elsewhere now: frees no slot of a current worker
        self.workers = eligible
        self._seen = time.monotonic()

    def _remote_eligible(self, workers: dict[str, dict]) -> list[str]:
        if self._remote_workers is None and workers:
            cpu = sorted(a for a, w in workers.items() if not (w.get("resources") or {}).get("GPU"))
            self._remote_workers = cpu or sorted(workers)
            self.embedder = dataclasses.replace(self.embedder, rate_share=1.0 / len(self._remote_workers))
        return [a for a in self._remote_workers or () if a in workers]

    def refresh_if_stale(self) -> None:
        if time.monotonic() - self._seen > WORKERS_REFRESH_SECONDS:
            self.refresh()

    def next_worker(self) -> tuple[bool, str | None]:
        """``(True, worker)`` for the worker to give the next task (None: let Dask place it),
        or ``(False, None)`` when every embedding worker has its tasks.

        Fewest unfinished tasks first; on a tie, the worker given one longest ago.
        """
        worker = min(self.assigned, key=lambda w: (self.assigned[w], self._last_given.get(w, -1)))
        capacity = TASKS_PER_EMBED_WORKER * (1 if worker is not None else max(1, len(self.workers)))
        return (self.assigned[worker] < capacity), worker

    def assign(self, slot: int, worker: str | None) -> None:
        self.assigned[worker] += 1
        self._assigned_to[slot] = worker
        self._last_given[worker] = next(self._given)

    def release(self, slot: int) -> None:
        worker = self._assigned_to.pop(slot)
        if worker in self.assigned:  # not a worker that has left since
            self.assigned[worker] -= 1

    def submit_options(self, worker: str | None) -> dict:
        return dict(resources=self.resources, workers=[worker] if worker else None, allow_other_workers=bool(worker))

    def preload(self, *, priority: int = 0) -> "Preload":
        """Start loading the model on every worker that will embed, and return at once.

        Importing torch and sentence-transformers and loading the weights takes seconds on a
        fresh worker; started when a job starts, it overlaps with opening the sink, reading and
        chunking instead of delaying the first embedding partition. The tasks take no resource
        slot (they only fill the cache the embed tasks then find warm) and are pinned one per
        eligible worker. Errors surface in the embed tasks (or in :meth:`Preload.precision`). A
        remote model has nothing to load.
        """
        if self.remote:
            return Preload(spec=self.embedder, futures=[])
        token = uuid.uuid4().hex[:8]
        futures = [
            self.client.submit(_preload_task, self.embedder, key=f"preload-model-{token}-{i}", workers=[address],
                               allow_other_workers=False, priority=priority, pure=False)
            for i, address in enumerate(embed_workers(self.client, self.resources))
        ]
        return Preload(spec=self.embedder, futures=futures)


@dataclasses.dataclass
class Preload:
    """Models being loaded on the embedding workers ahead of the embed stage (:meth:`Placement.preload`)."""

    spec: EmbedderSpec
    futures: list[Any]

    def precision(self) -> str:
        """The precision the workers embed at: the spec's, or for ``auto`` what a worker resolved.

        Only ``auto`` waits (for one worker's load); it raises what the load raised.
        """
        if self.spec.quantize:
            return self.spec.quantize
        if self.spec.precision != "auto":
            return self.spec.precision
        if self.spec.backend in ("onnx", "openvino"):
            return "fp32"
        if not self.futures:
            return "auto"
        return self.futures[0].result()


def _preload_task(spec: EmbedderSpec) -> str:
    return get_embedder(spec).precision
