"""Per-rank shards, batches, and image decoding in worker processes with prefetch.

Sharding. Every epoch has one permutation of the training set, seeded by (seed, epoch)
and identical on every rank. Step s of the epoch is the global batch
perm[s*G : (s+1)*G] (G = batch_per_rank * world), and rank r takes its r-th slice of
batch_per_rank images. Shards are disjoint, and every rank has exactly
len(train) // G steps per epoch by construction (the tail that does not fill a global
batch is dropped; the next epoch's permutation puts other images there). A position in
training is (epoch, step): resuming there needs nothing but the seed.

Augmentation randomness of image i in epoch e is seeded by (seed, e, i), so the batches
do not depend on the number of workers nor on where a run was resumed.

Workers. With workers > 0, one pool of worker processes per rank decodes and augments
both splits (training and validation tasks name their split). Workers are fresh
interpreters started with subprocess (`python -m engine.loader`), never forked from the
MPI rank, their environment stripped of the launcher's PMI/MPI variables: a worker can
never join, or corrupt, the job's MPI state. They import only engine.data and
engine.transforms. Each worker shares an anonymous memory file with its rank (a ring of
batch-sized regions): a task names the indices and the region, the worker writes the
pixels there, and only the labels and the names of unreadable files come back through
its stdout, so no batch of pixels is ever pickled. Up to `prefetch` batches per worker
per pass are in flight before the step asks for them.

A worker killed by a signal (the out-of-memory killer, a stray kill) is replaced once per
task, with one warning naming the signal, and its unfinished tasks are handed to the new
worker: batches depend only on the seed, the epoch and the indices, so nothing is lost. A
worker that exits by itself, or dies again on the same task, raises WorkerDied.

A file that cannot be read or decoded is reported (its path and the error) and skipped:
in training its slot is filled with another image of the same batch, so batch shapes
stay fixed; in evaluation it is left out of the counts.
"""
from __future__ import annotations

import mmap
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from engine.data import DataError
from engine.errors import EngineError

# Environment variables by which MPI launchers hand a process its place in a job.
_LAUNCHER_ENV_PREFIXES = ("PMI_", "PMIX_", "MPI_", "MPIR_", "HYDRA_", "OMPI_", "MV2_", "I_MPI_", "SLURM_")
_REGION_ALIGN = 4096        # ring regions start on page boundaries
# Sources larger than this are named once per process (stderr): an 8000x8000 JPEG stalled
# its step by 2.8 s (issue 20), decoded in full for a 224 px crop.
LARGE_IMAGE_PIXELS = 40_000_000
_named_large: set = set()


class WorkerDied(EngineError):
    """A data-loader worker process is gone (crashed, or killed again after a restart): the
    rank cannot get its batches. The message names its exit status or signal."""


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng((seed, epoch, int(index)))


class ShardSampler:
    """Which images rank `rank` trains on at (epoch, step)."""

    def __init__(self, n: int, rank: int, world: int, batch_per_rank: int, seed: int):
        self.n, self.rank, self.world = n, rank, world
        self.batch, self.seed = batch_per_rank, seed
        self.global_batch = batch_per_rank * world
        if self.global_batch > n:
            raise DataError(f"the global batch ({batch_per_rank} per rank x {world} ranks = "
                            f"{self.global_batch}) is larger than the training set ({n} images); "
                            f"lower --batch-per-rank")
        self.steps_per_epoch = n // self.global_batch
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, epoch: int, step: int) -> np.ndarray:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside the epoch's {self.steps_per_epoch} steps")
        start = step * self.global_batch + self.rank * self.batch
        return self.permutation(epoch)[start:start + self.batch]


def eval_shard(n: int, rank: int, world: int) -> np.ndarray:
    """Contiguous, disjoint shards covering all n images; sizes differ by at most one."""
    return np.arange(rank * n // world, (rank + 1) * n // world)


def load_batch(dataset, transform, indices, seed: int, epoch: int, fill: bool, out=None):
    """(uint8 NHWC images, int64 labels, [(file, error)]) for `indices`.

    The images are written into `out`, a (len(indices), *transform.output_shape) uint8
    array (a fresh one if None), and returned as its first rows. Unreadable images are
    skipped; with fill=True their slots repeat readable images of the same batch so the
    batch keeps its size.
    """
    if out is None:
        out = np.empty((len(indices),) + transform.output_shape, np.uint8)
    labels, failures = [], []
    for i in indices:
        try:
            with dataset.open(i) as src:
                size, t0 = getattr(src, "size", None), time.perf_counter()   # before a draft() shrinks it
                img = transform(src, sample_rng(seed, epoch, i))
                _name_if_large(dataset.describe(i), size, time.perf_counter() - t0)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            failures.append((dataset.describe(i), f"{type(e).__name__}: {e}"))
            continue
        out[len(labels)] = img
        labels.append(dataset.labels[i])
    readable = len(labels)
    if not readable and len(indices):
        names = ", ".join(f for f, _ in failures[:3])
        raise DataError(f"every image of a batch is unreadable ({names}, ...)")
    if fill:
        for k in range(len(indices) - readable):
            out[readable + k] = out[k]
            labels.append(labels[k])
    return out[:len(labels)], np.asarray(labels, np.int64), failures


def _name_if_large(name: str, size, seconds: float) -> None:
    """One line on stderr the first time this process decodes a source of more than
    LARGE_IMAGE_PIXELS: it slows every step that meets it, and nothing else would say why."""
    if isinstance(size, tuple) and size[0] * size[1] > LARGE_IMAGE_PIXELS and name not in _named_large:
        _named_large.add(name)
        print(f"engine.loader: {name} is {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.0f} MP): decoding it took "
              f"{seconds:.2f} s of its batch; shrink such images in the data set (each is named once)",
              file=sys.stderr, flush=True)


@dataclass
class Batch:
    images: np.ndarray              # uint8 NHWC
    labels: np.ndarray              # int64
    failures: list = field(default_factory=list)


def _anonymous_file() -> int:
    """A file descriptor of memory with no name to leak (memfd; else an unlinked temp file)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("engine-loader-ring")
    fd, path = tempfile.mkstemp(prefix="engine-loader-ring-")
    os.unlink(path)
    return fd


class _Ring:
    """The rank's side of one worker's shared memory: regions of one anonymous file.

    A task takes a free region large enough for its batch; the region is free again once
    the rank has copied the batch out. When none fits, the file grows by a new region
    (the worker maps the new size when a task names it), so the ring ends up as large as
    the number of batches in flight at once (both splits' passes), and then stays.
    """

    def __init__(self):
        self.fd = _anonymous_file()
        self.size = 0
        self.map = None
        self.free: list = []        # (offset, capacity)

    def acquire(self, nbytes: int) -> tuple:
        for k, (_, capacity) in enumerate(self.free):
            if capacity >= nbytes:
                return self.free.pop(k)
        capacity = max(_REGION_ALIGN, -(-nbytes // _REGION_ALIGN) * _REGION_ALIGN)
        region = (self.size, capacity)
        self.size += capacity
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)   # the old map closes with its last view
        return region

    def release(self, region: tuple) -> None:
        self.free.append(region)

    def copy_out(self, offset: int, shape: tuple) -> np.ndarray:
        return np.ndarray(shape, np.uint8, buffer=self.map, offset=offset).copy()

    def close(self) -> None:
        self.map = None
        os.close(self.fd)


class _Worker:
    """One decoding process: its pipes, its ring, and how many of its tasks are uncollected."""

    def __init__(self, wid: int, setup: bytes):
        env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV_PREFIXES)}
        env["OMP_NUM_THREADS"] = "1"
        self.wid, self.pending = wid, 0
        self.ring = _Ring()
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.loader", str(self.ring.fd)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(self.ring.fd,))
        self.proc.stdin.write(setup)
        self.proc.stdin.flush()

    def send(self, task) -> None:
        try:
            pickle.dump(task, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except OSError:             # BrokenPipeError: it is gone
            raise self._died() from None
        self.pending += 1

    def receive(self) -> tuple:
        try:
            return pickle.load(self.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._died() from None

    def _died(self) -> "WorkerDied":
        code = self.proc.wait()
        error = WorkerDied(f"data loader worker {self.wid} died (exit code {code}{self.cause(code)})")
        error.signal = -code if code < 0 else 0
        return error

    @staticmethod
    def cause(code: int) -> str:
        """What an exit status says: a signal by name, or where the worker's own error is."""
        if code >= 0:
            return "; its error, if it printed one, is above"
        try:
            name = signal.Signals(-code).name
        except ValueError:          # a real-time signal has no name
            name = f"signal {-code}"
        return f": killed by {name}" + ("; out of memory? see `dmesg`" if -code == signal.SIGKILL else "")

    def close(self):
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self.proc.wait(timeout=30)
        self.ring.close()


@dataclass
class _Ticket:
    """A task handed to a worker, until its batch is collected (handed again to the
    worker that replaces a killed one)."""
    task_id: int
    worker: _Worker
    region: tuple
    shape: tuple                    # of the full batch; fewer rows come back if files fail
    task: tuple                     # (kind, indices, epoch, fill)
    retried: bool = False


class Loader:
    """Batches of a training and a validation set, decoded in-process (workers=0) or by one
    pool of worker processes serving both.

    `val_dataset` (default: `dataset`) is what `eval_batches` indexes. `wait_s`
    accumulates the time the caller spent blocked waiting for a batch. `warn(message)` is
    called once per unreadable file.
    """

    def __init__(self, dataset, train_transform, val_transform, *, seed: int, workers: int = 0,
                 prefetch: int = 2, warn=None, val_dataset=None):
        if workers < 0 or prefetch < 1:
            raise ValueError("--workers must be >= 0 and prefetch >= 1")
        self.splits = {"train": (dataset, train_transform),
                       "val": (dataset if val_dataset is None else val_dataset, val_transform)}
        self.seed, self.prefetch = seed, prefetch
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.wait_s = 0.0
        self._reported: set = set()
        self._answers: dict = {}    # task id -> answer read while waiting for an earlier task
        self._next_task = 0
        self._setup = pickle.dumps((self.splits, seed), protocol=pickle.HIGHEST_PROTOCOL)
        self.workers = [_Worker(k, self._setup) for k in range(workers)]
        self._uncollected: list = []    # tickets handed out and not yet collected
        self._retired: list = []        # killed workers, whose rings may hold answers still

    def train_batches(self, sampler: ShardSampler, epoch: int, start_step: int = 0):
        """Yields (step, Batch) for steps start_step.. of `epoch` on this rank."""
        steps = range(start_step, sampler.steps_per_epoch)
        tasks = (("train", sampler.indices(epoch, s), epoch, True) for s in steps)
        return zip(steps, self._run(tasks))

    def eval_batches(self, indices: np.ndarray, batch: int):
        """Yields Batch objects covering `indices` of the validation set once, in chunks of `batch`."""
        chunks = (indices[k:k + batch] for k in range(0, len(indices), batch))
        return self._run(("val", c, 0, False) for c in chunks)

    def _run(self, tasks):
        if not self.workers:
            for kind, idx, epoch, fill in tasks:
                t0 = time.perf_counter()
                batch = Batch(*load_batch(*self.splits[kind], idx, self.seed, epoch, fill))
                self.wait_s += time.perf_counter() - t0
                yield self._report(batch)
            return
        inflight: deque = deque()
        tasks = iter(tasks)
        try:
            while True:
                while len(inflight) < self.prefetch * len(self.workers):
                    task = next(tasks, None)
                    if task is None:
                        break
                    inflight.append(self._submit(*task))
                if not inflight:
                    return
                t0 = time.perf_counter()
                batch = self._collect(inflight.popleft())
                self.wait_s += time.perf_counter() - t0
                yield self._report(batch)
        finally:
            # Abandoned part-way (end of training, an error): collect what is still in
            # flight so its regions are free and no stray answer is left for later.
            while inflight:
                try:
                    self._collect(inflight.popleft())
                except (DataError, RuntimeError):
                    pass

    def _submit(self, kind: str, idx, epoch: int, fill: bool) -> _Ticket:
        """Hands the task to the worker with the fewest uncollected tasks."""
        worker = min(self.workers, key=lambda w: w.pending)
        shape = (len(idx),) + self.splits[kind][1].output_shape
        ticket = _Ticket(-1, worker, (0, 0), shape, (kind, np.asarray(idx), epoch, fill))
        try:
            self._hand(ticket, worker)
        except WorkerDied as died:      # it was gone before this task reached it
            if not died.signal:
                raise
            self._hand(ticket, self._replace(worker, died))
        self._uncollected.append(ticket)
        return ticket

    def _hand(self, ticket: _Ticket, worker: _Worker) -> None:
        kind, idx, epoch, fill = ticket.task
        ticket.worker, ticket.task_id = worker, self._next_task
        ticket.region = worker.ring.acquire(int(np.prod(ticket.shape)))
        self._next_task += 1
        worker.send((ticket.task_id, kind, idx, epoch, fill, ticket.region[0], worker.ring.size))

    def _collect(self, ticket: _Ticket) -> Batch:
        """Waits for the ticket's answer (stashing the worker's answers to other passes' tasks)."""
        while True:
            worker = ticket.worker
            try:
                while ticket.task_id not in self._answers:
                    task_id, status, payload = worker.receive()
                    self._answers[task_id] = (status, payload)
            except WorkerDied as died:
                if not died.signal or ticket.retried:
                    self._uncollected.remove(ticket)
                    raise
                self._replace(worker, died)
                continue
            self._uncollected.remove(ticket)
            worker.pending -= 1
            worker.ring.release(ticket.region)
            status, payload = self._answers.pop(ticket.task_id)
            if status == "error":
                raise DataError(payload)
            count, labels, failures = payload
            return Batch(worker.ring.copy_out(ticket.region[0], (count,) + ticket.shape[1:]), labels, failures)

    def _replace(self, dead: _Worker, died: WorkerDied) -> _Worker:
        """A new worker in the killed one's place, given every task the dead one had not
        answered. Its ring stays mapped until close(): the answers it sent before dying
        are collected from there."""
        fresh = _Worker(dead.wid, self._setup)
        self.workers[self.workers.index(dead)] = fresh
        self._retired.append(dead)
        self.warn(f"{died}: started a new one, which redoes its unfinished batches")
        for ticket in self._uncollected:
            if ticket.worker is dead and ticket.task_id not in self._answers:
                ticket.retried = True
                self._hand(ticket, fresh)
        return fresh

    def _report(self, batch: Batch) -> Batch:
        for name, err in batch.failures:
            if name not in self._reported:
                self._reported.add(name)
                self.warn(f"skipping unreadable image {name}: {err}")
        return batch

    def close(self):
        """Stops the workers; safe to call more than once."""
        for w in self.workers + self._retired:
            w.close()
        self.workers, self._retired = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _serve(splits, seed: int, ring, task) -> tuple:
    """One task in a worker: its batch written into the ring, (task id, status, payload) returned."""
    task_id, kind, idx, epoch, fill, offset, _ = task
    dataset, transform = splits[kind]
    out = np.ndarray((len(idx),) + transform.output_shape, np.uint8, buffer=ring, offset=offset)
    try:
        images, labels, failures = load_batch(dataset, transform, idx, seed, epoch, fill, out)
    except DataError as e:
        return task_id, "error", str(e)
    return task_id, "ok", (len(images), labels, failures)


def _worker_main(ring_fd: int):
    """A decoding process: setup, then tasks on stdin, answers on stdout, until EOF."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed must not corrupt the answer stream
    splits, seed = pickle.load(stdin)
    ring, mapped = None, 0
    while True:
        try:
            task = pickle.load(stdin)
        except EOFError:
            return
        ring_size = task[-1]
        if ring_size > mapped:      # the rank grew the ring since the last task
            ring, mapped = mmap.mmap(ring_fd, ring_size), ring_size
        pickle.dump(_serve(splits, seed, ring, task), stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("engine.loader is not a command: engine.train starts it as a data-loader worker "
                 "(python -m engine.loader FD)")
    _worker_main(int(sys.argv[1]))
