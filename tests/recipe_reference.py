"""The recipe's formulas in float64 NumPy: the references that engine.hostmath (tests/test_hostmath.py),
the emulated kernels (tests/test_kernels_emulated.py) and the CUDA kernels (tests/test_kernels_gpu.py)
are checked against, written independently of engine/kernels/recipe_math.cuh, which all three share."""
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
