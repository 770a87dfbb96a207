"""Batching of concurrent predict requests: those that arrive together share one Predictor call.

A request puts its decoded image on an asyncio queue and awaits a future. One worker task takes the first waiting
request, then whatever else arrives within ``max_wait_ms`` (or is already queued) up to ``max_batch_size``, and runs
one ``Predictor.predict_tasks`` call for them in the single model thread. The Predictor batches only images that pad
to the same size, so a result never depends on its batch-mates. While a batch runs, new requests queue up and form
the next batch, so under load batches fill without waiting.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..inference.predictor import Predictor

__all__ = ["BatchingPredictor", "BatchResult"]


@dataclass
class BatchResult:
    """One request's result, the wall time of the forward pass that produced it and how many images it carried."""

    result: Any
    inference_ms: float
    batch_size: int


@dataclass
class _Job:
    image: torch.Tensor
    task: str
    future: asyncio.Future


class BatchingPredictor:
    """Answers ``await predict(image, task)`` calls with batched Predictor calls (start/stop on the serving loop)."""

    def __init__(self, predictor: Predictor, max_batch_size: int | None = None, max_wait_ms: float = 5.0) -> None:
        max_batch_size = predictor.batch_size if max_batch_size is None else int(max_batch_size)
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_wait_ms >= 0, got {max_batch_size}, {max_wait_ms}")
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: list[_Job] = []

    async def start(self) -> None:
        """Start the worker on the running event loop (idempotent)."""
        if self._worker is not None:
            return
        self._queue = asyncio.Queue()
        # One thread owns the model: a single forward pass at a time keeps peak memory to one batch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mask2former-model")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="mask2former-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still queued get a RuntimeError."""
        if self._worker is None:
            return
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        pending = list(self._in_flight)
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._executor.shutdown(wait=True)
        self._worker = self._queue = self._executor = None

    async def predict(self, image: torch.Tensor, task: str) -> BatchResult:
        """The result for one image (what ``Predictor(task=task)(image)`` gives), computed in a shared batch."""
        if self._queue is None:
            raise RuntimeError("BatchingPredictor.start() has not been awaited on this event loop")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(image, task, future))
        return await future

    async def _collect(self) -> list[_Job]:
        jobs = self._in_flight = [await self._queue.get()]  # in flight from here on: stop() answers them
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch_size:
            try:
                jobs.append(self._queue.get_nowait())  # already waiting: take it without delay
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        # A client that went away (its future cancelled) is not worth a forward pass.
        return [job for job in jobs if not job.future.done()]

    def _forward(self, jobs: list[_Job]) -> tuple[list[Any], float]:
        tasks = tuple(dict.fromkeys(job.task for job in jobs))  # every task asked for, in arrival order
        start = time.perf_counter()
        results = self.predictor.predict_tasks([job.image for job in jobs], tasks)
        return [result[job.task] for job, result in zip(jobs, results)], (time.perf_counter() - start) * 1000.0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._in_flight = jobs = await self._collect()
            if not jobs:
                continue
            try:
                results, inference_ms = await loop.run_in_executor(self._executor, self._forward, jobs)
            except Exception as error:  # every request in the batch gets the error; the worker goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                self._in_flight = []
                continue
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(BatchResult(result, inference_ms, len(jobs)))
            self._in_flight = []
