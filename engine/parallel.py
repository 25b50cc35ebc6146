"""Intra-op threads on the CPU: one operation's rows split over a few threads.

NumPy's BLAS puts every core on a GEMM, but the work between GEMMs (batch norm, the
im2col gathers, residual add + ReLU, max pool) would run on one core: a quarter of a
ResNet-50 step at 224 px. A Team splits such an operation's leading axis into contiguous
chunks, runs the last chunk on the calling thread and the others on its workers, and
returns when all are done. The work in a chunk must release the GIL to run in parallel:
NumPy's copies and ufuncs do, and so do engine.hostmath's loops.

Workers wait on a lock: they sleep between operations and take no core from the BLAS.
The BLAS's own workers are the other way round: OpenBLAS's spin for a while after each
GEMM, on the cores a Team wants next, unless OPENBLAS_THREAD_TIMEOUT is small: the job
(python -m engine.train) and the benchmarks set it before NumPy loads.
"""
from __future__ import annotations

import threading

# Below this many elements an operation runs on one thread: a map costs ~65 us more than
# a plain call, and two threads gain nothing on data that fits in a core's cache (a 2 MB
# copy took longer on two).
MIN_SPLIT = 1 << 19


class _Worker:
    """One daemon thread that runs one chunk at a time. The handoff is two bare locks
    (released by the other thread, as threading.Lock allows): a futex wake each way;
    a map costs ~65 us over a plain call, against 85 us through concurrent.futures."""

    def __init__(self, name):
        self._go, self._done = threading.Lock(), threading.Lock()
        self._go.acquire()
        self._done.acquire()
        self._task = self._outcome = None
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self):
        while True:
            self._go.acquire()
            fn, lo, hi = self._task
            try:
                self._outcome = (fn(lo, hi), None)
            except BaseException as e:      # handed to the caller, raised there
                self._outcome = (None, e)
            self._done.release()

    def start(self, fn, lo, hi):
        self._task = (fn, lo, hi)
        self._go.release()

    def join(self):
        """(result, exception) of the chunk given to start()."""
        self._done.acquire()
        outcome, self._task, self._outcome = self._outcome, None, None
        return outcome


class Team:
    """`threads` threads (the caller and threads-1 workers); operations smaller than
    `min_split` elements run on the caller alone. One thread at a time calls map (the
    model's, in the training loop), and a chunk never calls map itself."""

    def __init__(self, threads: int = 1, min_split: int = MIN_SPLIT):
        if threads < 1:
            raise ValueError(f"a Team needs at least one thread, got {threads}")
        self.threads, self.min_split = threads, min_split
        self._workers = [_Worker(f"team-{i}") for i in range(1, threads)]

    def chunks(self, n: int, grain: int = 1, size: int | None = None) -> list[tuple[int, int]]:
        """[lo, hi) bounds that cover range(n), one per thread at most, inner bounds at
        multiples of `grain`; a single chunk when the operation touches fewer than
        min_split elements (`size`, default n) or there is too little to split."""
        size = n if size is None else size
        parts = min(self.threads, -(-n // grain)) if size >= self.min_split else 1
        if parts <= 1:
            return [(0, n)]
        step = -(-n // (parts * grain)) * grain
        bounds = list(range(0, n, step)) + [n]
        return list(zip(bounds, bounds[1:]))

    def map(self, fn, n: int, grain: int = 1, size: int | None = None) -> list:
        """[fn(lo, hi) for each chunk], the chunks run at once. An exception in any chunk
        is raised here, after every chunk has finished (none is left writing)."""
        bounds = self.chunks(n, grain, size)
        if len(bounds) == 1:
            return [fn(*bounds[0])]
        workers = self._workers[:len(bounds) - 1]
        for worker, (lo, hi) in zip(workers, bounds):
            worker.start(fn, lo, hi)
        try:
            last = fn(*bounds[-1])
        finally:
            outcomes = [worker.join() for worker in workers]
        for _, error in outcomes:
            if error is not None:
                raise error
        return [result for result, _ in outcomes] + [last]


SERIAL = Team(1)


def blas_threads() -> int:
    """The thread count NumPy's BLAS runs GEMMs with: the default size of a CPU Team."""
    from threadpoolctl import threadpool_info
    counts = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
    return max(counts, default=1)
