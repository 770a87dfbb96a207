"""The threads behind ``predict_files``: images decoded ahead in worker threads, batched by the size they run
at, and worker tasks kept off the cores while the model runs on them."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..data.image_io import one_line, read_image
from ..inference.predictor import Predictor

__all__ = ["Buckets", "Decoded", "Gate", "decoded_images", "single_threaded_torch"]


@dataclass
class Decoded:
    """One input file after decoding: the image as read, its size and the image the model gets (resized by
    ``min_size`` / ``max_size``), or the one-line ``error`` that made it unreadable."""

    index: int
    image: Tensor | None = None
    original_size: tuple[int, int] = (0, 0)
    prepared: Tensor | None = None
    error: str | None = None


def single_threaded_torch() -> None:
    """Thread-pool initializer: torch ops in this worker run on this thread alone. The model's forward keeps the
    cores busy; an OpenMP team per worker thread (libgomp gives each calling thread its own) would only add
    threads that spin and stall the forward's. OpenMP's thread count is per calling thread; ``torch.set_num_threads``
    would change the main thread's too."""
    torch.get_num_threads()  # torch sets the calling thread's OpenMP count on first use: let it do so first
    set_num_threads = _omp_set_num_threads()
    if set_num_threads is not None:
        set_num_threads(1)


@functools.lru_cache(maxsize=1)
def _omp_set_num_threads() -> Callable[[int], Any] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded (None where it cannot be found: no change)."""
    try:
        with open("/proc/self/maps") as maps:
            libraries = {line.split()[-1] for line in maps if line.rstrip().endswith((".so", ".so.1", ".so.5"))}
        path = next(name for name in sorted(libraries) if Path(name).name.startswith(("libgomp", "libiomp", "libomp")))
        return ctypes.CDLL(path).omp_set_num_threads
    except (OSError, StopIteration, AttributeError):
        return None


class Gate:
    """Worker tasks run only while the model does not. On a CPU the forward's OpenMP threads use every core, and a
    worker that preempts one of them stalls the others at the next barrier (they spin), which costs more than the
    worker's own work: closing the gate waits for running tasks and holds new ones until the forward is done.
    Side by side on 2 cores (predict --no-overlays / bare forward, images/s) it won three runs of four: 0.832 vs
    0.783, 0.844 vs 0.822, 0.880 vs 0.876, and 0.945 vs 0.986. Disabled for CUDA models, whose forward leaves the
    CPU free."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._condition = threading.Condition()
        self._running = 0
        self._closed = False

    @contextlib.contextmanager
    def closed(self):
        if not self.enabled:
            yield
            return
        with self._condition:
            self._closed = True
            self._condition.wait_for(lambda: self._running == 0)
        try:
            yield
        finally:
            with self._condition:
                self._closed = False
                self._condition.notify_all()

    def after(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` once the gate is open."""
        with self._condition:
            self._condition.wait_for(lambda: not self._closed)
            self._running += 1
        try:
            return function(*args)
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify_all()


class Buckets:
    """Images waiting for a batch, keyed by the padded size they go into the model with: a batch holds one size,
    so no image is padded for a batch-mate (batched results equal single-image results)."""

    def __init__(self, predictor: Predictor, batch_size: int, run: Callable[[list[Decoded]], None]) -> None:
        self.predictor, self.batch_size, self.run = predictor, batch_size, run
        self.buckets: dict[tuple[int, int], list[Decoded]] = {}
        self.waiting = 0

    def add(self, item: Decoded) -> None:
        key = self.predictor.batch_key(item.prepared)
        bucket = self.buckets.setdefault(key, [])
        bucket.append(item)
        self.waiting += 1
        if len(bucket) >= self.batch_size:
            self._run(key)
        elif self.waiting > 4 * self.batch_size:
            # Many sizes, few of each: run the fullest bucket rather than hold images without bound.
            self._run(max(self.buckets, key=lambda k: len(self.buckets[k])))

    def _run(self, key: tuple[int, int]) -> None:
        batch = self.buckets.pop(key)
        self.waiting -= len(batch)
        self.run(batch)

    def flush(self) -> None:
        for key in list(self.buckets):
            self._run(key)


def decoded_images(todo: list[int], paths: list[Path], predictor: Predictor, pool: ThreadPoolExecutor, gate: Gate,
                   prefetch: int):
    """A ``Decoded`` per index of ``todo``, in order, decoded and prepared ``prefetch`` ahead."""

    def decode(index: int) -> Decoded:
        try:
            image = read_image(paths[index])
        except (OSError, ValueError) as error:  # missing, unreadable, not an image, truncated, corrupt
            return Decoded(index, error=one_line(error))
        original_size, prepared = predictor.prepare(image, str(paths[index]))
        return Decoded(index, image, original_size, prepared)

    pending: deque[tuple[int, Future]] = deque()
    upcoming = iter(todo)
    for index in upcoming:
        pending.append((index, pool.submit(gate.after, decode, index)))
        if len(pending) >= prefetch:
            break
    while pending:
        index, future = pending.popleft()
        following = next(upcoming, None)
        if following is not None:
            pending.append((following, pool.submit(gate.after, decode, following)))
        yield future.result()
