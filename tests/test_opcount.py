"""The device operations of one GPU training step, counted on the stand-in CuPy of
tests/gpu_standins.py (bench/opcount.py tabulates them): what each layer may launch.

Each fused path is one launch per call; a regression to CuPy's multi-pass code (a padded
copy, K*K strided accumulations, a mask and a multiply) shows up here as extra copies,
fills or elementwise kernels from that layer."""
import collections
import sys
from pathlib import Path

import pytest

import gpu_standins

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import opcount  # noqa: E402


@pytest.fixture(scope="module")
def step():
    """(trainer, ops of the second step's train_step and submit) of ResNet-18, 32 px, 2 images."""
    with pytest.MonkeyPatch.context() as mp:
        trainer = gpu_standins.trainer_on_standins(mp, ["--arch", "resnet18", "--image-size", "32",
                                                        "--batch-per-rank", "2"])
        try:
            yield trainer, opcount.count_step(trainer, warmup=1)
        finally:
            trainer.close()


def _by_layer(ops):
    count = collections.defaultdict(collections.Counter)
    for o in ops:
        count[o.where][o.kind] += 1
    return count


def test_a_step_never_waits_for_the_device(step):
    _, ops = step
    assert not [o for o in ops if o.kind in ("sync", "d2h")]


def test_each_layer_launches_only_its_fused_kernels_and_gemms(step):
    trainer, ops = step
    model, count = trainer.model, _by_layer(ops)
    bns = len(model.batchnorms)
    from engine.layers import Conv2d
    convs = [conv for block in model.blocks for conv in block.param_layers() if isinstance(conv, Conv2d)]
    convs.append(model.conv1)
    gathered = [c for c in convs if not c.is_pointwise]
    # BN: 2 kernels forward (statistics, apply), 2 backward (sums, dx); statistics and
    # dgamma, dbeta written in place by the kernels, nothing else.
    assert count["BatchNorm"] == {"kernel": 4 * bns}
    assert count["MaxPool"] == {"kernel": 2}
    # A residual block: nothing of its own. The sum and its ReLU are in the last BN's apply
    # kernel, their gradient in a BN's reduce kernel; the two input gradients meet in the
    # first conv (in its GEMM for a 1x1, one add otherwise).
    assert "ResidualBlock" not in count
    # A conv: one GEMM forward, dW and dx backward (the stem's dx is not needed); an im2col
    # launch forward and again in backward for each gathered conv, plus col2im for its dx.
    conv = count["Conv2d"]
    assert conv["gemm"] == 3 * len(convs) - 1
    assert conv["kernel"] == 3 * len(gathered) - 1
    # The branches' sum: an add after a 3x3 first conv (ResNet-18's), none after a 1x1.
    assert conv["elementwise"] == sum(not block.main[0].is_pointwise for block in model.blocks)
    assert set(conv) <= {"gemm", "kernel", "elementwise"}
    # No allocation in any layer: every buffer is reused from the previous step.
    assert not [o for o in ops if o.kind == "alloc" and o.where in ("BatchNorm", "MaxPool", "Conv2d", "ResidualBlock")]


def test_the_loss_and_top1_are_two_fused_launches(step):
    """kernels/softmax_xent.cu: rows, then the batch sums; allocated are only dlogits
    and the buffer of the loss, the hit count and the per-row partials. The step itself
    (train) only copies the batch in: the top-1 count comes with the loss."""
    _, ops = step
    count = _by_layer(ops)
    assert count["loss"] == {"kernel": 2, "alloc": 2}
    assert [o.name for o in ops if o.where == "loss" and o.kind == "kernel"] == [
        "softmax_xent.cu:softmax_xent_rows", "softmax_xent.cu:softmax_xent_reduce"]
    assert count["train"] == {"h2d": 2, "alloc": 2}


def test_the_bench_runs_without_pytest_and_undoes_its_patches(capsys):
    """bench/opcount.py patches through gpu_standins.Patches (README runs it after the core
    install, which has no pytest) and leaves CuPy's module slot and the engine as they were."""
    import sys as _sys
    from engine import cuda_ops, gemm
    before = (_sys.modules.get("cupy"), cuda_ops._launch, gemm._cublas_matmul)
    assert opcount.main(["--arch", "resnet18", "--image-size", "32", "--batch", "2"]) == 0
    assert "device operations:" in capsys.readouterr().out
    assert (_sys.modules.get("cupy"), cuda_ops._launch, gemm._cublas_matmul) == before
