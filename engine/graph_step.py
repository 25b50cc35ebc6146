"""--cuda-graph: the training step captured once as a CUDA graph and replayed every step.

A ResNet-50 step issues hundreds of device operations; at the recipe's 32 images per GPU
the host's time to launch them one by one bounds the step. A CUDA graph launches them all
with one call. What the graph holds, in stream order: the normalization of the fixed input
buffer, forward, the loss and top-1 count, backward with the bucketed all-reduces on the
communication stream (forked from and joined to the compute stream by the events the
reducer already records), and the optimizer's updates. What stays outside, before each
replay: the copy of the loader's batch into the fixed input buffers and the write of the
step's scalars (learning rate, a_sgd, a_rms, grad scale: optimizer.prepare) into the device
array the update kernels read. After it: engine.stepstats, which copies the graph's loss and
hit count into its own buffer and all-reduces them eagerly (so the watchdog still sees one
collective per step).

Why the first steps run eagerly (`WARMUP_STEPS`): they compile every kernel, create the
cuBLAS handle and NCCL's resources, size every workspace buffer and fix the reducer's
bucket plan, none of which may happen for the first time inside a capture. The capture
itself does not run the step, so the first graph step launches the graph right after.

Memory. A captured kernel keeps the addresses it was given. Every buffer of the warm-up
steps and of the capture is allocated from a memory pool private to this object, so memory
the graph uses can go back only to that pool, which nothing else allocates from: a layer
that later reallocates its output for an evaluation batch of another size frees the old
buffer into the private pool, where the graph keeps using it and no one else gets it. The
parameters, gradients, optimizer state and BN statistics were allocated before and are
never freed. The steps run on a blocking stream of their own (a capture cannot run on the
legacy default stream), which the default stream, where evaluation and checkpoints run,
stays ordered with.

Not captured, refused at start-up: --trace (its spans record and read events on the host).
"""
from __future__ import annotations

import numpy as np

WARMUP_STEPS = 2


class GraphedStep:
    """Runs `step(images, labels, coef) -> (loss, hits)` (device arrays in, device scalars
    out) eagerly for WARMUP_STEPS steps, then captures it once and replays the graph."""

    def __init__(self, backend, step, optimizer, grad_scale: float):
        self.xp = xp = backend.xp           # CuPy: engine.train refuses --cuda-graph on the CPU
        self.step, self.optimizer, self.grad_scale = step, optimizer, grad_scale
        self.stream = xp.cuda.Stream(non_blocking=False)
        self.pool = xp.cuda.MemoryPool()
        self.eager_steps = 0
        self.graph = None
        self.images = self.labels = None        # the graph's input buffers
        self.outputs = None                     # its (loss, hits)

    def __enter__(self):
        """The stream and the private pool, for a step and for what reads its results."""
        self.stream.__enter__()
        self._alloc = self.xp.cuda.using_allocator(self.pool.malloc)
        self._alloc.__enter__()
        return self

    def __exit__(self, *exc):
        self._alloc.__exit__(*exc)
        self.stream.__exit__(*exc)
        return False

    def __call__(self, batch, coef):
        with self:
            self._load(batch)
            if self.eager_steps < WARMUP_STEPS:
                self.eager_steps += 1
                return self.step(self.images, self.labels, coef)
            self.optimizer.prepare(coef, self.grad_scale)
            if self.graph is None:
                self._capture(coef)
            self.graph.launch(self.stream)
            return self.outputs

    def _load(self, batch) -> None:
        """The batch into the fixed input buffers (allocated by the first step), on the stream."""
        if self.images is None:
            self.images = self.xp.empty(batch.images.shape, batch.images.dtype)
            self.labels = self.xp.empty(batch.labels.shape, batch.labels.dtype)
        if batch.images.shape != self.images.shape or batch.labels.shape != self.labels.shape:
            raise ValueError(f"--cuda-graph: a batch of shape {batch.images.shape} after batches of "
                             f"{self.images.shape}: a captured step has fixed shapes (the loader's "
                             "batches all have --batch-per-rank images)")
        self.images.set(np.ascontiguousarray(batch.images), stream=self.stream)
        self.labels.set(np.ascontiguousarray(batch.labels), stream=self.stream)

    def _capture(self, coef) -> None:
        self.stream.begin_capture()
        try:
            self.outputs = self.step(self.images, self.labels, coef)
        finally:
            graph = self.stream.end_capture()     # always leave capture mode
        self.graph = graph                        # kept only when the whole step was captured
