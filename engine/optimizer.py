"""The hybrid RMSprop-to-SGD optimizer of the recipe, and momentum SGD for the baseline.

Both work in place on the model's ONE flat parameter buffer, with their state in flat
buffers of the same `FlatLayout`, and update any flat range [start, stop) with one fused
call (engine.hostmath on NumPy, a CUDA kernel from engine.cuda_ops on CuPy), so the
reducer can update bucket by bucket as all-reduces finish, or once per step.

    opt = make_optimizer("hybrid", model.params, model.layout, backend, team=model.ws.team,
                         weight_copy=model.params_lp)    # bf16 copy of params, or None
    coef = schedule(epoch)                        # engine.schedule.Coefficients
    opt.update(grads, start, stop, coef=coef, grad_scale=1 / (world_size * loss_scale))
    opt.step(grads, coef=coef, grad_scale=...)    # the whole buffer at once
    model.refresh_weight_copy()                   # after params change outside update()
    opt.prepare(coef, grad_scale)                 # before replaying a captured CUDA graph

`grads` is either the whole flat gradient buffer (layout.total elements; [start, stop) of
it is read) or exactly the slice [start, stop); float32 or float16 (an FP16 all-reduce
result is used as is, never copied to float32 first). `grad_scale` multiplies the gradient
inside the update: pass 1/N for a SUM all-reduce over N ranks and divide by the loss scale.

Per element, with g = grad_scale * grad + wd * decay * w (decay from the layout's decay mask,
0 for batch-norm and bias parameters unless exclude_bn_bias=False):
  hybrid:  m = mu2*m + (1-mu2)*g^2;  d = mu1*d - (a_sgd + a_rms/(sqrt(m)+eps))*g;  w += eta*d
  sgd:     d = mu1*d - g;  w += eta*d
No bias correction; eps outside the root. mu1 = 0.9, mu2 = 0.99, eps = 1e-8 are plausible
defaults, not values confirmed by the paper.

With `weight_copy` (a flat bfloat16 buffer of layout.total elements: ml_dtypes.bfloat16 on
NumPy, CuPy's bfloat16 on the GPU), every update of a range also writes
weight_copy[range] = bf16(params[range]), rounded to nearest even: inside the update kernel
on the GPU, by one casting assignment per chunk on NumPy (ml_dtypes rounds the same way).

On the GPU the per-step scalars (eta, a_sgd, a_rms, grad_scale) live in one small float32
device array that the update kernel reads (cuda_ops.SCALARS); it is written with one
host-to-device copy on the current stream, only when the values differ from those last
written, so the updates of one step after the first, and the replays of a captured CUDA
graph, cost no copy. `prepare(coef, grad_scale)` writes them without updating: call it
before capturing (so the captured update finds them written and captures no copy) and
before each replay. On NumPy the scalars go to engine.hostmath as floats.

`state_dict()` returns the state as NumPy arrays, the hyperparameters (for the record) and
the layout's signature; `load_state_dict()` restores the state buffers (hyperparameters come
from the command line) and refuses a state of another optimizer or another layout.
"""
from __future__ import annotations

import numpy as np

from . import cuda_ops, hostmath
from .cuda_ops import BF16, SCALARS
from .parallel import SERIAL
from .schedule import Coefficients

OPTIMIZERS = ("hybrid", "sgd")


def _is_numpy(a) -> bool:
    return isinstance(a, np.ndarray)


def _step_scalars(coef: Coefficients, grad_scale) -> dict:
    """The per-step scalars of the update, by their names in cuda_ops.SCALARS."""
    return {"eta": float(coef.eta), "a_sgd": float(coef.a_sgd), "a_rms": float(coef.a_rms),
            "gscale": float(grad_scale)}


def _copy_to_device(dst, host) -> None:
    """One host-to-device copy into `dst`, on the current stream: after the kernels queued
    there that read dst's old values, before those queued after it."""
    dst.set(host)


class _FlatOptimizer:
    """Shared plumbing: flat state buffers, range checks, dispatch, checkpoints."""

    kind = ""
    state_names: tuple = ()

    def __init__(self, params, layout, xp=np, *, mu1=0.9, weight_decay=1e-4, exclude_bn_bias=True,
                 team=SERIAL, weight_copy=None):
        if params.dtype != np.float32 or params.size != layout.total:
            raise ValueError(f"optimizer: params must be float32 with layout.total={layout.total} "
                             f"elements, got {params.dtype} with {params.size}")
        self.params = params
        self.layout = layout
        self.xp = xp
        self.team = team          # splits a CPU update over threads (engine.parallel)
        self.mu1 = float(mu1)
        self.weight_decay = float(weight_decay)
        self.exclude_bn_bias = bool(exclude_bn_bias)
        # uint8: the kernels read one byte per element for the mask (None: decay everywhere).
        self.mask = layout.decay_mask(xp, np.uint8) if exclude_bn_bias else None
        self.state = {name: layout.alloc(xp) for name in self.state_names}
        if weight_copy is not None and (weight_copy.dtype != BF16 or weight_copy.size != layout.total
                                        or type(weight_copy) is not type(params)):
            raise ValueError(f"optimizer: weight_copy must be a bfloat16 {type(params).__name__} of "
                             f"layout.total={layout.total} elements, got {type(weight_copy).__name__} "
                             f"{weight_copy.dtype} with {weight_copy.size}")
        self.weight_copy = weight_copy
        # The device array of the per-step scalars the kernels read, and the bytes last
        # written there (None: nothing yet). NumPy passes them as floats instead.
        self._scalars = None if _is_numpy(params) else xp.zeros(len(SCALARS), np.float32)
        self._scalars_written = None

    def _grad_slice(self, grads, start, stop):
        if grads.dtype not in (np.float32, np.float16):
            raise TypeError(f"optimizer: gradients must be float32 or float16, got {grads.dtype}")
        if grads.size == self.layout.total:
            return grads[start:stop]
        if grads.size == stop - start:
            return grads
        raise ValueError(f"optimizer: gradients have {grads.size} elements; expected the whole "
                         f"buffer ({self.layout.total}) or the range [{start}, {stop})")

    def _range(self, start, stop):
        stop = self.layout.total if stop is None else stop
        if not 0 <= start <= stop <= self.layout.total:
            raise ValueError(f"optimizer: range [{start}, {stop}) is outside [0, {self.layout.total})")
        return start, stop

    def update(self, grads, start=0, stop=None, *, coef: Coefficients, grad_scale=1.0):
        """Update params[start:stop] (and the state there) from grads, in place."""
        start, stop = self._range(start, stop)
        if stop == start:
            return
        g = self._grad_slice(grads, start, stop)
        mask = None if self.mask is None else self.mask[start:stop]
        views = [self.params[start:stop]] + [self.state[n][start:stop] for n in self.state_names]
        w_lp = None if self.weight_copy is None else self.weight_copy[start:stop]
        if self._scalars is not None:        # the device: one launch over the whole range
            self.prepare(coef, grad_scale)
            self._device_update(views, g, mask, w_lp, self._scalars)
            return
        scalars = _step_scalars(coef, grad_scale)

        def chunk(lo, hi):           # elementwise: any split gives the same bits
            self._host_update([v[lo:hi] for v in views], g[lo:hi], None if mask is None else mask[lo:hi],
                              scalars)
            if w_lp is not None:     # while the chunk is in cache; rounds as the kernel does
                w_lp[lo:hi] = views[0][lo:hi]
        self.team.map(chunk, stop - start)

    def prepare(self, coef: Coefficients, grad_scale=1.0) -> None:
        """Write this step's scalars to the device array the update kernels read: one
        host-to-device copy, and none when they equal what was last written. update() calls
        it; call it before capturing and before each replay of a CUDA graph of the updates.
        Nothing to write on NumPy, where update() passes the scalars as floats."""
        if self._scalars is None:
            return
        s = _step_scalars(coef, grad_scale)
        host = np.array([s[name] for name in SCALARS], np.float32)
        if host.tobytes() != self._scalars_written:
            _copy_to_device(self._scalars, host)
            self._scalars_written = host.tobytes()

    def step(self, grads, *, coef: Coefficients, grad_scale=1.0):
        """Update the whole flat buffer."""
        self.update(grads, 0, self.layout.total, coef=coef, grad_scale=grad_scale)

    def hyperparameters(self) -> dict:
        return {"mu1": self.mu1, "weight_decay": self.weight_decay, "exclude_bn_bias": self.exclude_bn_bias}

    def state_dict(self) -> dict:
        to_np = (lambda a: a.copy()) if _is_numpy(self.params) else (lambda a: a.get())
        return {"kind": self.kind, "layout": self.layout.signature(), "hyper": self.hyperparameters(),
                **{name: to_np(buf) for name, buf in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != self.kind:
            raise ValueError(f"optimizer: checkpoint holds {sd.get('kind')!r} state, this is {self.kind!r}")
        if sd.get("layout") != self.layout.signature():
            raise ValueError("optimizer: checkpoint state was saved for another parameter layout")
        for name, buf in self.state.items():
            src = np.asarray(sd[name], np.float32)
            if src.shape != buf.shape:
                raise ValueError(f"optimizer: checkpoint state {name!r} has shape {src.shape}, expected {buf.shape}")
            buf[...] = self.xp.asarray(src)


class HybridOptimizer(_FlatOptimizer):
    """RMSprop warm-up blended into momentum SGD by the schedule's a_sgd and a_rms."""

    kind = "hybrid"
    state_names = ("d", "m")

    def __init__(self, params, layout, xp=np, *, mu1=0.9, mu2=0.99, eps=1e-8, weight_decay=1e-4,
                 exclude_bn_bias=True, team=SERIAL, weight_copy=None):
        super().__init__(params, layout, xp, mu1=mu1, weight_decay=weight_decay,
                         exclude_bn_bias=exclude_bn_bias, team=team, weight_copy=weight_copy)
        self.mu2 = float(mu2)
        self.eps = float(eps)

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "mu2": self.mu2, "eps": self.eps}

    def _host_update(self, views, g, mask, s):
        w, d, m = views
        hostmath.hybrid_update(w, d, m, g, mask, s["eta"], s["a_sgd"], s["a_rms"], self.mu1, self.mu2,
                               self.eps, self.weight_decay, s["gscale"])

    def _device_update(self, views, g, mask, w_lp, scal):
        w, d, m = views
        cuda_ops.hybrid_update(w, d, m, g, mask, scal, self.mu1, self.mu2, self.eps, self.weight_decay,
                               w_lp=w_lp)


class MomentumSGD(_FlatOptimizer):
    """The baseline: d = mu1*d - g, w += eta*d (a_sgd and a_rms of the schedule are ignored)."""

    kind = "sgd"
    state_names = ("d",)

    def _host_update(self, views, g, mask, s):
        w, d = views
        hostmath.sgd_update(w, d, g, mask, s["eta"], self.mu1, self.weight_decay, s["gscale"])

    def _device_update(self, views, g, mask, w_lp, scal):
        w, d = views
        cuda_ops.sgd_update(w, d, g, mask, scal, self.mu1, self.weight_decay, w_lp=w_lp)


def make_optimizer(name: str, params, layout, backend=None, **hyper):
    """"hybrid" or "sgd" over the flat buffer `params` of `layout` on `backend` (NumPy if None);
    `team=model.ws.team` splits CPU updates over the model's threads; `weight_copy`, a
    bfloat16 buffer of layout.total elements, receives bf16(params) at every update."""
    xp = np if backend is None else backend.xp
    if name == "hybrid":
        return HybridOptimizer(params, layout, xp, **hyper)
    if name == "sgd":
        return MomentumSGD(params, layout, xp, **hyper)
    raise ValueError(f"optimizer: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
