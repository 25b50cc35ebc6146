"""engine.hostmath (the host build of kernels/recipe_math.cuh) against plain float64 NumPy."""
import numpy as np
import pytest

from engine import hostmath
from engine.parallel import Team
from numerics import assert_close
import kernel_reference as reference

# How the BN and ReLU loops are run: on this thread, or split over 3 threads in chunks
# of 64 rows (every split taken, however small the array).
RUNS = {"serial": hostmath.serial, "3 threads": Team(3, min_split=1).map}

SEED = np.random.SeedSequence().entropy % 2**32
print(f"test_hostmath seed {SEED}")


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


# The updates' float32 error is relative to their terms (w, g and the step are O(1)), not to
# a d or w that cancels to near zero: hence atol 1e-5 next to rtol 1e-5 below.
def random_state(rng, n):
    w = rng.standard_normal(n).astype(np.float32)
    d = (0.01 * rng.standard_normal(n)).astype(np.float32)
    m = (1e-3 * rng.random(n)).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32) * 64.0   # a loss-scaled gradient sum
    mask = (rng.random(n) < 0.7).astype(np.uint8)
    return w, d, m, g, mask


@pytest.mark.parametrize("gdtype", [np.float32, np.float16])
@pytest.mark.parametrize("with_mask", [True, False])
def test_hybrid_update_matches_float64(rng, gdtype, with_mask):
    n = 4099  # not a multiple of any vector width
    w, d, m, g, mask = random_state(rng, n)
    g = g.astype(gdtype)
    hp = dict(eta=0.8, a_sgd=float(rng.uniform(0.1, 0.9)), a_rms=float(rng.uniform(0.01, 0.5)),
              mu1=0.9, mu2=0.99, eps=1e-8, wd=5e-4, gscale=1 / 64.0)
    decay = mask.astype(np.float64) if with_mask else 1.0
    ref_w, ref_d, ref_m = reference.hybrid_update(w, d, m, g, decay, **hp)
    hostmath.hybrid_update(w, d, m, g, mask if with_mask else None, **hp)
    assert_close(m, ref_m, rtol=1e-5, atol=1e-9)
    assert_close(d, ref_d, rtol=1e-5, atol=1e-5)
    assert_close(w, ref_w, rtol=1e-5, atol=1e-5)


def test_sgd_update_matches_float64(rng):
    n = 1000
    w, d, _, g, mask = random_state(rng, n)
    eta, mu1, wd, gscale = 3.2, 0.9, 1e-4, 1 / 64.0
    ref_w, ref_d, _ = reference.hybrid_update(w, d, np.zeros(n), g, mask.astype(np.float64), eta, 1.0, 0.0,
                                       mu1, 0.0, 0.0, wd, gscale)
    hostmath.sgd_update(w, d, g, mask, eta, mu1, wd, gscale)
    assert_close(d, ref_d, rtol=1e-5, atol=1e-5)
    assert_close(w, ref_w, rtol=1e-5, atol=1e-5)


def test_fp16_gradients_are_read_exactly(rng):
    """The header's own binary16 decoder, subnormals, infinities and signed zeros included."""
    bits = np.arange(0, 2**16, dtype=np.uint16)
    halves = bits.view(np.float16)
    finite = np.isfinite(halves)
    w = np.zeros(bits.size, np.float32)
    d = np.zeros(bits.size, np.float32)
    # With mu1 = 0, eta = 1, gscale = -1: w = 0 + 1 * (0 - (-1 * g)) = g exactly.
    hostmath.sgd_update(w, d, halves, None, 1.0, 0.0, 0.0, -1.0)
    np.testing.assert_array_equal(w[finite], halves[finite].astype(np.float32))
    assert np.all(np.isinf(w[np.isinf(halves)]))
    assert np.all(np.isnan(w[np.isnan(halves)]))


def test_update_works_on_a_flat_range(rng):
    """Updating [start, stop) of the flat buffers leaves the rest untouched."""
    n, start, stop = 512, 128, 320
    w, d, m, g, mask = random_state(rng, n)
    w0 = w.copy()
    hp = dict(eta=0.5, a_sgd=0.5, a_rms=0.1, mu1=0.9, mu2=0.99, eps=1e-8, wd=0.0, gscale=1.0)
    ref_w, _, _ = reference.hybrid_update(w[start:stop], d[start:stop], m[start:stop], g[start:stop], 1.0, **hp)
    hostmath.hybrid_update(w[start:stop], d[start:stop], m[start:stop], g[start:stop], None, **hp)
    assert_close(w[start:stop], ref_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(w[:start], w0[:start])
    np.testing.assert_array_equal(w[stop:], w0[stop:])


def bn_backward_reference(dy, x, gamma, eps, relu):
    """The gradients from float64 statistics of x (not from those the kernel saved)."""
    y, mean, var = reference.bn_train_forward(x, gamma, 0.0, eps, relu)
    return reference.bn_backward(dy, x, y, gamma, mean, 1 / np.sqrt(var + eps), relu)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("relu", [False, True])
def test_bn_train_forward_matches_float64(rng, relu, run):
    rows, C = 4 * 7 * 7, 40
    # A large offset relative to the spread: a naive E[x^2]-E[x]^2 in float32 would fail here.
    x = (1000.0 + rng.standard_normal((rows, C)) * rng.uniform(0.1, 3, C)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    out = np.empty_like(x)
    y, mean, var, inv_std = hostmath.bn_train_forward(x, gamma, beta, 1e-5, relu, out, RUNS[run])
    assert y is out
    ref_y, ref_mean, ref_var = reference.bn_train_forward(x, gamma, beta, 1e-5, relu)
    assert_close(mean, ref_mean, rtol=1e-6, atol=0)
    assert_close(var, ref_var, rtol=1e-3, atol=0)
    assert_close(inv_std, 1 / np.sqrt(ref_var + 1e-5), rtol=1e-3, atol=0)
    assert_close(y, ref_y, rtol=0, atol=5e-3)
    if relu:
        assert np.all(y >= 0) and np.any(y == 0)


@pytest.mark.parametrize("run", RUNS)
def test_bn_adds_eps_to_a_variance_close_to_it(rng, run):
    """Channels whose variance spans eps = 1e-5 (1e-8 to 1e-3): a kernel that left eps out,
    or added it elsewhere, normalizes the small ones to unit variance instead of shrinking them."""
    rows, C, eps = 6 * 6 * 4, 32, 1e-5
    std = np.logspace(-4, -1.5, C)
    x = (0.25 + rng.standard_normal((rows, C)) * std).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32) * 0.1
    dy = rng.standard_normal((rows, C)).astype(np.float32)
    y, mean, var, inv_std = hostmath.bn_train_forward(x, gamma, beta, eps, False, None, RUNS[run])
    ref_y, _, ref_var = reference.bn_train_forward(x, gamma.astype(np.float64), beta, eps, False)
    assert_close(inv_std, 1 / np.sqrt(ref_var + eps), rtol=1e-3, atol=0)
    assert_close(y, ref_y, rtol=1e-3, atol=1e-4)
    ref_dx, ref_dgamma, _ = bn_backward_reference(dy, x, gamma.astype(np.float64), eps, False)
    dx, dgamma, _ = hostmath.bn_backward(dy, x, y, gamma, mean, inv_std, False, None, RUNS[run])
    assert_close(dgamma, ref_dgamma, rtol=1e-3, atol=1e-3)
    assert_close(dx, ref_dx, rtol=1e-3, atol=1e-3 * np.abs(ref_dx).max())
    infer = hostmath.bn_infer_forward(x, gamma, beta, mean, var, eps, False)
    assert_close(infer, ref_y, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("relu", [False, True])
def test_bn_backward_matches_float64(rng, relu, run):
    rows, C = 9 * 5 * 5, 24
    x = (rng.standard_normal((rows, C)) * 2 + 0.5).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = np.zeros(C, np.float32)
    dy = rng.standard_normal((rows, C)).astype(np.float32)
    y, mean, _, inv_std = hostmath.bn_train_forward(x, gamma, beta, 1e-5, relu)
    ref_dx, ref_dgamma, ref_dbeta = bn_backward_reference(dy, x, gamma.astype(np.float64), 1e-5, relu)
    # dx written over dy itself, as the model does with a gradient it consumes
    dx, dgamma, dbeta = hostmath.bn_backward(dy, x, y, gamma, mean, inv_std, relu, dy, RUNS[run])
    assert dx is dy
    assert_close(dbeta, ref_dbeta, rtol=1e-5, atol=1e-5)
    assert_close(dgamma, ref_dgamma, rtol=1e-5, atol=1e-5)
    assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)


def test_bn_infer_forward_uses_given_statistics(rng):
    rows, C = 50, 16
    x = rng.standard_normal((rows, C)).astype(np.float32)
    gamma, beta, mean = (rng.standard_normal(C).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.5, 2.0, C).astype(np.float32)
    y = hostmath.bn_infer_forward(x, gamma, beta, mean, var, 1e-5, True)
    ref = np.maximum((x - mean.astype(np.float64)) / np.sqrt(var.astype(np.float64) + 1e-5) * gamma + beta, 0)
    assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("run", RUNS)
def test_add_relu_and_its_gradient_match_numpy(rng, run):
    n = 5000
    y, s, dy = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    y[:3], s[:3], dy[3:6] = [np.nan, 1, -1], [0, np.nan, -1], [np.nan, np.inf, np.nan]
    ref = np.maximum(y + s, 0)           # NaN in, NaN out: the loss must see it
    got = hostmath.add_relu_(y.copy(), s, RUNS[run])
    np.testing.assert_array_equal(got, ref)
    assert np.isnan(got[:2]).all()
    with np.errstate(invalid="ignore"):                  # inf * 0 in the reference: NaN, wanted
        ref_grad = dy * (got > 0)
    np.testing.assert_array_equal(hostmath.relu_grad_(dy.copy(), got, RUNS[run]), ref_grad)


def test_windowed_loops_refuse_shapes_their_windows_do_not_give():
    """The C loops take the output size from y and index the input through each window:
    a y of another size, or pool padding that leaves a window without an input element,
    is refused before they run."""
    x = np.zeros((2, 9, 8, 3), np.float32)
    with pytest.raises(ValueError, match="9x8 with k=3 s=2 p=1 gives 5x4, y is 6x4"):
        hostmath.maxpool_forward(x, np.zeros((2, 6, 4, 3), np.float32), 3, 2, 1)
    with pytest.raises(ValueError, match="need p < k"):
        hostmath.maxpool_backward(x, np.zeros((2, 9, 8, 3), np.float32), x.copy(), 1, 1, 1)
    with pytest.raises(ValueError, match="im2col: 9x8 with k=3 s=1 p=1 gives 9x8, y is 9x7"):
        hostmath.im2col(x, np.zeros((2, 9, 7, 3, 3, 3), np.float32), 3, 1, 1)


def test_bad_input_is_named():
    w = np.zeros(8, np.float32)
    with pytest.raises(TypeError, match="hostmath: d must be float32"):
        hostmath.sgd_update(w, np.zeros(8, np.float64), w.copy(), None, 1.0, 0.9, 0.0, 1.0)
    with pytest.raises(ValueError, match="hostmath: g has 4 elements, expected 8"):
        hostmath.sgd_update(w, w.copy(), np.zeros(4, np.float32), None, 1.0, 0.9, 0.0, 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        hostmath.hybrid_update(w, w.copy(), w.copy(), np.zeros(16, np.float32)[::2], None,
                               1.0, 0.5, 0.1, 0.9, 0.99, 1e-8, 0.0, 1.0)
