"""Batch norm without moving averages: all-reduce the last batch's statistics before evaluation.

Training keeps, per BN layer, only the mean, the biased variance and the row count of the
last minibatch of this rank (`batch_mean`, `batch_var`, `batch_count`). Before validation,

    allreduce_bn_stats(model, comm)

sets every layer's `eval_mean`/`eval_var` to the statistics of the UNION of all ranks' last
batches, exactly, whatever each rank's batch size (the last batch of an epoch may be short):

    N    = sum_r n_r
    mean = sum_r n_r * mean_r / N
    var  = sum_r n_r * (var_r + (mean_r - mean)^2) / N

(the parallel-axis form of Chan et al.'s merge). It needs two all-reduces, one for the
counts and weighted means of all layers, one for the spreads, each over one flat float32
buffer of the backend's array module. The naive E[x^2] - mean^2 in float32 would cancel
when |mean| >> std; this form only adds non-negative terms.

`comm` is an engine.comm Communicator (`allreduce(buf, op)` in place on an xp array).
"""
from __future__ import annotations

import numpy as np

from engine.backend import array_module


def allreduce_bn_stats(model, comm) -> None:
    """Overwrite each BN's eval_mean/eval_var with the statistics of all ranks' last batches."""
    bns = list(model.batchnorms)
    if not bns:
        return
    xp = array_module(bns[0].batch_mean)
    sizes = [int(bn.batch_mean.size) for bn in bns]
    starts = np.cumsum([0] + sizes)
    nlayers, total = len(bns), int(starts[-1])
    counts = xp.asarray(np.array([float(bn.batch_count) for bn in bns], np.float32))

    # Round 1: counts and count-weighted means of every layer in one buffer.
    first = xp.empty(nlayers + total, np.float32)
    first[:nlayers] = counts
    for bn, a, b, n in zip(bns, starts, starts[1:], counts):
        first[nlayers + a:nlayers + b] = bn.batch_mean * n
    comm.allreduce(first, "sum")
    union_counts = first[:nlayers]
    if bool((union_counts <= 0).any()):
        empty = [_bn_name(bn, i) for i, bn in enumerate(bns) if float(union_counts[i]) <= 0]
        raise ValueError(f"bn_sync: no rank has batch statistics for {', '.join(empty)} (train first)")
    means = [first[nlayers + a:nlayers + b] / union_counts[i] for i, (a, b) in enumerate(zip(starts, starts[1:]))]

    # Round 2: each rank's spread around the union's mean, weighted by its count.
    second = xp.empty(total, np.float32)
    for bn, mean, a, b, n in zip(bns, means, starts, starts[1:], counts):
        second[a:b] = (bn.batch_var + (bn.batch_mean - mean) ** 2) * n
    comm.allreduce(second, "sum")

    for i, (bn, mean, a, b) in enumerate(zip(bns, means, starts, starts[1:])):
        bn.eval_mean[...] = mean
        bn.eval_var[...] = second[a:b] / union_counts[i]


def _bn_name(bn, index: int) -> str:
    return getattr(bn, "name", f"batchnorm #{index}")
