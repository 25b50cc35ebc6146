"""The bucketed reducer with the real ResNet-18 under MPI.

What "the gradient of the global batch" means here: each rank's batch-norm layers
normalize with the statistics of that rank's shard (as in real data-parallel training),
so the all-reduced gradient is the gradient of L = (1/N) sum_r L_r(shard r, BN over shard
r), not of one loss over one concatenated batch with BN over all of it. The reference is
therefore computed in ONE process (rank 0), shard after shard with per-shard BN, and the
gradients summed in float64; reducer.reduced / N must equal it.
"""
import hashlib
import time

import numpy as np
import pytest

from engine.backend import get_backend
from engine.comm import create_communicator
from engine.loss import softmax_cross_entropy
from engine.model import build_model
from engine.optimizer import make_optimizer
from engine.reducer import MB, Reducer, StartupError, check_same_config, plan_buckets
from engine.schedule import Coefficients
from engine.trace import Timeline

ARCH, CLASSES, PER_RANK, PX = "resnet18", 5, 4, 32
BE = get_backend("cpu")


def _batch(seed, n):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, PX, PX, 3)).astype(np.float32),
            rng.integers(0, CLASSES, n))


def _grads_of(model, x, y, grad_ready=None):
    _, dlogits = softmax_cross_entropy(model.forward(x, train=True), y)
    model.backward(dlogits, grad_ready=grad_ready)


@pytest.fixture
def mpi_comm(comm):
    c = create_communicator(BE, comm)
    yield c
    c.close()


# ---------------------------------------------------------------- plain: the bucket plan ----

@pytest.mark.parametrize("bucket_mb,first_mb", [(1.0, 0.25), (4.0, 1.0), (2.5, 0.0), (1000.0, 1.0)])
def test_plan_tiles_the_buffer_on_slot_boundaries(bucket_mb, first_mb):
    layout = build_model(ARCH, CLASSES, BE).layout
    plan = plan_buckets(layout, bucket_mb, first_mb)
    assert plan[0][0] == 0 and plan[-1][1] == layout.total
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    offsets = {s.offset for s in layout.slots} | {layout.total}
    assert all(a in offsets and b in offsets for a, b in plan)
    def stop_of(offset):
        i = next(i for i, s in enumerate(layout.slots) if s.offset == offset)
        return layout.slots[i + 1].offset if i + 1 < len(layout.slots) else layout.total

    a, b = plan[0]
    first_cap = (first_mb or bucket_mb) * MB
    assert (b - a) * 4 <= first_cap or b == stop_of(a), "the first bucket is over its cap"
    if b != layout.total:
        assert (stop_of(b) - a) * 4 > first_cap, "the first bucket closed while a slot still fitted"
    for a, b in plan[1:-1]:
        last = max(s.offset for s in layout.slots if a <= s.offset < b)
        assert (b - a) * 4 >= bucket_mb * MB, "a bucket closed before reaching its cap"
        assert (last - a) * 4 < bucket_mb * MB, "a bucket went on after reaching its cap"


def test_plan_of_zero_is_per_layer_and_negative_is_refused():
    layout = build_model(ARCH, CLASSES, BE).layout
    assert plan_buckets(layout, 0, 1.0) is None
    with pytest.raises(ValueError, match="bucket"):
        plan_buckets(layout, -1, 1.0)


# ------------------------------------------------------------ mpi: gradients are right ----

def _reduced_vs_one_process_reference(comm, mpi_comm, *, bucket_mb, fp16, fp16_scale=1.0):
    """(relative error of reduced/N against the one-process reference, reduced digests per rank)."""
    n = comm.size
    seed = comm.bcast(int(np.random.SeedSequence().entropy % 2**31) if comm.rank == 0 else None)
    x, y = _batch(seed, n * PER_RANK)
    model = build_model(ARCH, CLASSES, BE, seed=comm.rank)   # different weights on purpose
    reducer = Reducer(model.layout, model.grads, mpi_comm, bucket_mb=bucket_mb, first_bucket_mb=0.5,
                      fp16=fp16, fp16_scale=fp16_scale)
    reducer.startup(model.params, {"arch": ARCH, "bucket_mb": bucket_mb})
    shard = slice(comm.rank * PER_RANK, (comm.rank + 1) * PER_RANK)
    _grads_of(model, x[shard], y[shard], reducer.grad_ready)
    reducer.finish()
    mine = reducer.reduced.astype(np.float64) / (n * fp16_scale)
    digests = comm.allgather(hashlib.sha256(reducer.reduced.tobytes()).hexdigest())
    rel = None
    if comm.rank == 0:
        # one process, shard after shard: fp32 gradients summed in float64
        ref_model = build_model(ARCH, CLASSES, BE)
        ref_model.params[...] = model.params
        ref = np.zeros(model.layout.total)
        for r in range(n):
            s = slice(r * PER_RANK, (r + 1) * PER_RANK)
            _grads_of(ref_model, x[s], y[s])
            ref += ref_model.grads
        ref /= n
        rel = float(np.linalg.norm(mine - ref) / np.linalg.norm(ref))
        print(f"seed {seed}, {n} ranks, bucket_mb={bucket_mb}, fp16={fp16}: relative error {rel:.2e}")
    _idle_until_all_arrive(comm)
    return comm.bcast(rel), digests


def _idle_until_all_arrive(comm):
    """A barrier that sleeps instead of spinning: MPICH's blocking calls busy-poll, which
    would take a core from rank 0's reference computation on this 2-core machine."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.005)


@pytest.mark.mpi
@pytest.mark.parametrize("bucket_mb", [0, 2.0])
def test_reduced_gradient_equals_the_one_process_reference_fp32(comm, mpi_comm, bucket_mb):
    assert comm.size >= 2
    rel, digests = _reduced_vs_one_process_reference(comm, mpi_comm, bucket_mb=bucket_mb, fp16=False)
    assert rel < 1e-5, rel
    assert len(set(digests)) == 1, "ranks hold different reduced gradients"


@pytest.mark.mpi
@pytest.mark.parametrize("scale", [1.0, 64.0])
def test_fp16_reduced_gradient_within_stated_tolerance(comm, mpi_comm, scale):
    rel, digests = _reduced_vs_one_process_reference(comm, mpi_comm, bucket_mb=2.0, fp16=True,
                                                     fp16_scale=scale)
    # stated in engine/reducer.py: ~(1 cast + 1 rounding) x 2^-11 per element on MPI
    assert rel < 2 * 2.0 ** -11, rel
    assert rel > 1e-6, "fp16 path returned float32-exact sums: was it really sent as fp16?"
    assert len(set(digests)) == 1


@pytest.mark.mpi
@pytest.mark.np4
@pytest.mark.slow
def test_reduced_gradient_on_four_ranks(comm, mpi_comm):
    assert comm.size == 4, "run under mpiexec -n 4 (make test's np4 tier)"
    rel, digests = _reduced_vs_one_process_reference(comm, mpi_comm, bucket_mb=1.0, fp16=False)
    assert rel < 1e-5, rel
    assert len(set(digests)) == 1
    rel16, _ = _reduced_vs_one_process_reference(comm, mpi_comm, bucket_mb=1.0, fp16=True)
    assert rel16 < 2 * 2.0 ** -11, rel16


@pytest.mark.mpi
@pytest.mark.parametrize("early", [False, True])
def test_parameters_stay_bit_identical_over_steps(comm, mpi_comm, early):
    model = build_model(ARCH, CLASSES, BE, seed=comm.rank)
    reducer = Reducer(model.layout, model.grads, mpi_comm, bucket_mb=1.0, early_update=early)
    reducer.startup(model.params)
    before = model.params.copy()
    opt = make_optimizer("sgd", model.params, model.layout, BE)
    coef = Coefficients(eta=0.05)
    base = comm.bcast(int(np.random.SeedSequence().entropy % 2**31) if comm.rank == 0 else None)
    for step in range(2):
        x, y = _batch([base, step, comm.rank], PER_RANK)     # every rank its own data
        def update(a, b):
            opt.update(reducer.reduced, a, b, coef=coef, grad_scale=1.0 / comm.size)
        reducer.prepare(update)
        _grads_of(model, x, y, reducer.grad_ready)
        reducer.finish()
    digests = comm.allgather(hashlib.sha256(model.params.tobytes()).hexdigest())
    assert len(set(digests)) == 1, f"parameters diverged across ranks: {digests}"
    assert not np.array_equal(model.params, before)


# ------------------------------------------------------- mpi: order and exactly once ----

class RecordingComm:
    """The real communicator, with every launch logged (offset, size, grad_ready calls so far)."""

    def __init__(self, inner, base, calls):
        self.inner, self.base, self.calls, self.launches = inner, base, calls, []
        self.world, self.rank, self.size = inner.world, inner.rank, inner.size

    def allreduce_async(self, buf, op="sum"):
        offset = (buf.ctypes.data - self.base.ctypes.data) // buf.itemsize
        self.launches.append((offset, offset + buf.size, len(self.calls)))
        return self.inner.allreduce_async(buf, op)

    def bcast(self, buf, root=0):
        return self.inner.bcast(buf, root)


@pytest.mark.mpi
@pytest.mark.parametrize("bucket_mb", [0, 0.5])
def test_buckets_launch_in_order_as_soon_as_complete_each_layer_once(comm, mpi_comm, bucket_mb):
    model = build_model(ARCH, CLASSES, BE)
    calls = []
    rec = RecordingComm(mpi_comm, model.grads, calls)
    timeline = Timeline(None, rank=comm.rank)
    reducer = Reducer(model.layout, model.grads, rec, bucket_mb=bucket_mb, first_bucket_mb=0.1,
                      timeline=timeline)
    x, y = _batch([7, comm.rank], PER_RANK)

    def grad_ready(a, b):
        calls.append((a, b))
        reducer.grad_ready(a, b)

    for step in range(2):
        calls.clear()
        rec.launches.clear()
        timeline.begin_step(step)
        _grads_of(model, x, y, grad_ready)
        reducer.finish()
        figures = timeline.end_step()
        # every layer reported exactly once, in layout order, tiling the buffer
        assert calls[0][0] == 0 and calls[-1][1] == model.layout.total
        assert all(p[1] == q[0] for p, q in zip(calls, calls[1:]))
        owner = [sum(a <= s.offset < b for a, b in calls) for s in model.layout.slots]
        assert owner == [1] * len(model.layout.slots)
        # buckets: in order, tiling, each launched exactly once, right after its last gradient
        spans = [(a, b) for a, b, _ in rec.launches]
        assert spans == reducer.buckets
        assert spans[0][0] == 0 and spans[-1][1] == model.layout.total
        assert all(p[1] == q[0] for p, q in zip(spans, spans[1:]))
        for a, b, ncalls in rec.launches:
            assert calls[ncalls - 1][1] >= b, "launched before its gradients were final"
            assert ncalls == 1 or calls[ncalls - 2][1] < b, "launched later than it could have been"
        if bucket_mb == 0:
            assert spans == calls
        assert figures["comm_s"] > 0
    assert comm.allgather(reducer.buckets) == [reducer.buckets] * comm.size


@pytest.mark.mpi
def test_out_of_order_or_repeated_ranges_are_refused(mpi_comm):
    model = build_model(ARCH, CLASSES, BE)
    reducer = Reducer(model.layout, model.grads, mpi_comm, bucket_mb=1.0)
    first = model.layout.slots[1].offset
    with pytest.raises(RuntimeError, match="tile"):
        reducer.grad_ready(first, model.layout.total)       # skips [0, first)
    reducer.grad_ready(0, first)
    with pytest.raises(RuntimeError, match="tile"):
        reducer.grad_ready(0, first)                         # the same layer twice
    with pytest.raises(RuntimeError, match="only"):
        reducer.finish()


# --------------------------------------------------------------- mpi: start-up checks ----

@pytest.mark.mpi
def test_startup_takes_rank0_weights(comm, mpi_comm):
    model = build_model(ARCH, CLASSES, BE, seed=100 + comm.rank)
    Reducer(model.layout, model.grads, mpi_comm).startup(model.params, {"lr": 0.1})
    expected = build_model(ARCH, CLASSES, BE, seed=100).params
    np.testing.assert_array_equal(model.params, expected)


@pytest.mark.mpi
def test_startup_refuses_a_different_layout(comm, mpi_comm):
    model = build_model(ARCH, CLASSES + (comm.rank == comm.size - 1), BE)
    with pytest.raises(StartupError, match=rf"rank\(s\) \[{comm.size - 1}\]"):
        Reducer(model.layout, model.grads, mpi_comm).startup(model.params)


@pytest.mark.mpi
def test_startup_refuses_a_different_config_naming_rank_and_key(comm, mpi_comm):
    config = {"arch": ARCH, "lr": 0.1 if comm.rank != 1 else 0.2, "epochs": 3}
    with pytest.raises(StartupError) as info:
        check_same_config(mpi_comm, config)
    assert "rank 1: lr=0.2 (rank 0: 0.1)" in str(info.value)
    assert "epochs" not in str(info.value)
    check_same_config(mpi_comm, {"arch": ARCH, "epochs": 3})     # equal configs pass
