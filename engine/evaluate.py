"""Validation over the whole validation set, split across ranks, every image counted once.

Batch norm first: training keeps only each rank's last-batch statistics, so before
inference they are all-reduced (engine.bn_sync) into the statistics of the union of all
ranks' last batches. Then each rank evaluates its contiguous shard (shards differ in size
by at most one image, which needs no padding since inference runs no collective), and
one all-reduce sums (top-1 hits, top-5 hits, images, loss sum).
"""
from __future__ import annotations

import time

import numpy as np

from engine.bn_sync import allreduce_bn_stats
from engine.loader import eval_shard
from engine.loss import softmax_cross_entropy
from engine.transforms import normalize


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Images whose label is among the k largest logits (ties broken by argsort order)."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def evaluate(model, comm, loader, val_set, batch: int, backend) -> dict:
    """{'top1', 'top5', 'loss', 'count', 'seconds'} over all of val_set, identical on every rank."""
    t0 = time.perf_counter()
    allreduce_bn_stats(model, comm)
    totals = np.zeros(4, np.float64)          # top-1 hits, top-5 hits, images, loss sum
    for b in loader.eval_batches(eval_shard(len(val_set), comm.rank, comm.size), batch):
        if not len(b.labels):
            continue
        x = normalize(b.images, val_set.mean, val_set.std, backend.xp, model.input_dtype)
        logits = model.forward(x, train=False)
        loss, _ = softmax_cross_entropy(logits, backend.asarray(b.labels))
        logits = backend.asnumpy(logits)
        totals += (topk_hits(logits, b.labels, 1), topk_hits(logits, b.labels, 5),
                   len(b.labels), float(loss) * len(b.labels))
    # Collectives take float32: counts stay exact up to 2**24 images.
    summed = backend.asnumpy(comm.allreduce(backend.asarray(totals.astype(np.float32)), op="sum"))
    hits1, hits5, count, loss_sum = (float(v) for v in summed)
    count = int(round(count))
    return dict(top1=hits1 / max(count, 1), top5=hits5 / max(count, 1), loss=loss_sum / max(count, 1),
                count=count, seconds=time.perf_counter() - t0)
