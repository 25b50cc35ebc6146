"""BN statistics all-reduced over ranks equal the statistics of the concatenated batch.

The ranks hold DIFFERENT batch sizes, so averaging means and variances (instead of
combining them) fails, and the means sit far from zero against the spread, so E[x^2]-mean^2
in float32 fails too."""
from types import SimpleNamespace

import numpy as np
import pytest

from engine import hostmath
from engine.backend import get_backend
from engine.bn_sync import allreduce_bn_stats
from engine.comm import create_communicator


@pytest.fixture
def engine_comm(comm):
    c = create_communicator(get_backend("cpu"), comm)
    yield c
    c.close()


def fake_bn(x2d):
    """An object with the contract's attributes, after a training forward over x2d."""
    C = x2d.shape[1]
    _, mean, var, _ = hostmath.bn_train_forward(x2d, np.ones(C, np.float32), np.zeros(C, np.float32), 1e-5, False)
    return SimpleNamespace(batch_mean=mean, batch_var=var, batch_count=x2d.shape[0],
                           eval_mean=mean.copy(), eval_var=var.copy())


def shared_seed(comm):
    return comm.bcast(int(np.random.SeedSequence().entropy % 2**32) if comm.rank == 0 else None, root=0)


@pytest.mark.mpi
def test_union_statistics_with_unequal_batches(comm, engine_comm):
    assert comm.size >= 2
    seed = shared_seed(comm)
    rng = np.random.default_rng(seed)
    channels = (3, 16, 7)
    rows = [int(rng.integers(5, 40)) * (r + 1) ** 2 for r in range(comm.size)]  # very unequal
    # Every rank draws every rank's data (same seed) to build the reference itself.
    data = [[(rng.uniform(-300, 300, C) + rng.standard_normal((n, C)) * rng.uniform(0.2, 2, C))
             .astype(np.float32) for C in channels] for n in rows]
    model = SimpleNamespace(batchnorms=[fake_bn(x) for x in data[comm.rank]])
    allreduce_bn_stats(model, engine_comm)
    for layer, bn in enumerate(model.batchnorms):
        union = np.concatenate([data[r][layer] for r in range(comm.size)]).astype(np.float64)
        ref_mean, ref_var = union.mean(0), union.var(0)
        assert np.max(np.abs(bn.eval_mean - ref_mean) / (np.abs(ref_mean) + 1)) < 1e-5
        assert np.max(np.abs(bn.eval_var - ref_var) / ref_var) < 1e-4, (seed, layer)
        # The batch statistics themselves are untouched.
        np.testing.assert_array_equal(bn.batch_mean, fake_bn(data[comm.rank][layer]).batch_mean)
        # Sensitivity: a plain average over ranks is far off with these batch sizes.
        naive_var = np.mean([d[layer].astype(np.float64).var(0) for d in data], axis=0)
        naive_var += np.var([d[layer].astype(np.float64).mean(0) for d in data], axis=0)
        assert np.max(np.abs(naive_var - ref_var) / ref_var) > 1e-3


@pytest.mark.mpi
def test_real_model_batchnorms(comm, engine_comm):
    """On the model itself: the stem BN's synced statistics equal a forward of the union batch."""
    from engine.model import build_model
    assert comm.size >= 2
    be = get_backend("cpu")
    seed = shared_seed(comm)
    rng = np.random.default_rng(seed)
    sizes = [1 + 2 * r for r in range(comm.size)]
    images = [rng.standard_normal((n, 32, 32, 3)).astype(np.float32) + 0.5 for n in sizes]
    model = build_model("resnet18", 10, be, seed=1)
    model.forward(images[comm.rank], train=True)
    allreduce_bn_stats(model, engine_comm)
    synced = [(bn.eval_mean.copy(), bn.eval_var.copy()) for bn in model.batchnorms]
    # Every rank ends with the same statistics in every layer.
    gathered = comm.allgather([np.concatenate(s) for s in synced])
    for other in gathered:
        for a, b in zip(other, gathered[0]):
            np.testing.assert_array_equal(a, b)
    # The stem BN sees conv1(x), a per-image function: its union statistics are those of
    # one forward over the concatenated batch.
    model.forward(np.concatenate(images), train=True)
    stem = model.batchnorms[0]
    mean, var = synced[0]
    np.testing.assert_allclose(mean, stem.batch_mean, rtol=1e-4, atol=1e-5 * float(np.abs(stem.batch_mean).max()))
    np.testing.assert_allclose(var, stem.batch_var, rtol=1e-4)


class LocalComm:
    """A one-rank communicator: the sum over ranks is the buffer itself."""

    def allreduce(self, buf, op="sum"):
        return buf


def test_one_rank_keeps_its_statistics_and_empty_layers_are_named():
    rng = np.random.default_rng()
    x = (rng.standard_normal((50, 8)) * 3 + 40).astype(np.float32)
    bn = fake_bn(x)
    bn.eval_mean[...] = 0
    bn.eval_var[...] = 1
    allreduce_bn_stats(SimpleNamespace(batchnorms=[bn]), LocalComm())
    np.testing.assert_allclose(bn.eval_mean, x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(bn.eval_var, x.astype(np.float64).var(0), rtol=1e-4)
    untrained = SimpleNamespace(name="layer1.0.bn1", batch_mean=np.zeros(4, np.float32),
                                batch_var=np.ones(4, np.float32), batch_count=0,
                                eval_mean=np.zeros(4, np.float32), eval_var=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="layer1.0.bn1"):
        allreduce_bn_stats(SimpleNamespace(batchnorms=[untrained]), LocalComm())
