"""Per-rank shards, batches, and JPEG decoding in worker processes with prefetch.

Sharding. Every epoch has one permutation of the training set, seeded by (seed, epoch)
and identical on every rank. Step s of the epoch is the global batch
perm[s*G : (s+1)*G] (G = batch_per_rank * world), and rank r takes its r-th slice of
batch_per_rank images. Shards are disjoint, and every rank has exactly
len(train) // G steps per epoch by construction (the tail that does not fill a global
batch is dropped; the next epoch's permutation puts other images there). A position in
training is (epoch, step): resuming there needs nothing but the seed.

Augmentation randomness of image i in epoch e is seeded by (seed, e, i), so the batches
do not depend on the number of workers nor on where a run was resumed.

Workers. With workers > 0, decoding and augmentation run in fresh interpreters started
with subprocess (`python -m engine.loader`), fed pickled tasks on stdin, answering on
stdout; a reader thread per worker drains its answers into a queue, so up to `prefetch`
batches per worker are ready before the step asks. They are not forked from the MPI rank
and their environment is stripped of the launcher's PMI/MPI variables: a worker can
never join, or corrupt, the job's MPI state. They import only engine.data and
engine.transforms.

A file that cannot be read or decoded is reported (its path and the error) and skipped:
in training its slot is filled with another image of the same batch, so batch shapes
stay fixed; in evaluation it is left out of the counts.
"""
from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from engine.data import DataError

# Environment variables by which MPI launchers hand a process its place in a job.
_LAUNCHER_ENV_PREFIXES = ("PMI_", "PMIX_", "MPI_", "MPIR_", "HYDRA_", "OMPI_", "MV2_", "I_MPI_", "SLURM_")


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


def load_batch(dataset, transform, indices, seed: int, epoch: int, fill: bool):
    """(uint8 NHWC images, int64 labels, [(file, error)]) for `indices`.

    Unreadable images are skipped; with fill=True their slots repeat readable images of
    the same batch so the batch keeps its size.
    """
    images, labels, failures = [], [], []
    for i in indices:
        try:
            img = dataset.load(i)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            failures.append((dataset.describe(i), f"{type(e).__name__}: {e}"))
            continue
        images.append(transform(img, sample_rng(seed, epoch, i)))
        labels.append(dataset.labels[i])
    if not images and len(indices):
        names = ", ".join(f for f, _ in failures[:3])
        raise DataError(f"every image of a batch is unreadable ({names}, ...)")
    if fill:
        for k in range(len(indices) - len(images)):
            images.append(images[k])
            labels.append(labels[k])
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.int64), failures
    return np.stack(images), np.asarray(labels, np.int64), failures


@dataclass
class Batch:
    images: np.ndarray              # uint8 NHWC
    labels: np.ndarray              # int64
    failures: list = field(default_factory=list)


class _Worker:
    """One decoding process and the thread that drains its answers."""

    def __init__(self, wid: int, setup: bytes):
        env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV_PREFIXES)}
        env["OMP_NUM_THREADS"] = "1"
        self.wid = wid
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.loader"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.answers: queue.Queue = queue.Queue()
        self.proc.stdin.write(setup)
        self.proc.stdin.flush()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        try:
            while True:
                self.answers.put(pickle.load(self.proc.stdout))
        except (EOFError, OSError, pickle.UnpicklingError):
            self.answers.put(("died", None))

    def submit(self, task) -> None:
        pickle.dump(task, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()

    def result(self):
        status, payload = self.answers.get()
        if status == "ok":
            return payload
        if status == "error":
            raise DataError(payload)
        code = self.proc.wait()
        raise RuntimeError(f"data loader worker {self.wid} died (exit code {code}); see its error above")

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=30)


class Loader:
    """Batches of one data set, decoded in-process (workers=0) or by worker processes.

    `wait_s` accumulates the time the caller spent blocked waiting for a batch.
    `warn(message)` is called once per unreadable file.
    """

    def __init__(self, dataset, train_transform, val_transform, *, seed: int, workers: int = 0,
                 prefetch: int = 2, warn=None):
        if workers < 0 or prefetch < 1:
            raise ValueError("--workers must be >= 0 and prefetch >= 1")
        self.dataset, self.seed, self.prefetch = dataset, seed, prefetch
        self.transforms = {"train": train_transform, "val": val_transform}
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.wait_s = 0.0
        self._reported: set = set()
        setup = pickle.dumps((dataset, self.transforms, seed), protocol=pickle.HIGHEST_PROTOCOL)
        self.workers = [_Worker(k, setup) for k in range(workers)]

    def train_batches(self, sampler: ShardSampler, epoch: int, start_step: int = 0):
        """Yields (step, Batch) for steps start_step.. of `epoch` on this rank."""
        steps = range(start_step, sampler.steps_per_epoch)
        tasks = (("train", sampler.indices(epoch, s), epoch, True) for s in steps)
        return zip(steps, self._run(tasks))

    def eval_batches(self, indices: np.ndarray, batch: int):
        """Yields Batch objects covering `indices` once, in chunks of `batch`."""
        chunks = (indices[k:k + batch] for k in range(0, len(indices), batch))
        return self._run(("val", c, 0, False) for c in chunks)

    def _run(self, tasks):
        if not self.workers:
            for kind, idx, epoch, fill in tasks:
                t0 = time.perf_counter()
                batch = Batch(*load_batch(self.dataset, self.transforms[kind], idx, self.seed, epoch, fill))
                self.wait_s += time.perf_counter() - t0
                yield self._report(batch)
            return
        inflight: deque = deque()
        tasks = iter(tasks)
        turn = 0
        try:
            while True:
                while len(inflight) < self.prefetch * len(self.workers):
                    task = next(tasks, None)
                    if task is None:
                        break
                    worker = self.workers[turn % len(self.workers)]
                    worker.submit(task)
                    inflight.append(worker)
                    turn += 1
                if not inflight:
                    return
                t0 = time.perf_counter()
                batch = Batch(*inflight.popleft().result())
                self.wait_s += time.perf_counter() - t0
                yield self._report(batch)
        finally:
            # Abandoned part-way (end of training, an error): drain what is still in
            # flight so the next pass starts with empty queues.
            while inflight:
                try:
                    inflight.popleft().result()
                except (DataError, RuntimeError):
                    pass

    def _report(self, batch: Batch) -> Batch:
        for name, err in batch.failures:
            if name not in self._reported:
                self._reported.add(name)
                self.warn(f"skipping unreadable image {name}: {err}")
        return batch

    def close(self):
        for w in self.workers:
            w.close()
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _worker_main():
    """A decoding process: setup, then tasks on stdin, answers on stdout, until EOF."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed must not corrupt the answer stream
    dataset, transforms, seed = pickle.load(stdin)
    while True:
        try:
            kind, idx, epoch, fill = pickle.load(stdin)
        except EOFError:
            return
        try:
            answer = ("ok", load_batch(dataset, transforms[kind], idx, seed, epoch, fill))
        except DataError as e:
            answer = ("error", str(e))
        pickle.dump(answer, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    _worker_main()
