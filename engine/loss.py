"""Softmax cross-entropy with optional label smoothing, generic in xp.

With K classes and smoothing e, the target of a sample with label c is
q = (1 - e) * onehot(c) + e / K (PyTorch's definition), and
    loss = mean over the batch of  -sum_k q_k log softmax(z)_k,
    dloss/dz = (softmax(z) - q) / N.

float32 device (CuPy) logits take the fused kernels of kernels/softmax_xent.cu
(engine.cuda_ops.softmax_xent: two launches for the loss, dlogits and the top-1 hits);
anything else (NumPy, float64 or bfloat16 device logits) the xp code below. A label outside
[0, K) gives the fused path a NaN loss (and NaN gradient row) instead of an IndexError.
"""
from __future__ import annotations

import numpy as np

from engine.backend import array_module, fused_kernels


def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """(loss, dlogits): loss the batch mean as a 0-d array (a NumPy scalar on the CPU) on the
    logits' device, dlogits like logits. The loss stays on the device: reading it (float())
    is a host synchronisation on a GPU, which the caller does when it can afford one."""
    loss, dlogits, _ = _softmax_cross_entropy(logits, labels, label_smoothing, hits=False)
    return loss, dlogits


def softmax_cross_entropy_with_hits(logits, labels, label_smoothing=0.0):
    """(loss, dlogits, hits): softmax_cross_entropy's, and the top-1 count of the batch
    (logits.argmax(axis=1) == labels, the first index of a tied max), left on the device:
    a 0-d float32 array from the fused kernels, an integer count (0-d array or NumPy
    scalar) from the generic code."""
    return _softmax_cross_entropy(logits, labels, label_smoothing, hits=True)


def _softmax_cross_entropy(logits, labels, label_smoothing, hits):
    xp = array_module(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, classes), got shape {tuple(logits.shape)}")
    n, k = logits.shape
    labels = xp.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    ops = fused_kernels(logits)
    if ops is not None and logits.dtype == np.float32 and k > 0:
        if not logits.flags.c_contiguous:
            logits = logits.copy()
        if labels.dtype != np.int64 or not labels.flags.c_contiguous:
            labels = labels.astype(np.int64)
        return ops.softmax_xent(logits, labels, label_smoothing)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    rows = xp.arange(n)
    nll = -log_p[rows, labels]
    loss = (1.0 - label_smoothing) * nll - label_smoothing * log_p.mean(axis=1)
    dlogits = xp.exp(log_p)
    dlogits[rows, labels] -= 1.0 - label_smoothing
    dlogits -= label_smoothing / k
    dlogits /= n
    top1 = (logits.argmax(axis=1) == labels).sum() if hits else None
    return loss.mean(), dlogits, top1
