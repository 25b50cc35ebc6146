"""Without --trace a training step never blocks the host: counted on the stand-in CuPy.

The real Trainer (run loop, train_step, model, reducer, optimizer, engine.stepstats, the
loss) runs on the engine's GPU backend whose CuPy and NCCL are the stand-ins of
tests/gpu_standins.py: every array the job makes (images, the model's parameters and
buffers, gradients, optimizer state, loss) is a stand-in device array, and the GPU branches
of the engine are the ones taken. Every way of reading a device value on the host that
would synchronise a CuPy step (float(), int(), bool(), an index, .item(), .tolist(), .get(),
str(), repr(), an f-string, a boolean mask, a stream, event or device synchronize) is logged
as a sync, and the others (np.asarray of a device array, data-dependent sizes) are refused.

The fused kernels are counted, not run (this is about where the host waits, not about
numbers: tests/test_cuda_graph.py and the emulation tier run them); the loss kernel writes
the loss the test chose, so the run loop has a value to check.

The log interleaves "step" (a train_step call), the NCCL launches and the syncs, so the
tests can say WHERE each sync happened, not only how many there were.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import gpu_standins
from gpu_standins import OPS, Op

STATS_LAUNCH = ("nccl", "all_reduce 3")      # engine.stepstats: (loss * n, hits, n)
ARGV = ["--arch", "resnet18", "--image-size", "32", "--batch-per-rank", "8"]


def loss_kernel_writes(losses):
    """A counting launch (gpu_standins.counted_launch) whose softmax_xent_reduce writes the
    step's (loss, hits): losses[i] for its i-th call (the last one after the list ends), hits 1."""
    calls = []

    def launch(filename, kernel, grid, block, args):
        gpu_standins.counted_launch(filename, kernel, grid, block, args)
        if kernel == "softmax_xent_reduce":
            calls.append(1)
            out = gpu_standins._np(args[-1])
            out[:] = (losses[min(len(calls), len(losses)) - 1], 1.0)
    return launch


@pytest.fixture
def trainer_factory(monkeypatch):
    """Trainer(options) on the stand-ins, each train_step call logged as "step"; evaluation
    stubbed out (it reads results on the host by design, after training)."""
    made = []
    # The kernels are skipped, so the arrays they would write hold what np.empty left: what
    # the GEMMs and ufuncs compute from them may overflow, harmlessly.
    errstate = np.seterr(all="ignore")

    def make(extra, losses=(2.0,)):
        t = gpu_standins.trainer_on_standins(monkeypatch, ARGV + extra, loss_kernel_writes(losses))
        made.append(t)
        step = t.train_step

        def logged_step(batch, coef):
            OPS.append(Op("step", "train_step", "test"))
            return step(batch, coef)
        t.train_step = logged_step
        t.evaluate = lambda: dict(step=t.global_step, epoch=0.0, top1=0.0, top5=0.0, loss=0.0, count=0,
                                  seconds=0.0)
        gpu_standins.reset()
        return t
    yield make
    np.seterr(**errstate)
    for t in made:
        t.close()


def _entry(op):
    return op.kind if op.kind == "step" else (op.kind, op.name)


def _windows(ops):
    """Per step: the ops from its train_step call to its stats all-reduce launch."""
    out, current = [], None
    for op in ops:
        if op.kind == "step":
            current = []
        elif current is not None:
            if _entry(op) == STATS_LAUNCH:
                out.append(current)
                current = None
            else:
                current.append(op)
    return out


def _syncs(ops):
    return [f"{o.name} in {o.where}" for o in ops if o.kind == "sync"]


def test_a_step_without_trace_never_blocks_the_host_and_stats_are_read_one_step_late(trainer_factory):
    trainer = trainer_factory(["--max-steps", "3"], losses=(2.5, 2.25, 2.0))
    trainer.run()
    assert trainer.backend.name != "cpu" and not isinstance(trainer.model.params, np.ndarray)
    windows = _windows(OPS)
    assert len(windows) == 3
    assert [_syncs(w) for w in windows] == [[], [], []], "a step blocked the host"
    assert all(any(o.kind == "nccl" for o in w) for w in windows), "no gradient all-reduce in a step"
    # The only host reads: each step's stats, once, after the NEXT step was enqueued (the
    # last one after the loop).
    assert _syncs(OPS) == [".get() in stepstats"] * 3
    entries = [_entry(o) for o in OPS]
    reads = [i for i, o in enumerate(OPS) if o.kind == "sync"]
    stats_launches = [i for i, e in enumerate(entries) if e == STATS_LAUNCH]
    steps = [i for i, e in enumerate(entries) if e == "step"]
    assert stats_launches[1] < reads[0] < steps[2]
    assert stats_launches[2] < reads[1] < reads[2]
    rows = [json.loads(line) for line in open(Path(trainer.args.log_dir) / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["loss"] for r in train] == pytest.approx([2.5, 2.25, 2.0], rel=1e-6)
    assert all("exposed_comm_s" not in r for r in train)      # no figures without --trace


def test_the_counter_sees_the_syncs_that_trace_makes(trainer_factory, tmp_path):
    """With --trace the reducer synchronizes a bucket whose all-reduce times it does not know
    yet, and the timeline its clock: the stand-ins must count those, or the zero above would
    prove nothing. (A stand-in event is complete as soon as it is recorded, so after the first
    bucket's sync the reducer finds the later ones done.)"""
    trainer = trainer_factory(["--max-steps", "2", "--trace", str(tmp_path / "t.json")])
    trainer.run()
    assert [_syncs(w) for w in _windows(OPS)] == [["Event.synchronize in reducer", "Event.synchronize in trace"]] * 2


@pytest.mark.parametrize("read", [
    lambda x: f"{x}",
    lambda x: str(x),
    lambda x: repr(x),
    lambda x: float(x),
    lambda x: int(x),
    lambda x: bool(x > 0),
    lambda x: x.item(),
    lambda x: x.tolist(),
    lambda x: range(x.astype(np.int64)),
    lambda x: x.reshape(1)[0] > 1 or None,          # a scalar index gives a device value
    lambda x: x.reshape(1)[x.reshape(1) > 0],        # a boolean mask
    lambda x: x.reshape(1).__setitem__(x.reshape(1) > 0, 0),
    lambda x: np.asarray(x),
    lambda x: np.float32(x),
    lambda x: x.get(),
], ids=["f-string", "str", "repr", "float", "int", "bool", "item", "tolist", "index", "scalar index",
        "mask getitem", "mask setitem", "np.asarray", "np.float32", "get"])
def test_every_host_read_of_a_device_value_is_logged_or_refused(monkeypatch, read):
    cupy = gpu_standins.install(monkeypatch)
    x = cupy.asarray(np.float32(1.5))
    gpu_standins.reset()
    try:
        read(x)
    except (TypeError, NotImplementedError):
        return          # refused, as CuPy refuses an implicit conversion
    assert [o.kind for o in OPS].count("sync") >= 1, OPS


def test_a_non_finite_loss_stops_the_job_one_step_later_naming_its_step(trainer_factory):
    from engine.metrics import NonFiniteLoss
    trainer = trainer_factory(["--max-steps", "5"], losses=(2.0, float("nan"), 2.0))
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 2 "):
        trainer.run()
    assert [o.kind for o in OPS].count("step") == 3, "step 3 is enqueued before step 2's loss is read, and no later one"
    rows = [json.loads(line) for line in open(Path(trainer.args.log_dir) / "metrics.jsonl")]
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
