"""NcclCommunicator without a GPU, on stand-ins for cupy.cuda and engine.nccl that log
every CUDA event call with the calling thread and that thread's current device:
the watchdog's thread works on the rank's own device, the pending list shared with it
loses no work, finished works are dropped without a watchdog, and the communication
stream asks for the greatest priority."""
import bisect
import collections
import math
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import engine
from engine.backend import Backend
from engine.comm import NcclCommunicator
from engine.guard import Watchdog
from numerics import assert_close

GREATEST, LEAST = -5, 0          # the stand-in device's stream priority range


class DeviceArray(np.ndarray):
    """A NumPy array that the communicator's buffer check takes for a CuPy array."""
    __module__ = "cupy"


class StandInCuda:
    """cupy.cuda as far as NcclCommunicator and engine.backend use it. `calls` counts
    (verb, thread id, current device) of every event call; `live_events` counts events not
    yet destroyed. Like events on one stream, events complete in the order they were
    recorded: `records` counts the records so far, and the first `completed` of them are
    complete (math.inf: all, 0: none). An event records the device clock `now_ms`, and
    elapsed times come back as float32 milliseconds, as cudaEventElapsedTime gives them."""

    def __init__(self):
        self.calls = collections.Counter()
        self.records = 0
        self.completed = math.inf
        self.live_events = 0
        self.now_ms = 0.0
        self.streams = []
        self._local = threading.local()
        self._lock = threading.Lock()
        cuda = self

        class Event:
            def __init__(self, disable_timing=False):
                cuda.log("create", +1)
                self.index = None

            def record(self, stream=None):
                cuda.log("record")
                with cuda._lock:
                    self.index, cuda.records = cuda.records, cuda.records + 1
                self.t = cuda.now_ms

            @property
            def done(self):
                cuda.log("query")
                return self.index < cuda.completed

            def synchronize(self):
                cuda.log("synchronize")

            def __del__(self):
                cuda.log("destroy", -1)

        class Stream:
            def __init__(self, non_blocking=False, priority=None):
                # what cudaStreamCreateWithPriority keeps: the request clamped to the range
                self.non_blocking = non_blocking
                self.priority = None if priority is None else min(max(priority, GREATEST), LEAST)
                cuda.streams.append(self)

            def wait_event(self, event):
                cuda.log("stream wait")

            def is_capturing(self):
                return False

        class Device:
            def __init__(self, device_id):
                self.id = device_id

            def use(self):
                cuda._local.device = self.id

            def synchronize(self):
                pass

        self.Event, self.Stream, self.Device = Event, Stream, Device
        self._compute = Stream()

    def current_device(self) -> int:
        return getattr(self._local, "device", 0)      # a new thread starts on device 0

    def log(self, verb, live=0):
        with self._lock:
            self.calls[verb, threading.get_ident(), self.current_device()] += 1
            self.live_events += live

    def get_elapsed_time(self, start, end):
        self.log("elapsed")
        return float(np.float32(end.t - start.t))

    def get_current_stream(self):
        return self._compute


class StandInNccl:
    """engine.nccl: a communicator whose calls log (device-bound) activity. Of one rank, an
    all-reduce leaves recv as it is (the sum over one rank is send itself, and the tests
    pass the same buffer); given `peers`, the buffers of the other ranks, it writes their
    sum or mean with send into recv, as NCCL would."""

    def __init__(self, cuda, peers=()):
        self.cuda, self.peers = cuda, list(peers)

    def get_unique_id(self):
        return b"id"

    def NcclCommunicator(self, size, uid, rank):
        assert size == 1 + len(self.peers) and rank == 0
        cuda, peers = self.cuda, self.peers

        def all_reduce(send, recv, op, stream):
            if peers:
                total = np.sum([np.asarray(send)] + peers, axis=0, dtype=np.float64)
                recv[...] = total / size if op == "avg" else total
        return SimpleNamespace(all_reduce=all_reduce,
                               broadcast=lambda send, recv, root, stream: None,
                               check_async_error=lambda: cuda.log("nccl async error"),
                               destroy=lambda: None, abort=lambda: None)


@pytest.fixture
def gpu_comm(monkeypatch):
    """make(device_id, peers=()) -> (stand-in cuda, NcclCommunicator on that device: rank 0
    of one rank, or of 1 + len(peers) ranks whose other buffers are `peers`), the main thread
    bound to the device as engine.backend.get_backend binds it."""
    from mpi4py import MPI
    made = []

    def make(device_id, peers=()):
        cuda = StandInCuda()
        nccl = StandInNccl(cuda, peers)
        monkeypatch.setitem(sys.modules, "engine.nccl", nccl)
        monkeypatch.setattr(engine, "nccl", nccl, raising=False)
        cuda.Device(device_id).use()
        world = MPI.COMM_SELF if not peers else SimpleNamespace(rank=0, size=1 + len(peers),
                                                                bcast=lambda x, root=0: x)
        comm = NcclCommunicator(Backend("gpu", SimpleNamespace(cuda=cuda), device_id), world)
        made.append(comm)
        return cuda, comm
    yield make
    for comm in made:
        comm.close()


def _buffer(n=256):
    return np.zeros(n, np.float32).view(DeviceArray)


def _wait_for(condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def test_watchdog_thread_calls_cuda_only_on_the_ranks_device(gpu_comm):
    from mpi4py import MPI
    cuda, comm = gpu_comm(device_id=1)
    cuda.completed = 0                    # in flight until the watchdog has seen them
    buf = _buffer()
    dog = Watchdog(comm, timeout=600, interval=0.01, world=MPI.COMM_SELF).start()
    for _ in range(20):
        comm.allreduce_async(buf)
    cuda.completed = math.inf             # the watchdog finds them finished and drops them
    dog_id = dog._thread.ident

    def dog_did(verb):
        return any(v == verb and t == dog_id for v, t, _ in list(cuda.calls))
    _wait_for(lambda: dog_did("destroy"), "the watchdog to drop the finished works")
    dog.stop()
    for verb in ("query", "elapsed", "destroy", "nccl async error"):
        assert dog_did(verb), f"the watchdog thread never made a {verb!r} call: {cuda.calls}"
    on_other_devices = {(v, t, d) for v, t, d in cuda.calls if d != 1}
    assert not on_other_devices, f"CUDA calls off the rank's device 1: {on_other_devices}"
    assert comm.progress()[:2] == (20, 20)


def test_concurrent_enqueue_and_progress_lose_no_work(gpu_comm):
    """The main thread enqueues, and drops finished works as it goes, while another thread
    polls progress() (which drops them too) in a loop, thread switches forced every
    microsecond and works finishing in bursts meanwhile. Every snapshot must count as
    finished only works that had finished, with the oldest unfinished one next."""
    cuda, comm = gpu_comm(device_id=0)
    cuda.completed = 0
    ends = []                             # records made once work i was enqueued
    stop, wrong = threading.Event(), []

    def poll():
        while not stop.is_set():
            started, finished, oldest = comm.progress()
            really = bisect.bisect_right(ends, cuda.completed)     # read after: an upper bound
            if finished > really or (oldest is not None and oldest.seq != finished):
                wrong.append((started, finished, oldest and oldest.seq, really))
    poller = threading.Thread(target=poll)
    buf, n, behind = _buffer(), 3000, 3
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        poller.start()
        for i in range(n):
            comm.allreduce_async(buf)
            ends.append(cuda.records)
            if i % 10 == 9:               # all but the last few works have finished
                cuda.completed = ends[i - behind]
    finally:
        stop.set()
        poller.join()
        sys.setswitchinterval(interval)
    assert not wrong, f"{len(wrong)} snapshots (started, finished, oldest, really finished): {wrong[:5]}"
    assert comm.progress()[:2] == (n, n - behind)
    cuda.completed = math.inf
    assert comm.progress() == (n, n, None)


@pytest.mark.parametrize("op", ["sum", "avg"])
def test_an_all_reduce_leaves_the_sum_or_mean_over_the_ranks_in_the_buffer(gpu_comm, op):
    """Three ranks (two of them the stand-in's peers): the communicator reduces the buffer in
    place with the op asked for. A copy, a broadcast, another op or a result left in a
    temporary would each leave something else."""
    rng = np.random.default_rng()
    peers = [rng.standard_normal(64).astype(np.float32) for _ in range(2)]
    _, comm = gpu_comm(device_id=0, peers=peers)
    mine = rng.standard_normal(64).astype(np.float32)
    buf = mine.copy().view(DeviceArray)
    comm.allreduce_async(buf, op).wait()
    total = mine.astype(np.float64) + peers[0] + peers[1]
    assert_close(buf, total / 3 if op == "avg" else total, rtol=1e-6, atol=1e-6)


def test_finished_works_are_dropped_without_a_watchdog(gpu_comm):
    """Nothing calls progress(): each enqueue drops the finished works, so the live CUDA
    events are the clock reference plus the last work's start and done events."""
    cuda, comm = gpu_comm(device_id=0)
    buf = _buffer()
    for _ in range(500):
        comm.allreduce_async(buf)
    assert cuda.live_events == 3, cuda.live_events
    cuda.completed = 0
    for _ in range(10):
        comm.allreduce_async(buf)
    assert cuda.live_events == 3 + 2 * 10      # works in flight are kept


@pytest.mark.parametrize("rebase", [True, False], ids=["rebased-every-step", "start-up-reference"])
def test_traced_times_keep_their_resolution_through_a_long_run(gpu_comm, rebase):
    """An hour of 1-second traced steps: a 37.5 us all-reduce at the end must still measure
    37.5 us. From the start-up reference alone, float32 milliseconds at 3.6e6 ms step by
    0.25 ms, so it measures 0 or 250 us (the negative case shows the test can fail)."""
    cuda, comm = gpu_comm(device_id=0)
    t0 = comm.host_time(comm.clock[0])
    early = comm.allreduce_async(_buffer())          # launched under the start-up reference
    for _ in range(3600):
        cuda.now_ms += 1000.0
        if rebase:
            comm.rebase_clock()
    cuda.now_ms += 0.4
    start = cuda.Event()
    start.record()
    cuda.now_ms += 0.0375
    end = cuda.Event()
    end.record()
    length = comm.host_time(end) - comm.host_time(start)
    if rebase:
        assert abs(length - 37.5e-6) < 0.1e-6, length
        assert abs(comm.host_time(start) - t0 - 3600.0004) < 20e-6     # chained hops stay on time
        early.synchronize()                          # resolved after 3600 rebases: its own reference
        assert early.started_at == early.finished_at == t0
    else:
        assert abs(length - 37.5e-6) > 30e-6, length


def test_communication_stream_is_non_blocking_at_the_greatest_priority(gpu_comm):
    cuda, comm = gpu_comm(device_id=0)
    (stream,) = [s for s in cuda.streams if s is not cuda.get_current_stream()]
    assert stream.non_blocking and stream.priority == GREATEST


@pytest.mark.gpu
def test_real_communication_stream_gets_a_raised_priority():
    """On a device with stream priorities, CUDA reports the clamped request: below the
    default 0 (the device's greatest priority)."""
    import cupy
    from mpi4py import MPI
    from engine.backend import get_backend
    from engine.comm import create_communicator
    be = get_backend("gpu")
    runtime = cupy.cuda.runtime
    if not runtime.deviceGetAttribute(runtime.cudaDevAttrStreamPrioritiesSupported, be.device_id):
        pytest.skip("this device has no stream priorities")
    comm = create_communicator(be, MPI.COMM_SELF)
    try:
        assert comm._stream.priority < 0
    finally:
        comm.close()


@pytest.mark.gpu
def test_watchdog_on_a_real_one_rank_nccl_communicator_sees_every_work_finish():
    """The watchdog's thread polls real CUDA events of real NCCL works on the rank's device:
    every work is seen finished and dropped, and stopping it raises nothing."""
    import cupy as cp
    from mpi4py import MPI
    from engine.backend import get_backend
    from engine.comm import create_communicator
    be = get_backend("gpu")
    comm = create_communicator(be, MPI.COMM_SELF)
    dog = Watchdog(comm, timeout=600, interval=0.01, world=MPI.COMM_SELF).start()
    try:
        buf = cp.asarray(np.random.default_rng().standard_normal(1 << 20).astype(np.float32))
        for _ in range(20):
            comm.allreduce_async(buf)
        be.synchronize()
        _wait_for(lambda: comm.progress()[:2] == (20, 20), "the watchdog to see the works finish")
        assert dog._thread.is_alive() and comm.progress()[2] is None
    finally:
        dog.stop()
        comm.close()
