"""engine.parallel.Team: chunking, concurrency, errors; and a model split over a Team
computes what the same model computes on one thread."""
import threading
import time

import numpy as np
import pytest

from engine.backend import get_backend
from engine.loss import softmax_cross_entropy
from engine.model import build_model
from engine.parallel import SERIAL, Team


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print("seed", seed)
    return np.random.default_rng(seed)


@pytest.mark.parametrize("n,grain,threads", [(1000, 1, 2), (1000, 64, 3), (130, 64, 4), (5, 1, 8), (64, 64, 2)])
def test_chunks_tile_the_range_at_grain_multiples(n, grain, threads):
    bounds = Team(threads, min_split=1).chunks(n, grain)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))
    assert all(lo < hi for lo, hi in bounds)
    assert len(bounds) == min(threads, -(-n // grain))
    assert all(lo % grain == 0 for lo, _ in bounds)


def test_small_operations_stay_on_one_thread():
    team = Team(4, min_split=1000)
    assert team.chunks(999) == [(0, 999)]
    assert team.chunks(10, size=1000) != [(0, 10)]
    assert SERIAL.chunks(10**9) == [(0, 10**9)]
    with pytest.raises(ValueError, match="at least one thread"):
        Team(0)


def test_map_runs_the_chunks_at_the_same_time_and_keeps_their_order():
    team = Team(3, min_split=1)
    meet = threading.Barrier(3, timeout=10)     # breaks unless all three chunks run at once
    threads = set()

    def chunk(lo, hi):
        threads.add(threading.get_ident())
        meet.wait()
        return list(range(lo, hi))
    parts = team.map(chunk, 7)
    assert sum(parts, []) == list(range(7))
    assert len(threads) == 3 and threading.get_ident() in threads


@pytest.mark.parametrize("failing", [0, 2])     # a worker's chunk, the caller's chunk
def test_an_error_is_raised_after_every_chunk_has_finished(failing):
    team = Team(3, min_split=1)
    finished = []

    def chunk(lo, hi):
        if lo == failing:
            raise RuntimeError(f"chunk {lo} failed")
        time.sleep(0.05)
        finished.append(lo)
    with pytest.raises(RuntimeError, match=f"chunk {failing} failed"):
        team.map(chunk, 3)
    assert sorted(finished) == sorted({0, 1, 2} - {failing})
    assert team.map(lambda lo, hi: hi - lo, 3) == [1, 1, 1]     # still usable


def _step(model, x, labels):
    logits = model.forward(x, train=True).copy()
    _, dlogits = softmax_cross_entropy(logits, labels, 0.1)
    model.backward(dlogits)
    return logits, model.grads.copy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_model_split_over_a_team_computes_what_one_thread_computes(rng, dtype):
    """Every split path (padding, im2col, col2im, max pool, BN, add+ReLU) on 3 threads,
    with odd chunk sizes. float64 runs NumPy code that is elementwise per image, so the
    split is exact; float32 BN sums per-thread partials in another order (float64 sums)."""
    x = rng.standard_normal((5, 40, 36, 3)).astype(dtype)
    labels = rng.integers(0, 10, 5)
    model = build_model("resnet18", 10, get_backend("cpu"), dtype=dtype, threads=1)
    ref_logits, ref_grads = _step(model, x, labels)
    model.ws.team = Team(3, min_split=1)
    logits, grads = _step(model, x, labels)
    if dtype == np.float64:
        np.testing.assert_array_equal(logits, ref_logits)
        np.testing.assert_array_equal(grads, ref_grads)
    else:
        assert np.linalg.norm(logits - ref_logits) < 1e-6 * np.linalg.norm(ref_logits)
        assert np.linalg.norm(grads - ref_grads) < 1e-5 * np.linalg.norm(ref_grads)
