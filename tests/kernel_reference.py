"""The kernels' computations in float64 NumPy: the references that engine.hostmath
(tests/test_hostmath.py), the emulated kernels (tests/test_kernels_emulated.py) and the CUDA
kernels (tests/test_kernels_gpu.py) are checked against, written independently of
kernels/recipe_math.cuh, which all three share. (The loss has its own, with its error
bounds: tests/softmax_xent_reference.py.)"""
import numpy as np


def hybrid_update(w, d, m, g, decay, eta, a_sgd, a_rms, mu1, mu2, eps, wd, gscale):
    """The hybrid RMSprop-to-SGD update (docs/recipe.md): no bias correction, eps outside the
    root; `decay` (0/1 per element, or 1.0) selects the weights weight decay applies to.
    Returns the new (w, d, m)."""
    w, d, m, g = (np.asarray(a, np.float64) for a in (w, d, m, g))
    g = g * gscale + wd * decay * w
    m = mu2 * m + (1 - mu2) * g * g
    d = mu1 * d - (a_sgd + a_rms / (np.sqrt(m) + eps)) * g
    return w + eta * d, d, m


def bn_train_forward(x, gamma, beta, eps, relu):
    """Batch norm of (rows, C) with this batch's statistics: (y, mean, var), var biased."""
    x = np.asarray(x, np.float64)
    mean = x.mean(0) if len(x) else np.zeros(x.shape[1])
    var = x.var(0) if len(x) else np.zeros(x.shape[1])
    y = (x - mean) / np.sqrt(var + eps) * gamma + beta
    return (np.maximum(y, 0) if relu else y), mean, var


def bn_backward(dy, x, y, gamma, mean, inv_std, relu):
    """Gradients of bn_train_forward from the statistics forward saved (mean, inv_std), the
    ReLU mask taken from its output y: (dx, dgamma, dbeta)."""
    dy, x = np.asarray(dy, np.float64), np.asarray(x, np.float64)
    g = np.where(np.asarray(y) > 0, dy, 0.0) if relu else dy
    xhat = (x - np.asarray(mean, np.float64)) * np.asarray(inv_std, np.float64)
    rows = max(len(x), 1)
    dbeta, dgamma = g.sum(0), (g * xhat).sum(0)
    dx = np.asarray(gamma, np.float64) * inv_std * (g - dbeta / rows - xhat * dgamma / rows)
    return dx, dgamma, dbeta


# ---- windows: im2col, col2im, max pool ---------------------------------------------

def out_hw(h, w, k, s, p):
    """The output height and width of a k x k window at stride s over an h x w input padded by p."""
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def windows_of(a, k, s, ho, wo):
    """(kh, kw, view of the padded `a` under that kernel position) for every position, in order."""
    return [(kh, kw, a[:, kh:kh + s * (ho - 1) + 1:s, kw:kw + s * (wo - 1) + 1:s, :])
            for kh in range(k) for kw in range(k)]


def im2col(x, k, s, p):
    """The (N, Ho, Wo, k, k, C) patches of NHWC x zero-padded by p, in float64."""
    x = np.asarray(x, np.float64)
    ho, wo = out_hw(x.shape[1], x.shape[2], k, s, p)
    xpad = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    col = np.empty((x.shape[0], ho, wo, k, k, x.shape[3]))
    for kh, kw, win in windows_of(xpad, k, s, ho, wo):
        col[:, :, :, kh, kw, :] = win
    return col


def scatter(parts, shape, k, s, p):
    """sum over (kh, kw) of parts(kh, kw) (N, Ho, Wo, C), each added at the input positions its
    window position covers (padding dropped), in float64; and the sum of their |values|."""
    n, h, w, c = shape
    ho, wo = out_hw(h, w, k, s, p)
    total, absum = np.zeros((n, h + 2 * p, w + 2 * p, c)), np.zeros((n, h + 2 * p, w + 2 * p, c))
    for (kh, kw, t), (_, _, a) in zip(windows_of(total, k, s, ho, wo), windows_of(absum, k, s, ho, wo)):
        t += parts(kh, kw)
        a += np.abs(parts(kh, kw))
    return total[:, p:p + h, p:p + w], absum[:, p:p + h, p:p + w]


def maxpool(x, k, s, p):
    """Max pool in float64 by engine.hostmath's rules: per output, the max over the window's
    elements inside x, the first in (kh, kw) order on ties, a NaN the max; -inf and position
    -1 for a window of padding only. Returns (y, position kh*k + kw of the first max)."""
    x = np.asarray(x, np.float64)
    ho, wo = out_hw(x.shape[1], x.shape[2], k, s, p)
    xpad = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    inside = np.pad(np.ones(x.shape, bool), ((0, 0), (p, p), (p, p), (0, 0)))
    best = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    arg = np.full(best.shape, -1)
    for (kh, kw, v), (_, _, ok) in zip(windows_of(xpad, k, s, ho, wo), windows_of(inside, k, s, ho, wo)):
        with np.errstate(invalid="ignore"):
            take = ok & ((arg < 0) | ((best == best) & ~(v <= best)))
        best, arg = np.where(take, v, best), np.where(take, kh * k + kw, arg)
    return best, arg
