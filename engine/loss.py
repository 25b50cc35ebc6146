"""Softmax cross-entropy with optional label smoothing, generic in xp.

With K classes and smoothing e, the target of a sample with label c is
q = (1 - e) * onehot(c) + e / K (PyTorch's definition), and
    loss = mean over the batch of  -sum_k q_k log softmax(z)_k,
    dloss/dz = (softmax(z) - q) / N.
"""
from __future__ import annotations

from engine.backend import array_module


def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """(loss, dlogits): loss the batch mean as a 0-d array (a NumPy scalar on the CPU) on the
    logits' device, dlogits like logits. The loss stays on the device: reading it (float())
    is a host synchronisation on a GPU, which the caller does when it can afford one."""
    xp = array_module(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, classes), got shape {tuple(logits.shape)}")
    n, k = logits.shape
    labels = xp.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
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
    return loss.mean(), dlogits
