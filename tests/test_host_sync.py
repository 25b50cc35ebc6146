"""Without --trace a training step never blocks the host: counted with stand-ins for a GPU.

The real Trainer (run loop, train_step, reducer, optimizer, engine.stepstats, the loss)
runs on the CPU with ResNet-18 and three stand-ins for the device:

- a backend whose arrays stand for device arrays: reading one's value on the host
  (float(), int(), bool(), index, .item(), .tolist(), backend.asnumpy) is logged as a
  host synchronisation, as is every stream, event or device synchronize;
- the model's logits come back as such arrays (the model's own code is out of scope here:
  on a GPU it only launches kernels), so loss, top-1 hits and dlogits are device values;
- a one-rank communicator whose Work behaves like NcclWork: wait() only orders streams
  (free), synchronize() blocks the host (logged).

The log interleaves "step" (a train_step call), launched all-reduces and syncs, so the
tests can say WHERE each sync happened, not only how many there were.
"""
import json
import time
from dataclasses import dataclass

import numpy as np
import pytest

from engine.backend import Backend
from engine.comm import Communicator, Work

LOG = []
STATS_SIZE = 3          # engine.stepstats: (loss * n, hits, n)


class DeviceArray(np.ndarray):
    """A NumPy array standing for a CuPy one: every way of reading its value on the host is logged."""

    def _read(self, how):
        LOG.append(f"sync {how}")
        return self.view(np.ndarray)

    def __float__(self):
        return float(self._read("float()"))

    def __int__(self):
        return int(self._read("int()"))

    def __index__(self):
        return int(self._read("index"))

    def __bool__(self):
        return bool(self._read("bool()"))

    def item(self, *args):
        return self._read(".item()").item(*args)

    def tolist(self):
        return self._read(".tolist()").tolist()


class Stream:
    def synchronize(self):
        LOG.append("sync stream")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Event:
    def record(self, stream=None):
        pass

    def wait_on(self, stream):
        pass

    def synchronize(self):
        LOG.append("sync event")

    def done(self):
        return True


@dataclass(frozen=True)
class DeviceBackend(Backend):
    """The CPU backend, but its arrays are DeviceArrays and every host read is logged."""

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype=dtype).view(DeviceArray)

    def asnumpy(self, a):
        LOG.append("sync asnumpy")
        return np.asarray(a)

    def synchronize(self):
        LOG.append("sync device")

    def stream(self):
        return Stream()

    def current_stream(self):
        return Stream()

    def event(self):
        return Event()


class DeviceWork(Work):
    """As NcclWork: wait() makes the compute stream wait, synchronize() blocks the host."""

    def wait(self):
        pass

    def done(self):
        return True

    def synchronize(self):
        LOG.append("sync Work.synchronize")
        self.started_at, self.finished_at = self.launched_at, time.perf_counter()


class OneWorld:
    """The MPI world of one rank (start-up checks allgather and bcast on it)."""
    rank, size = 0, 1

    def allgather(self, x):
        return [x]

    def bcast(self, x, root=0):
        return x

    def Barrier(self):
        pass


class OneRankComm(Communicator):
    """One rank: a sum over ranks is the buffer itself."""
    rank, size = 0, 1

    def __init__(self):
        self.world, self.seq = OneWorld(), 0

    def allreduce_async(self, buf, op="sum"):
        LOG.append(("launch", buf.size))
        self.seq += 1
        return DeviceWork(self.seq, "allreduce", buf.size)

    def bcast(self, buf, root=0):
        return buf

    def barrier(self):
        pass

    def abort(self, code=1):
        raise RuntimeError("abort")

    def progress(self):
        return self.seq, self.seq, None


@pytest.fixture
def trainer_factory(monkeypatch, tmp_path):
    """Trainer(options) on the stand-ins, its logits device arrays; evaluation stubbed out
    (it reads results on the host by design, after training)."""
    import engine.backend
    import engine.comm
    from engine.train import Trainer, parse_args
    monkeypatch.setattr(engine.backend, "get_backend", lambda device="auto", local_rank=None:
                        DeviceBackend("cpu", np, None))
    monkeypatch.setattr(engine.comm, "create_communicator", lambda backend, *a, **k: OneRankComm())
    made = []

    def make(extra, logits_hook=None):
        LOG.clear()
        argv = ["--arch", "resnet18", "--image-size", "32", "--batch-per-rank", "8", "--watchdog", "0",
                "--eval-every", "0", "--no-checkpoint", "--print-every", "1000",
                "--log-dir", str(tmp_path / "log")] + extra
        t = Trainer(parse_args(argv))
        made.append(t)
        forward, calls = t.model.forward, []

        def device_forward(x, train):
            logits = forward(x, train).view(DeviceArray)
            calls.append(1)
            return logits_hook(len(calls), logits) if logits_hook else logits
        t.model.forward = device_forward
        step = t.train_step

        def logged_step(batch, coef):
            LOG.append("step")
            return step(batch, coef)
        t.train_step = logged_step
        t.evaluate = lambda: dict(step=t.global_step, epoch=0.0, top1=0.0, top5=0.0, loss=0.0, count=0,
                                  seconds=0.0)
        return t
    yield make
    for t in made:
        t.close()


def _windows(log):
    """Per step: the log entries from its train_step call to its stats all-reduce launch."""
    out, current = [], None
    for entry in log:
        if entry == "step":
            current = []
        elif current is not None:
            if entry == ("launch", STATS_SIZE):
                out.append(current)
                current = None
            else:
                current.append(entry)
    return out


def _syncs(entries):
    return [e for e in entries if isinstance(e, str) and e.startswith("sync")]


def test_a_step_without_trace_never_blocks_the_host_and_stats_are_read_one_step_late(trainer_factory, tmp_path):
    trainer = trainer_factory(["--max-steps", "3"])
    trainer.run()
    windows = _windows(LOG)
    assert len(windows) == 3
    assert [_syncs(w) for w in windows] == [[], [], []], "a step blocked the host"
    assert all(("launch", STATS_SIZE) not in w and any(isinstance(e, tuple) for e in w) for w in windows)
    # The only host reads: each step's stats, once, after the NEXT step was enqueued (the
    # last one after the loop).
    assert _syncs(LOG) == ["sync asnumpy"] * 3
    reads = [i for i, e in enumerate(LOG) if e == "sync asnumpy"]
    stats_launches = [i for i, e in enumerate(LOG) if e == ("launch", STATS_SIZE)]
    steps = [i for i, e in enumerate(LOG) if e == "step"]
    assert stats_launches[1] < reads[0] < steps[2]
    assert stats_launches[2] < reads[1] and reads[1] < reads[2]
    rows = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0 <= r["top1"] <= 1 for r in train)
    assert all("exposed_comm_s" not in r for r in train)      # no figures without --trace


def test_the_counter_sees_the_syncs_that_trace_makes(trainer_factory, tmp_path):
    """With --trace the reducer synchronizes every bucket to learn its all-reduce times: the
    stand-ins must count those, or the zero above would prove nothing."""
    trainer = trainer_factory(["--max-steps", "2", "--trace", str(tmp_path / "t.json")])
    trainer.run()
    windows = _windows(LOG)
    buckets = len(trainer.reducer.buckets)
    assert buckets > 1
    assert [_syncs(w).count("sync Work.synchronize") for w in windows] == [buckets, buckets]


def test_a_non_finite_loss_stops_the_job_one_step_later_naming_its_step(trainer_factory, tmp_path):
    from engine.metrics import NonFiniteLoss

    def nan_at_second_step(call, logits):
        return logits * np.float32("nan") if call == 2 else logits
    trainer = trainer_factory(["--max-steps", "5"], logits_hook=nan_at_second_step)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 2 "):
        trainer.run()
    assert LOG.count("step") == 3, "step 3 is enqueued before step 2's loss is read, and no later one"
    rows = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1]


@pytest.mark.mpi
def test_step_stats_are_global_means_popped_in_submission_order(comm):
    """engine.stepstats on the real MPI communicator: ranks with different shard sizes,
    several steps in flight, each popped record the float64 mean over the global batch."""
    from engine.backend import get_backend
    from engine.comm import create_communicator
    from engine.stepstats import StepStats
    be = get_backend("cpu")
    c = create_communicator(be, comm)
    try:
        stats = StepStats(be, c)
        base = comm.bcast(int(np.random.SeedSequence().entropy % 2**31), root=0)
        rng = np.random.default_rng([base, comm.rank])
        mine = []
        for step in range(3):
            n = 4 + comm.rank + step
            loss, hits = np.float32(rng.uniform(0.1, 5.0)), np.int64(rng.integers(0, n + 1))
            mine.append((float(loss), int(hits), n))
            stats.submit({"step": step}, loss, hits, n)
        assert len(stats) == 3
        popped = [stats.pop() for _ in range(3)]
        assert len(stats) == 0
    finally:
        c.close()
    everyone = comm.allgather(mine)
    for step, r in enumerate(popped):
        rows = [everyone[rank][step] for rank in range(comm.size)]
        images = sum(n for _, _, n in rows)
        assert r["step"] == step
        assert r["loss"] == pytest.approx(sum(loss * n for loss, _, n in rows) / images, rel=1e-6)
        assert r["top1"] == pytest.approx(sum(hits for _, hits, _ in rows) / images, rel=1e-6)
