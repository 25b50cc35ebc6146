"""--cuda-graph on the stand-in CuPy of tests/gpu_standins.py, whose Graph replays the
logged operations on the same buffers, and whose kernels are the unchanged .cu files run on
the host (tests/kernel_emulation.py): a graph that missed an operation, captured a host value
that changes per step, or read a buffer that was reallocated would train differently."""
import numpy as np
import pytest

import gpu_standins
from engine.graph_step import WARMUP_STEPS

ARGV = ["--arch", "resnet18", "--image-size", "32", "--batch-per-rank", "2", "--max-steps", "6"]
STEPS = WARMUP_STEPS + 2


def _train(monkeypatch, extra, steps=STEPS):
    """(trainer, losses, ops of each train_step) over `steps` steps."""
    trainer = gpu_standins.trainer_on_standins(monkeypatch, ARGV + extra, gpu_standins.emulated_launch)
    try:
        steps = gpu_standins.run_steps(trainer, steps, read_loss=True)
    finally:
        trainer.close()
    return trainer, [loss for _, _, loss in steps], [ops for ops, _, _ in steps]


@pytest.mark.slow
def test_graph_replays_train_exactly_as_eager_steps(monkeypatch):
    with monkeypatch.context() as m:
        eager, eager_losses, _ = _train(m, [])
    graphed, losses, ops = _train(monkeypatch, ["--cuda-graph"])
    assert graphed.graphed.graph is not None and graphed.graphed.graph.launches == STEPS - WARMUP_STEPS
    assert losses == eager_losses
    np.testing.assert_array_equal(gpu_standins._np(graphed.model.params), gpu_standins._np(eager.model.params))
    state = graphed.optimizer.state
    for name, buf in eager.optimizer.state.items():
        np.testing.assert_array_equal(gpu_standins._np(state[name]), gpu_standins._np(buf))

    warmup, capture, replays = ops[WARMUP_STEPS - 1], ops[WARMUP_STEPS], ops[WARMUP_STEPS + 1:]
    captured = [o for o in capture if o.capturing]
    # The capture holds the step the eager warm-up ran, operation for operation, except the
    # scalars' host-to-device copy, which prepare() does before it, and the batch's copies.
    assert [(o.kind, o.name) for o in captured] == \
        [(o.kind, o.name) for o in warmup if o.kind != "h2d"]
    assert not [o for o in captured if o.kind in ("h2d", "d2h", "sync")]
    # What the capture allocates comes from the graph's own pool, never CuPy's shared one.
    allocs = [o for o in captured if o.kind == "alloc"]
    assert allocs and all(o.pool is graphed.graphed.pool for o in allocs)
    # A replayed step: the batch and the changed scalars copied in, one graph launch, nothing else.
    for step in replays:
        assert [o.kind for o in step] == ["h2d", "h2d", "h2d", "graph"], step
        assert not any(o.capturing for o in step)


def test_cuda_graph_is_refused_where_it_cannot_run(capsys):
    from engine.train import parse_args
    for argv, says in ((["--device", "cpu", "--cuda-graph"], "--cuda-graph needs a GPU"),
                       (["--cuda-graph", "--trace", "t.json"], "--cuda-graph cannot be traced")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert says in capsys.readouterr().err


def test_a_batch_of_another_shape_is_refused(monkeypatch):
    from types import SimpleNamespace
    from engine.backend import Backend
    from engine.graph_step import GraphedStep
    cupy = gpu_standins.install(monkeypatch)
    step = GraphedStep(Backend("gpu", cupy, 0), lambda images, labels, coef: (images, labels), None, 1.0)
    batch = SimpleNamespace(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.arange(2))
    step(batch, None)
    with pytest.raises(ValueError, match=r"fixed shapes"):
        step(SimpleNamespace(images=np.zeros((1, 4, 4, 3), np.uint8), labels=np.arange(1)), None)
