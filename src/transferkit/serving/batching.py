"""Dynamic batching: concurrent requests' images joined into one call of the model.

Requests wait in a queue; one task takes the first, gathers whatever else arrives within
``max_wait_s`` (up to ``max_batch`` images), and runs the model once on all of them in a worker
thread, so the event loop keeps accepting requests meanwhile. Requests that arrive while the model
runs are the next batch: under load, batches fill without waiting. The wait is only spent while
requests come concurrently (the last batch joined several): a lone client is never kept waiting
for company that does not come. With batching off each request is its own batch (still one at a
time: the model is one set of cores either way).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Job(Generic[Item, Result]):
    items: Sequence[Item]
    future: asyncio.Future[list[Result]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class BatchStats:
    """What the batcher has done, for ``/info`` and the load benchmark."""

    batches: int = 0
    requests: int = 0
    images: int = 0
    largest_batch: int = 0

    def record(self, requests: int, images: int) -> None:
        self.batches += 1
        self.requests += requests
        self.images += images
        self.largest_batch = max(self.largest_batch, images)


class Batcher(Generic[Item, Result]):
    """``await batcher.submit(items)`` returns ``run(items)``'s results, computed within a larger batch.

    ``run`` maps a list of items to one result per item, in order; an exception it raises is
    given to every request of that batch.
    """

    def __init__(
        self, run: Callable[[list[Item]], list[Result]], max_batch: int = 32, max_wait_s: float = 0.005,
        enabled: bool = True,
    ) -> None:  # fmt: skip
        self.run, self.max_batch, self.max_wait_s, self.enabled = run, max(1, max_batch), max(0.0, max_wait_s), enabled
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job[Item, Result]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._held: _Job[Item, Result] | None = None  # taken from the queue, not yet run
        self._concurrent = False  # whether the last batch joined several requests: worth waiting for others

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, items: Sequence[Item]) -> list[Result]:
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not awaited")
        job: _Job[Item, Result] = _Job(items)
        await self._queue.put(job)
        return await job.future

    async def _loop(self) -> None:
        assert self._queue is not None
        while True:
            if self._held is None:
                self._held = await self._queue.get()
            jobs = await self._gather()
            items = [item for job in jobs for item in job.items]
            try:
                results = await asyncio.to_thread(self.run, items)
            except Exception as exc:  # the requests of this batch fail; the service goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.stats.record(len(jobs), len(items))
            self._concurrent = len(jobs) > 1
            start = 0
            for job in jobs:
                if not job.future.done():  # a client that went away has a cancelled future
                    job.future.set_result(results[start : start + len(job.items)])
                start += len(job.items)

    async def _gather(self) -> list[_Job[Item, Result]]:
        """The held job and those that join it within the wait, up to ``max_batch`` images.

        A job too big to join is held for the next batch. The wait is one sleep followed by taking
        what is queued (not a timed ``get``, whose cancellation could drop a job on Python 3.10-3.11).
        """
        assert self._queue is not None and self._held is not None
        jobs, self._held = [self._held], None
        size = len(jobs[0].items)
        if not self.enabled:
            return jobs
        for wait in (0.0, self.max_wait_s if self._concurrent else 0.0):
            if wait:
                await asyncio.sleep(wait)
            while size < self.max_batch and not self._queue.empty():
                job = self._queue.get_nowait()
                if size + len(job.items) > self.max_batch:
                    self._held = job
                    return jobs
                jobs.append(job)
                size += len(job.items)
            if size >= self.max_batch:
                break
        return jobs
