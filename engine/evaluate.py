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


def evaluate(model, comm, loader, val_set, batch: int, backend, sync_bn: bool = True) -> dict:
    """{'top1', 'top5', 'loss', 'count', 'seconds'} over all of val_set, identical on every rank.
    sync_bn=False: the BN statistics are already those to evaluate with (synced since the
    last training step, or loaded from a checkpoint)."""
    t0 = time.perf_counter()
    if sync_bn:
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


def evaluate_checkpoint(path: str, *, data_dir: str | None = None, batch: int = 32, device: str = "auto",
                        workers: int = 0) -> dict:
    """evaluate() of a saved model, with the BN statistics it was saved with (every rank of
    the job that calls it: collective). The checkpoint's header names the model and its data
    set; `data_dir` overrides the folder it was trained from."""
    from mpi4py import MPI

    from engine import checkpoint
    from engine.backend import job_backend
    from engine.comm import create_communicator
    from engine.data import build_datasets
    from engine.loader import Loader
    from engine.model import build_model
    from engine.transforms import ValTransform

    arrays, meta = checkpoint.load(path)
    backend = job_backend(MPI.COMM_WORLD, device)
    _, val_set = build_datasets(meta["dataset"], data_dir=data_dir or meta.get("data"),
                                image_size=meta["image_size"], seed=meta["seed"])
    model = build_model(meta["arch"], meta["num_classes"], backend, seed=meta["seed"],
                        precision=meta.get("precision", "fp32"))
    checkpoint.check_compatible(path, meta, {"layout": model.layout.signature()}, layout=model.layout)
    arrays, meta = checkpoint.upgrade_conv_layout(path, arrays, meta, model.layout, lambda message: None)
    model.params[...] = backend.xp.asarray(arrays["params"])
    model.refresh_weight_copy()
    for bn in model.batchnorms:
        bn.eval_mean[...] = backend.xp.asarray(arrays[f"bn.{bn.name}.eval_mean"])
        bn.eval_var[...] = backend.xp.asarray(arrays[f"bn.{bn.name}.eval_var"])
    comm = create_communicator(backend)
    transform = ValTransform(meta["image_size"])
    try:
        with Loader(val_set, transform, transform, seed=meta["seed"], workers=workers) as loader:
            return dict(evaluate(model, comm, loader, val_set, batch, backend, sync_bn=False),
                        step=meta["global_step"])
    finally:
        comm.close()


def main(argv=None) -> int:
    """python -m engine.evaluate CHECKPOINT: top-1 and top-5 of a saved model (also under mpiexec)."""
    import argparse
    import sys

    from engine.checkpoint import CheckpointError
    from engine.data import DataError
    p = argparse.ArgumentParser(prog="python -m engine.evaluate",
                                description="Evaluate a checkpoint of engine.train on its validation set.")
    p.add_argument("checkpoint", help="a ckpt-*.npz file")
    p.add_argument("--data", metavar="DIR", help="the data set's folder (default: the one the run trained on)")
    p.add_argument("--batch", type=int, default=32, help="images per forward pass per rank")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes per rank")
    a = p.parse_args(argv)
    if a.batch < 1 or a.workers < 0:
        p.error(f"--batch must be at least 1 and --workers at least 0, got {a.batch} and {a.workers}")
    try:
        r = evaluate_checkpoint(a.checkpoint, data_dir=a.data, batch=a.batch, device=a.device, workers=a.workers)
    except (CheckpointError, DataError) as e:
        print(f"engine.evaluate: {e}", file=sys.stderr)
        return 2
    from mpi4py import MPI
    if MPI.COMM_WORLD.rank == 0:
        print(f"{a.checkpoint} (step {r['step']}): top-1 {round(r['top1'] * r['count'])}/{r['count']} = "
              f"{100 * r['top1']:.2f}%, top-5 {100 * r['top5']:.2f}%, loss {r['loss']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
