"""The float32 model, the trainer, NCCL and the reducer on GPUs; all skip without a device but
the CPU test of the branch-comparison helper.

Two tiers: `gpu` (one process, one GPU) and `mpi and gpu` (every rank of `mpiexec -n 2`
on its own GPU; `make gpu-check` runs it when more than one GPU is visible). None of this
has run here: no machine that built this project had a GPU.
"""
import hashlib
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from engine.backend import get_backend, gpu_count
from engine.loss import softmax_cross_entropy
from engine.model import build_model
from engine.optimizer import make_optimizer
from engine.schedule import Coefficients
from numerics import norm_rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = get_backend("cpu")
# A hybrid step early in the warm-up: both the SGD and the RMSprop terms matter.
COEF = Coefficients(eta=0.05, a_sgd=0.3, a_rms=2e-3)
U32 = 2.0 ** -24        # float32 unit roundoff
U16 = 2.0 ** -11        # float16 unit roundoff


def _seed(comm=None):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    seed = comm.bcast(seed, root=0) if comm is not None else seed
    print(f"seed {seed}")
    return seed


# ---- one GPU ---------------------------------------------------------------------------------

def _branches(model, asnumpy):
    """After a training forward: the sign of every ReLU input by layer and the max-pool
    winners, on the host."""
    from test_torch_parity import _pool_winners
    signs = {bn.name: asnumpy(bn._y).ravel() > 0 for bn in model.batchnorms if bn.relu}
    signs.update({b.last_bn.name: asnumpy(b._y).ravel() > 0 for b in model.blocks})
    signs["maxpool"] = _pool_winners(asnumpy(model.bn1._y).reshape(model.maxpool._x.shape)).ravel()
    return signs


def differing_branches(a, b):
    """How many ReLU inputs or pool windows took a different branch in two forwards."""
    assert set(a) == set(b)
    return sum(int((a[k] != b[k]).sum()) for k in a)


def test_differing_branches_finds_a_relu_input_that_crossed_zero():
    """The helper the GPU test redraws with, on the CPU: one forward against itself has no
    differing branch; the same batch with one pixel nudged has some."""
    model = build_model("resnet18", 10, CPU, seed=3)
    x = np.random.default_rng().standard_normal((2, 32, 32, 3)).astype(np.float32)
    model.forward(x, train=True)
    first = _branches(model, np.asarray)
    model.forward(x, train=True)
    assert differing_branches(first, _branches(model, np.asarray)) == 0
    x[0, 5, 5, 0] += 1.0
    model.forward(x, train=True)
    assert differing_branches(first, _branches(model, np.asarray)) > 0


def _backward(be, model, logits, labels):
    _, dlogits = softmax_cross_entropy(logits, be.asarray(labels))
    model.backward(dlogits)
    return be.asnumpy(logits), be.asnumpy(model.grads)


@pytest.mark.gpu
def test_float32_training_step_on_the_gpu_equals_the_cpu_step():
    """ResNet-18, 64 px (a 2x2 last stage, so no batch norm over 4 values only), batch 4, the
    same weights and batch on both devices, drawn until both forwards took the same branch
    at every ReLU and pool window (one input within rounding of a kink flips its gradient
    and moves every gradient below it by ~1%: about one draw in six did).

    Tolerances, norm-wise: cuBLAS and OpenBLAS sum in different orders, as do the GPU's and
    hostmath's batch-norm reductions. A float32 dot product of length K differs by ~sqrt(K) u
    relative (K <= 3*3*512, so ~4e-6); batch norm renormalizes every layer, so the ~20
    layers add rather than multiply: ~2e-5 for the logits, bounded at 1e-4. Backward has
    twice the GEMMs and batch norm's backward subtracts means (cancellation): 1e-3 for the
    whole gradient, 1e-2 for any one tensor. An indexing or kernel defect is O(1). The
    update is compared on the SAME gradients (the GPU's) on both devices: the first hybrid
    step is close to sign(g) (RMSprop with m = (1-mu2) g^2), so gradient noise would flip
    the update of near-zero gradients. On equal inputs the fused kernel agrees with
    hostmath to float32 rounding: 1e-6 on the parameters; the update itself (after -
    before, ~1e-3 against weights ~0.1) carries one float32 rounding of the weight, ~4e-9,
    so up to ~1e-5 of it: bounded at 1e-4."""
    gpu = get_backend("gpu")
    for _ in range(20):
        rng = np.random.default_rng(_seed())
        x = rng.standard_normal((4, 64, 64, 3)).astype(np.float32)
        labels = rng.integers(0, 10, 4)
        cpu_model, gpu_model = (build_model("resnet18", 10, be, seed=3) for be in (CPU, gpu))
        np.testing.assert_array_equal(gpu.asnumpy(gpu_model.params), cpu_model.params)
        out_c = cpu_model.forward(x, train=True)
        out_g = gpu_model.forward(gpu.asarray(x), train=True)
        flips = differing_branches(_branches(cpu_model, np.asarray), _branches(gpu_model, gpu.asnumpy))
        print(f"{flips} ReLU inputs or pool windows took different branches")
        if flips == 0:
            break
    else:
        pytest.fail("20 draws in a row had a branch that differs between the devices")
    logits_c, grads_c = _backward(CPU, cpu_model, out_c, labels)
    logits_g, grads_g = _backward(gpu, gpu_model, out_g, labels)
    assert norm_rel_err(logits_g, logits_c) < 1e-4
    assert norm_rel_err(grads_g, grads_c) < 1e-3
    for slot in cpu_model.layout.slots:
        ref = grads_c[slot.offset:slot.stop]
        if np.any(ref):
            assert norm_rel_err(grads_g[slot.offset:slot.stop], ref) < 1e-2, slot.name

    cpu_model.grads[...] = grads_g
    cpu_opt = make_optimizer("hybrid", cpu_model.params, cpu_model.layout, CPU)
    gpu_opt = make_optimizer("hybrid", gpu_model.params, gpu_model.layout, gpu)
    before = cpu_model.params.copy()
    cpu_opt.step(cpu_model.grads, coef=COEF, grad_scale=0.5)
    gpu_opt.step(gpu_model.grads, coef=COEF, grad_scale=0.5)
    after_g = gpu.asnumpy(gpu_model.params)
    assert norm_rel_err(after_g - before, cpu_model.params - before) < 1e-4
    assert norm_rel_err(after_g, cpu_model.params) < 1e-6
    np.testing.assert_allclose(gpu_opt.state_dict()["m"], cpu_opt.state_dict()["m"], rtol=1e-5, atol=1e-30)


@pytest.mark.gpu
def test_train_on_one_gpu_runs_three_steps_with_finite_losses(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "engine.train", "--device", "gpu", "--max-steps", "3", "--arch", "resnet18",
           "--image-size", "32", "--batch-per-rank", "16", "--eval-every", "0", "--no-checkpoint",
           "--watchdog", "0", "--print-every", "1", "--log-dir", str(log)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "device gpu" in res.stdout, res.stdout
    losses = [float(v) for v in re.findall(r"step \d+/\d+ loss (\S+)", res.stdout)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), res.stdout
    rows = [json.loads(line) for line in open(log / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]


# ---- mpi and gpu: every rank on its own GPU, NCCL between them ------------------------------

@pytest.fixture(params=[pytest.param("self", id="one-rank"), pytest.param("world", id="world", marks=pytest.mark.mpi)])
def world(request):
    """MPI.COMM_SELF (one rank, one GPU: the gpu tier runs it) or the mpi tier's world."""
    if request.param == "self":
        from mpi4py import MPI
        return MPI.COMM_SELF
    return request.getfixturevalue("comm")


@pytest.fixture
def nccl(world):
    """(backend, NCCL communicator) of this rank; every rank of the node needs its own GPU."""
    comm = world
    from engine.comm import create_communicator
    if gpu_count() < comm.size:      # the same answer on every rank of one node
        pytest.skip(f"{comm.size} ranks need {comm.size} GPUs, {gpu_count()} visible")
    be = get_backend("gpu")
    c = create_communicator(be, comm)
    yield be, c
    c.close()


@pytest.mark.gpu
def test_nccl_allreduce_sums_random_data_as_numpy_does(world, nccl):
    """With one rank the sum is the input itself (bound 0: bit-exact), so it checks the
    offset slice, the stream order and the bytes outside the slice."""
    be, c = nccl
    comm = world
    base, n, off = _seed(comm), 1_000_003, 3
    data = np.stack([np.random.default_rng([base, r]).standard_normal(n).astype(np.float32)
                     for r in range(comm.size)])
    ref = data.astype(np.float64).sum(axis=0)
    # Each of the N-1 float32 additions along the ring rounds once: |err| <= (N-1) u sum|x_r|.
    bound = (comm.size - 1) * U32 * np.abs(data).astype(np.float64).sum(axis=0)
    buf = be.xp.array(data[comm.rank])                # a copy on the device
    c.allreduce_async(buf[off:], "sum").wait()        # a slice at an offset, as buckets are
    got = be.asnumpy(buf)                             # the compute stream waited for the sum
    assert np.all(np.abs(got[off:] - ref[off:]) <= bound[off:])
    np.testing.assert_array_equal(got[:off], data[comm.rank, :off])       # outside the slice
    assert len(set(comm.allgather(hashlib.sha256(got[off:].tobytes()).hexdigest()))) == 1


@pytest.mark.gpu
def test_reducer_fp16_on_nccl_within_its_stated_tolerance(world, nccl):
    """engine/reducer.py: relative to the float32 sum, 1 cast + (N-1) float16 roundings on
    NCCL, plus float16's subnormal spacing below 6e-5 (in scaled units)."""
    from engine.reducer import Reducer
    be, c = nccl
    comm = world
    base, scale = _seed(comm), 64.0
    layout = build_model("resnet18", 10, CPU).layout
    mine = [1e-3 * np.random.default_rng([base, r]).standard_normal(layout.total).astype(np.float32)
            for r in range(comm.size)]
    grads = layout.alloc(be.xp)
    grads[...] = be.asarray(mine[comm.rank])
    reducer = Reducer(layout, grads, c, bucket_mb=1.0, first_bucket_mb=0.25, fp16=True, fp16_scale=scale)
    stops = [s.offset for s in layout.slots[1:]] + [layout.total]
    for slot, stop in zip(layout.slots, stops):
        reducer.grad_ready(slot.offset, stop)
    reducer.finish()
    got = be.asnumpy(reducer.reduced).astype(np.float64) / scale
    ref = np.sum(mine, axis=0, dtype=np.float64)
    bound = comm.size * U16 * np.sum(np.abs(mine), axis=0, dtype=np.float64) + comm.size * 2.0 ** -25 / scale
    assert np.all(np.abs(got - ref) <= bound)
    assert norm_rel_err(got, ref) > 1e-6, "float32-exact sums: were the buckets really sent as float16?"
    assert len(set(comm.allgather(hashlib.sha256(be.asnumpy(reducer.reduced).tobytes()).hexdigest()))) == 1


@pytest.mark.gpu
@pytest.mark.mpi
def test_two_training_steps_on_two_gpus_leave_equal_parameters(comm, tmp_path, monkeypatch):
    """The real Trainer on NCCL (the reducer, the one-step-late stats on their side stream):
    every rank ends with the same parameters, rank 0 logs finite losses."""
    from engine.train import Trainer, parse_args
    nccl_ranks = gpu_count()
    if nccl_ranks < comm.size:
        pytest.skip(f"{comm.size} ranks need {comm.size} GPUs, {nccl_ranks} visible")
    root = comm.bcast(str(tmp_path), root=0)
    monkeypatch.chdir(root)                 # any default run or log directory lands here
    trainer = Trainer(parse_args(["--device", "gpu", "--arch", "resnet18", "--image-size", "32",
                                  "--batch-per-rank", "16", "--max-steps", "2", "--eval-every", "0",
                                  "--no-checkpoint", "--watchdog", "0", "--log-dir", f"{root}/log"]))
    try:
        before = np.array(trainer.backend.asnumpy(trainer.model.params))
        trainer.run()
        after = trainer.backend.asnumpy(trainer.model.params)
    finally:
        trainer.close()
    assert not np.array_equal(after, before)
    digests = comm.allgather(hashlib.sha256(after.tobytes()).hexdigest())
    assert len(set(digests)) == 1, f"parameters differ between ranks: {digests}"
    if comm.rank == 0:
        rows = [json.loads(line) for line in open(f"{root}/log/metrics.jsonl")]
        train = [r for r in rows if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    comm.Barrier()
    assert trainer.backend.is_gpu


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_a_cudnn_step_equals_the_im2col_step_within_the_precisions_bound(precision):
    """ResNet-18, 64 px, batch 8 on one GPU: the same weights and batch with the convolutions
    through cuDNN (every shape self-checked, none may fall back) and by im2col. fp32: the
    gradients agree within float32 roundoff of two summation orders (1e-3 norm-wise, as for
    GPU against CPU above). tf32 and bf16 round operands (tf32) or activations (bf16) in
    different places in the two paths, and batch norm amplifies what a rounding moves; so
    each is held against the fp32 im2col step: cuDNN's step no further from it than the
    im2col step of the same precision, per weight tensor (x1.5, as the stand-in test of
    tests/test_conv_routing.py holds bf16; a wrong descriptor errs by O(1))."""
    from engine.cudnn_conv import route_convolutions
    gpu = get_backend("gpu")
    rng = np.random.default_rng(_seed())
    x = rng.standard_normal((8, 64, 64, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 8)

    def grads(p, conv):
        model = build_model("resnet18", 10, gpu, seed=3, precision=p)
        convs = route_convolutions(model.convs, p, 64 << 20) if conv == "cudnn" else None
        _, g = _backward(gpu, model, model.forward(gpu.asarray(x.astype(model.input_dtype)), train=True), labels)
        assert convs is None or not convs.fallback, convs.fallback
        return g, model.layout
    ref, layout = grads("fp32", "im2col")
    im2col, cudnn = grads(precision, "im2col")[0], grads(precision, "cudnn")[0]
    if precision == "fp32":
        assert norm_rel_err(cudnn, im2col) < 1e-3
        return
    for slot in layout.slots:
        s = slice(slot.offset, slot.stop)
        if np.any(ref[s]):
            assert norm_rel_err(cudnn[s], ref[s]) <= 1.5 * norm_rel_err(im2col[s], ref[s]) + 1e-3, slot.name
