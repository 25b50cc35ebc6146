"""Communicators: one interface, MPI on NumPy buffers (CPU ranks), NCCL on CuPy buffers (GPUs).

    comm = create_communicator(backend)          # after get_backend() selected the device
    work = comm.allreduce_async(grads[a:b])       # returns at once
    ...                                           # keep computing
    work.wait()                                   # the slice now holds the sum over ranks

Both implementations keep every collective in the order it was issued, on every rank, so
the same sequence of calls on all ranks never crosses collectives.

- `MpiCommunicator` issues every collective from ONE dedicated thread, on its own duplicate
  of the MPI communicator, so a bucket's all-reduce progresses while the main thread
  computes the next layer's gradients (NumPy releases the GIL in its kernels). The thread
  starts a non-blocking collective and tests it every `poll_s` seconds (default 200 us),
  sleeping in between: a blocking MPICH call busy-polls and takes the core the main
  thread computes on (ResNet-18 on 2 cores, 2 ranks, both kinds interleaved in one run:
  overlapped steps 179-188 ms polling every 200 us, 192-215 ms with blocking waits;
  100-500 us polled alike). poll_s=0 restores blocking waits. MPI has no
  half-precision sum, so FP16 buffers are reduced as reduce-scatter (Alltoallv of 2-byte
  words), a float32 sum of the N contributions rounded once to float16, and Allgatherv.
- `NcclCommunicator` enqueues NCCL calls on a communication stream of the greatest
  priority that first waits on an event recorded on the compute stream; `Work.wait()`
  makes the compute stream wait for the collective, it never blocks the host. Each
  enqueue drops the works already finished, so their CUDA events do not pile up when no
  watchdog polls `progress()`.

Progress counters (`progress()`) let engine.guard find collectives stuck on one rank
because another rank never reached them. `progress()` and `check_async_error()` may be
called from another thread (the watchdog's), which calls `bind_thread()` first.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from abc import ABC, abstractmethod

import numpy as np

from engine.errors import EngineError

OPS = ("sum", "avg")


class CommError(EngineError):
    """A collective failed or was called with an unusable buffer."""


class Work:
    """Handle of one asynchronous collective.

    `seq` numbers the collectives of a communicator from 0; `launched_at`, `started_at`,
    `finished_at` are time.perf_counter() seconds (started/finished: when the collective
    itself ran; None until known)."""

    def __init__(self, seq: int, name: str, count: int):
        self.seq, self.name, self.count = seq, name, count
        self.launched_at = time.perf_counter()
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def wait(self) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError


class Communicator(ABC):
    """rank, size, allreduce_async/allreduce/bcast/barrier/abort, progress()."""

    rank: int
    size: int

    @abstractmethod
    def allreduce_async(self, buf, op: str = "sum") -> Work:
        """Start reducing `buf` in place over all ranks ("sum" or "avg")."""

    def allreduce(self, buf, op: str = "sum"):
        self.allreduce_async(buf, op).wait()
        return buf

    @abstractmethod
    def bcast(self, buf, root: int = 0):
        """Overwrite `buf` on every rank with rank `root`'s `buf`; returns it."""

    @abstractmethod
    def barrier(self) -> None:
        ...

    @abstractmethod
    def abort(self, code: int = 1) -> None:
        """End every process of the job now (a failing rank must not leave others hanging)."""

    @abstractmethod
    def progress(self) -> tuple[int, int, Work | None]:
        """(collectives started, collectives finished, oldest unfinished Work or None)."""

    def bind_thread(self) -> None:
        """Prepare a thread other than the creator's to call progress(): nothing on the CPU."""

    def close(self) -> None:
        pass


def _check_buffer(buf, xp_name: str) -> None:
    if getattr(buf, "dtype", None) not in (np.float32, np.float16):
        raise CommError(f"collective buffers must be float32 or float16 arrays, got "
                        f"{getattr(buf, 'dtype', type(buf).__name__)}")
    if not buf.flags.c_contiguous:
        raise CommError("collective buffers must be contiguous (a slice of the flat buffer)")
    if type(buf).__module__.split(".")[0] != xp_name:
        raise CommError(f"this communicator reduces {xp_name} arrays, got {type(buf).__module__}.{type(buf).__name__}")


def _check_op(op: str) -> None:
    if op not in OPS:
        raise CommError(f"reduction op must be one of {OPS}, got {op!r}")


# ---------------------------------------------------------------------------- MPI ----------

def _chunks(n: int, parts: int):
    """Counts and offsets of `parts` near-equal chunks of n elements."""
    counts = np.full(parts, n // parts, np.int64)
    counts[: n % parts] += 1
    return counts, np.concatenate(([0], np.cumsum(counts)[:-1]))


def complete(req, poll_s: float) -> None:
    """Wait for an MPI request: blocking (MPICH busy-polls a core) when poll_s == 0, else
    test it every poll_s seconds, sleeping (GIL and core free) in between."""
    if poll_s <= 0:
        req.Wait()
        return
    while not req.Test():
        time.sleep(poll_s)


def fp16_allreduce_sum(comm, buf, poll_s: float = 0.0) -> None:
    """In-place sum over `comm` of a float16 NumPy array, with float16 on the wire.

    Rank r gathers chunk r from every rank (Alltoallv), sums the N contributions in float32
    and rounds once, then every rank gathers every summed chunk (Allgatherv): the same
    bytes as a ring all-reduce, one rounding per element, identical bits on every rank.
    (A user-defined MPI op would work too, but MPICH calls it per segment, with the GIL:
    measured 15x slower on ResNet-18's gradients.)"""
    from mpi4py import MPI
    n, size, rank = buf.size, comm.size, comm.rank
    counts, displs = _chunks(n, size)
    words = buf.view(np.uint16)
    mine = np.empty((size, counts[rank]), np.uint16)
    complete(comm.Ialltoallv([words, (counts, displs), MPI.UINT16_T],
                             [mine, (np.full(size, counts[rank]), np.arange(size) * counts[rank]),
                              MPI.UINT16_T]), poll_s)
    total = mine.view(np.float16).sum(axis=0, dtype=np.float32)
    buf[displs[rank]:displs[rank] + counts[rank]] = total
    complete(comm.Iallgatherv(MPI.IN_PLACE, [words, (counts, displs), MPI.UINT16_T]), poll_s)


class MpiWork(Work):
    def __init__(self, seq, name, count):
        super().__init__(seq, name, count)
        self._event = threading.Event()
        self._error: BaseException | None = None

    def wait(self) -> None:
        self._event.wait()
        if self._error is not None:
            raise CommError(f"{self.name} #{self.seq} failed: {self._error!r}") from self._error

    def done(self) -> bool:
        return self._event.is_set()


class MpiCommunicator(Communicator):
    """Collectives on NumPy arrays, issued in order from one communication thread."""

    def __init__(self, mpi_comm=None, poll_s: float = 2e-4):
        from mpi4py import MPI
        self._MPI = MPI
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise CommError("MPI was initialized without MPI_THREAD_MULTIPLE; the communication "
                            "thread needs it (do not set mpi4py.rc.thread_level)")
        world = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.world = world
        self.poll_s = float(poll_s)
        self._comm = world.Dup()           # our collectives never mix with the caller's
        self.rank, self.size = self._comm.rank, self._comm.size
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._started = self._finished = 0
        self._pending: dict[int, MpiWork] = {}
        self._thread = threading.Thread(target=self._serve, name=f"comm-rank{self.rank}", daemon=True)
        self._thread.start()

    # -- the communication thread ------------------------------------------------------
    def _serve(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, fn = item
            with self._lock:
                self._started += 1
            work.started_at = time.perf_counter()
            try:
                fn()
            except BaseException as exc:            # delivered to the waiter, which raises
                work._error = exc
            work.finished_at = time.perf_counter()
            with self._lock:
                self._finished += 1
                self._pending.pop(work.seq, None)
            work._event.set()

    def _submit(self, name: str, count: int, fn) -> MpiWork:
        with self._lock:
            work = MpiWork(next(self._seq), name, count)
            self._pending[work.seq] = work
        self._queue.put((work, fn))
        return work

    # -- collectives ---------------------------------------------------------------------
    def allreduce_async(self, buf, op: str = "sum") -> Work:
        _check_buffer(buf, "numpy")
        _check_op(op)
        MPI, comm, size = self._MPI, self._comm, self.size

        def run():
            if buf.dtype == np.float16:
                fp16_allreduce_sum(comm, buf, self.poll_s)
            else:
                complete(comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM), self.poll_s)
            if op == "avg":
                np.multiply(buf, buf.dtype.type(1.0 / size), out=buf)
        return self._submit("allreduce", buf.size, run)

    def bcast(self, buf, root: int = 0):
        if not 0 <= root < self.size:
            raise CommError(f"bcast root {root} is not a rank (size {self.size})")
        if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
            raise CommError("bcast needs a contiguous NumPy array")
        self._submit("bcast", buf.size, lambda: complete(self._comm.Ibcast(buf, root=root), self.poll_s)).wait()
        return buf

    def barrier(self) -> None:
        self._submit("barrier", 0, lambda: complete(self._comm.Ibarrier(), self.poll_s)).wait()

    def abort(self, code: int = 1) -> None:
        self.world.Abort(code)

    def progress(self):
        with self._lock:
            oldest = min(self._pending.values(), key=lambda w: w.seq, default=None)
            return self._started, self._finished, oldest

    def close(self) -> None:
        """Finish queued collectives, stop the thread, free the duplicate communicator."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
            if not self._MPI.Is_finalized():
                self._comm.Free()


# --------------------------------------------------------------------------- NCCL ----------

class NcclWork(Work):
    """Completion is a CUDA event on the communication stream; nothing here blocks the host
    except `synchronize()`. Two timing events around the NCCL call give, once it is done,
    `started_at`/`finished_at` on the host clock (GPU time since the communicator's
    reference event, added to the host time of that event)."""

    def __init__(self, seq, name, count, comm, start_event, done_event):
        super().__init__(seq, name, count)
        self._comm, self._start, self._done = comm, start_event, done_event
        self._clock = comm.clock    # the reference recorded before both events (rebase_clock)

    def wait(self) -> None:
        """Order the current (compute) stream after the collective, without a host sync."""
        self._comm._backend.current_stream().wait_event(self._done)

    def synchronize(self) -> None:
        self._done.synchronize()
        self._resolve()

    def done(self) -> bool:
        if self._done.done:
            self._resolve()
            return True
        return False

    def _resolve(self):
        if self.finished_at is None:
            self.started_at = self._comm.host_time(self._start, self._clock)
            self.finished_at = self._comm.host_time(self._done, self._clock)


# cudaStreamCreateWithPriority clamps a priority outside the device's range to its nearest
# end, and lower numbers mean higher priority (0 is the default, the greatest is a small
# negative number). CuPy 14.2 does not wrap cudaDeviceGetStreamPriorityRange, so a number
# below every range asks for the greatest priority.
STREAM_PRIORITY_GREATEST = -(1 << 30)


class NcclCommunicator(Communicator):
    """Collectives on CuPy arrays through engine.nccl, on a dedicated stream.

    The pending list is shared with the watchdog's thread (progress() prunes it there) and
    guarded by a lock; works on the one communication stream finish in launch order, so
    the finished ones are always a prefix of it."""

    def __init__(self, backend, mpi_comm=None):
        from mpi4py import MPI
        from engine import nccl
        self.world = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.world.rank, self.world.size
        self._backend = backend
        # Rank 0 creates the id, MPI carries it; the device was bound by get_backend().
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.world.bcast(uid, root=0)
        self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        # The greatest priority: the SMs go to NCCL's kernels as soon as they free up,
        # before the queued backward kernels, which would otherwise delay the all-reduce
        # that the other ranks are waiting in.
        self._stream = backend.xp.cuda.Stream(non_blocking=True, priority=STREAM_PRIORITY_GREATEST)
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._started = 0
        self._pending: list[NcclWork] = []
        # The clock reference: an event the host has seen complete, and when it saw it.
        ref = self._timing_event()
        ref.synchronize()
        self.clock = (ref, time.perf_counter())

    def _timing_event(self):
        event = self._backend.xp.cuda.Event()
        event.record(self._stream)
        return event

    def host_time(self, event, clock=None) -> float:
        """perf_counter seconds of a completed timing event recorded after the reference
        `clock` (default: the current one)."""
        ref, ref_host = clock or self.clock
        return ref_host + self._backend.xp.cuda.get_elapsed_time(ref, event) / 1e3

    def rebase_clock(self) -> None:
        """A new clock reference, recorded now. cudaEventElapsedTime gives float32
        milliseconds: times measured from one reference made at start-up lose resolution as
        the run goes on (62 us after 10 minutes, 4 ms after 10 hours), and so do the overlap
        figures built from them. Renewed at every traced step, the reference stays a step
        away, and its host time is chained from the previous one over that short hop in
        float64. Works keep the reference they were launched under, so a work resolved
        later (by the watchdog's thread, say) never measures back to a newer one. Blocks
        the host until the communication stream reaches it: tracing only
        (engine.trace.Timeline.begin_step calls it through the DeviceClock)."""
        ref = self._timing_event()
        ref.synchronize()
        self.clock = (ref, self.host_time(ref))

    def _enqueue(self, name, buf, call) -> NcclWork:
        ready = self._backend.event()
        ready.record(self._backend.current_stream())   # the data is final on the compute stream
        ready.wait_on(self._stream)
        start = self._timing_event()
        call(self._stream)
        done = self._timing_event()
        work = NcclWork(next(self._seq), name, buf.size, self, start, done)
        if self._backend.current_stream().is_capturing():
            # A node of a CUDA graph being captured (engine.graph_step): its events only mark
            # the capture's fork and join, and CUDA refuses to query them. It is not tracked;
            # the watchdog follows the eager collective that comes after every replay.
            return work
        with self._lock:
            self._drop_finished()
            self._started += 1
            self._pending.append(work)
        return work

    def _drop_finished(self) -> None:
        """Forget the finished prefix of the pending works (the caller holds the lock)."""
        finished = 0
        for work in self._pending:
            if not work.done():
                break
            finished += 1
        del self._pending[:finished]

    def allreduce_async(self, buf, op: str = "sum") -> Work:
        _check_buffer(buf, "cupy")
        _check_op(op)
        return self._enqueue("allreduce", buf,
                             lambda s: self._nccl.all_reduce(buf, buf, op=op, stream=s))

    def bcast(self, buf, root: int = 0):
        _check_buffer(buf, "cupy")
        self._enqueue("bcast", buf, lambda s: self._nccl.broadcast(buf, buf, root=root, stream=s)).wait()
        return buf

    def barrier(self) -> None:
        self._backend.synchronize()
        self.world.Barrier()

    def abort(self, code: int = 1) -> None:
        try:
            self._nccl.abort()          # unblocks kernels stuck waiting for a dead peer
        finally:
            self.world.Abort(code)

    def progress(self):
        with self._lock:
            self._drop_finished()
            return self._started, self._started - len(self._pending), (self._pending[0] if self._pending else None)

    def bind_thread(self) -> None:
        """Make this rank's GPU the calling thread's device. A new thread starts on device 0:
        its first CUDA call (an event query, or destroying the events of a work it drops)
        would create a context there, about 0.5 GB on GPU 0 for every rank of the node."""
        self._backend.xp.cuda.Device(self._backend.device_id).use()

    def check_async_error(self) -> None:
        self._nccl.check_async_error()

    def close(self) -> None:
        self._backend.synchronize()
        self._nccl.destroy()


def create_communicator(backend, mpi_comm=None, *, poll_s: float | None = None) -> Communicator:
    """NCCL on a GPU backend, MPI on the CPU; the backend must already hold its device.
    `poll_s` (MPI only): see MpiCommunicator; None keeps its default."""
    if backend.is_gpu:
        return NcclCommunicator(backend, mpi_comm)
    return MpiCommunicator(mpi_comm) if poll_s is None else MpiCommunicator(mpi_comm, poll_s)
