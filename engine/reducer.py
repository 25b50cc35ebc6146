"""Bucketed gradient all-reduce, overlapped with backprop.

    reducer = Reducer(model.layout, model.grads, comm, bucket_mb=25, timeline=tl)
    reducer.startup(model.params, config)              # same layout/config everywhere, rank 0's weights
    ...
    model.backward(dlogits, grad_ready=reducer.grad_ready)   # buckets start as they complete
    reducer.finish(update=lambda a, b: opt.update(reducer.reduced, a, b, coef=c,
                                                  grad_scale=1 / comm.size))

Buckets are contiguous slices of the flat gradient buffer, which is laid out in the order
backward finishes gradients (reverse layer order), so bucket 0 completes first. A bucket
ends on a slot boundary once it holds `bucket_mb` megabytes; the first holds only the
slots that fit in `first_bucket_mb`, so communication starts as early as possible (as in
PyTorch DDP). `bucket_mb=0` makes every `grad_ready(start, stop)` call, i.e. every layer, a bucket.
Buckets are launched by `grad_ready` the moment their last gradient is final, strictly in
bucket order; as every rank runs the same model, every rank issues the same collectives in
the same order, and they never cross.

The reducer SUMS. The 1/N of the average is folded into the optimizer's update
(`grad_scale=1/comm.size`, together with 1/loss_scale), so no extra pass over the
gradients is spent on it.

`fp16=True` sends the gradients as float16 (half the bytes): each bucket is packed
(engine.precision.pack_fp16, times `fp16_scale`, e.g. a loss scale that keeps small
gradients out of float16's subnormals) into a float16 flat buffer (`reducer.reduced`) just
before its launch and reduced there; the optimizer reads float16 gradients directly, with
grad_scale = 1 / (N * fp16_scale). On MPI, the N float16 contributions are
summed in float32 and rounded once (engine.comm.fp16_allreduce_sum); NCCL adds in float16
along its ring. Tolerance, stated and tested: relative to the float32 sum, an element is
off by at most about (1 cast + 1 rounding) x 2^-11 on MPI ((N-1) roundings on NCCL), plus
underflow below 6e-8 (no loss scaling is applied here).

`finish()` waits for every bucket, in order. On a GPU that only orders the streams and
never blocks the host; only with an enabled timeline (--trace) does it synchronize each
bucket, to record its all-reduce times; a disabled timeline counts as none. With
`update=callback`, each bucket's callback(start, stop) runs as soon as that bucket is
reduced, while later buckets are still in flight; with `early_update=True` the callbacks may even run inside backward (from
grad_ready), but only for buckets launched by an EARLIER grad_ready call: a layer reports
its range as soon as its weight gradient is final and reads its weights once more for its
input gradient (engine.layers), which is done by the next call. Launching at the report
rather than after the input gradient starts every all-reduce one GEMM earlier (ResNet-50,
64 px, per-layer buckets, 2 CPU ranks: 30 ms of a 350 ms step exposed otherwise).
bench/overlap.py measures which of these is faster.

`update_once=True` (the GPU job) waits for every bucket and then runs ONE update over the
whole buffer: there the waits only order the streams, the per-bucket updates would all be
queued behind backward anyway, and the optimizer's kernel takes any range in one launch,
so per-bucket updates would cost one launch per bucket (19 of ResNet-50's step at 4 MB)
and buy no overlap.
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from engine.backend import array_module
from engine.errors import EngineError
from engine.precision import pack_fp16

MB = 1 << 20


class StartupError(EngineError):
    """Ranks disagree on the model layout or the configuration: the job must not start.
    Raised alike on every rank, after the allgather that found the difference."""
    collective = True


def plan_buckets(layout, bucket_mb: float, first_bucket_mb: float, itemsize: int = 4):
    """[(start, stop), ...] tiling [0, layout.total), ends on slot boundaries (padding included).

    A bucket closes once it holds at least `bucket_mb` (as in PyTorch DDP). The first
    bucket instead takes slots only while they fit in `first_bucket_mb`, so the first
    all-reduce starts after the first few small layers instead of after a big one.
    Returns None for bucket_mb == 0 (one bucket per grad_ready call)."""
    if bucket_mb < 0 or first_bucket_mb < 0:
        raise ValueError(f"bucket sizes must be >= 0 MB, got bucket_mb={bucket_mb}, "
                         f"first_bucket_mb={first_bucket_mb}")
    if bucket_mb == 0:
        return None
    slots = layout.slots
    buckets, start = [], 0
    first_cap, cap = (first_bucket_mb or bucket_mb) * MB, bucket_mb * MB
    for i, slot in enumerate(slots):
        stop = slots[i + 1].offset if i + 1 < len(slots) else layout.total
        if not buckets and slot.offset > start and (stop - start) * itemsize > first_cap:
            buckets.append((start, slot.offset))      # the first bucket stays small
            start = slot.offset
        if (stop - start) * itemsize >= (cap if buckets else first_cap) and stop < layout.total:
            buckets.append((start, stop))
            start = stop
    buckets.append((start, layout.total))
    return buckets


def verify_layout(comm, layout) -> None:
    """Refuse to start unless every rank has the same parameter layout."""
    sigs = comm.world.allgather(layout.signature())
    bad = [r for r, s in enumerate(sigs) if s != sigs[0]]
    if bad:
        raise StartupError(f"parameter layout of rank(s) {bad} differs from rank 0's "
                           f"(signature {sigs[bad[0]][:12]} vs {sigs[0][:12]}): every rank must "
                           "build the same model")


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def check_same_config(comm, config: dict) -> None:
    """Refuse to start when a rank's configuration differs from rank 0's, naming the rank
    and the differing keys."""
    digests = comm.world.allgather(config_digest(config))
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if not bad:
        return
    configs = comm.world.allgather(config)
    lines = []
    for r in bad:
        keys = sorted(k for k in set(configs[0]) | set(configs[r])
                      if configs[0].get(k, "<missing>") != configs[r].get(k, "<missing>"))
        diffs = ", ".join(f"{k}={configs[r].get(k, '<missing>')!r} (rank 0: "
                          f"{configs[0].get(k, '<missing>')!r})" for k in keys)
        lines.append(f"rank {r}: {diffs}")
    raise StartupError("configuration differs between ranks; refusing to start:\n  " + "\n  ".join(lines))


class Reducer:
    def __init__(self, layout, grads, comm, *, bucket_mb: float = 25.0, first_bucket_mb: float = 1.0,
                 fp16: bool = False, fp16_scale: float = 1.0, timeline=None, early_update: bool = False,
                 update_once: bool = False):
        if grads.size != layout.total or grads.dtype != np.float32:
            raise ValueError(f"reducer: grads must be float32 with layout.total={layout.total} "
                             f"elements, got {grads.dtype} with {grads.size}")
        self.layout, self.grads, self.comm = layout, grads, comm
        self.fp16 = bool(fp16)
        self.fp16_scale = float(fp16_scale)
        self.itemsize = 2 if fp16 else 4
        self.buckets = plan_buckets(layout, bucket_mb, first_bucket_mb, self.itemsize)
        # bucket_mb=0: the buckets are the grad_ready ranges of the first step, then fixed.
        self._frozen = self.buckets is not None
        if not self._frozen:
            self.buckets = []
        # The buffer the all-reduce leaves its sums in, which the optimizer reads.
        self.reduced = layout.alloc(array_module(grads), np.float16) if fp16 else grads
        self.timeline = timeline if timeline is not None and timeline.enabled else None
        if early_update and update_once:
            raise ValueError("reducer: early_update (per bucket, inside backward) and update_once "
                             "(one update after every bucket) exclude each other")
        self.early_update, self.update_once = early_update, update_once
        self._reset()

    def _reset(self):
        self._done = 0                      # gradients [0, _done) are final
        self._next = 0                      # next bucket to launch
        self._works = []                    # (bucket index, Work), in launch order
        self._updated = 0                   # buckets whose update callback has run
        self._update = None

    # -- start-up -------------------------------------------------------------------------
    def startup(self, params, config: dict | None = None) -> None:
        """Same layout (and config) on every rank, then rank 0's parameters everywhere."""
        verify_layout(self.comm, self.layout)
        if config is not None:
            check_same_config(self.comm, config)
        self.comm.bcast(params, root=0)

    # -- during backward ------------------------------------------------------------------
    def prepare(self, update) -> None:
        """Set this step's `update(start, stop)`, run per reduced bucket (from grad_ready
        when early_update is set, else from finish())."""
        if self._done:
            raise RuntimeError("reducer: prepare() must come before backward")
        self._update = update

    def grad_ready(self, start: int, stop: int) -> None:
        """Gradients [start, stop) are final (model.backward calls this, in layout order)."""
        if start != self._done or stop <= start or stop > self.layout.total:
            raise RuntimeError(f"reducer: grad_ready({start}, {stop}) after [0, {self._done}) of "
                               f"{self.layout.total}: ranges must tile the buffer in order, once each")
        self._done = stop
        if not self._frozen:
            self.buckets.append((start, stop))
        launched_before = self._next    # the layers of these buckets are done with their weights
        while self._next < len(self.buckets) and self.buckets[self._next][1] <= self._done:
            self._launch(self._next)
            self._next += 1
        if self.early_update and self._update is not None:
            self._apply_ready_updates(block=False, below=launched_before)

    def _launch(self, i: int) -> None:
        a, b = self.buckets[i]
        if self.fp16:       # float16 for the wire: half(g * fp16_scale), one rounding
            pack_fp16(self.grads[a:b], self.fp16_scale, out=self.reduced[a:b])
        work = self.comm.allreduce_async(self.reduced[a:b], "sum")
        self._works.append((i, work))

    # -- after backward -------------------------------------------------------------------
    def _apply_ready_updates(self, block: bool, below: int | None = None) -> None:
        """Update, in order, the reduced buckets (all of them when `block`), stopping at
        bucket `below` if given."""
        while self._updated < len(self._works) and (below is None or self._updated < below):
            i, work = self._works[self._updated]
            if not block and not work.done():
                return
            self._wait(i, work)
            self._run_update(f"update b{i}", *self.buckets[i], {"bucket": i})
            self._updated += 1

    def _run_update(self, label, a, b, args) -> None:
        if self._update is None:
            return
        if self.timeline is None:
            self._update(a, b)
            return
        with self.timeline.span(label, "update", args):
            self._update(a, b)

    def _wait(self, i, work) -> None:
        t0 = time.perf_counter()
        work.wait()
        if self.timeline is None:
            return
        if work.finished_at is None and hasattr(work, "synchronize"):
            work.synchronize()      # GPU, tracing only: one host sync to learn the times
        t1 = time.perf_counter()
        if t1 - t0 > 1e-5:
            self.timeline.record(f"wait b{i}", "wait", t0, t1, {"bucket": i})
        if work.started_at is not None and work.finished_at is not None:
            a, b = self.buckets[i]
            self.timeline.record(f"allreduce b{i}", "comm", work.started_at, work.finished_at,
                                 {"bucket": i, "start": a, "stop": b, "bytes": (b - a) * self.itemsize,
                                  "launched_us_before_start": round((work.started_at - work.launched_at) * 1e6, 1)})

    def finish(self, update=None) -> None:
        """Wait for every bucket in order; `update(start, stop)` runs per bucket as it lands
        (or the one given to prepare())."""
        if self._done != self.layout.total or self._next != len(self.buckets):
            raise RuntimeError(f"reducer: finish() after only [0, {self._done}) of {self.layout.total} "
                               "gradients were reported")
        if update is not None:
            self._update = update
        if self.update_once:
            for i, work in self._works:
                self._wait(i, work)
            self._run_update("update", 0, self.layout.total, {"buckets": len(self._works)})
        else:
            self._apply_ready_updates(block=True)
        self._frozen = True
        self._reset()

    def all_reduce_after_backward(self) -> None:
        """The serial baseline: every bucket launched only now, after backward is complete."""
        if not self._frozen or self._done:
            raise RuntimeError("reducer: the serial baseline needs a fixed bucket plan "
                               "(bucket_mb > 0, or one overlapped step first) and a fresh step")
        for i in range(len(self.buckets)):
            self._launch(i)
        self._next, self._done = len(self.buckets), self.layout.total
