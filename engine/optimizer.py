"""The hybrid RMSprop-to-SGD optimizer of the recipe, and momentum SGD for the baseline.

Both work in place on the model's ONE flat parameter buffer, with their state in flat
buffers of the same `FlatLayout`, and update any flat range [start, stop) with one fused
call (engine.hostmath on NumPy, a CUDA kernel from engine.cuda_ops on CuPy), so the
reducer can update bucket by bucket as all-reduces finish, or once per step.

    opt = make_optimizer("hybrid", model.params, model.layout, backend, team=model.ws.team)
    coef = schedule(epoch)                        # engine.schedule.Coefficients
    opt.update(grads, start, stop, coef=coef, grad_scale=1 / (world_size * loss_scale))
    opt.step(grads, coef=coef, grad_scale=...)    # the whole buffer at once

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

`state_dict()` returns the state as NumPy arrays, the hyperparameters (for the record) and
the layout's signature; `load_state_dict()` restores the state buffers (hyperparameters come
from the command line) and refuses a state of another optimizer or another layout.
"""
from __future__ import annotations

import numpy as np

from . import hostmath
from .parallel import SERIAL
from .schedule import Coefficients

OPTIMIZERS = ("hybrid", "sgd")


def _is_numpy(a) -> bool:
    return isinstance(a, np.ndarray)


class _FlatOptimizer:
    """Shared plumbing: flat state buffers, range checks, dispatch, checkpoints."""

    kind = ""
    state_names: tuple = ()

    def __init__(self, params, layout, xp=np, *, mu1=0.9, weight_decay=1e-4, exclude_bn_bias=True,
                 team=SERIAL):
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

    @property
    def _ops(self):
        if _is_numpy(self.params):
            return hostmath
        from . import cuda_ops
        return cuda_ops

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

        def chunk(lo, hi):           # elementwise: any split gives the same bits
            self._apply([v[lo:hi] for v in views], g[lo:hi], None if mask is None else mask[lo:hi],
                        coef, float(grad_scale))
        self.team.map(chunk, stop - start)

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
                 exclude_bn_bias=True, team=SERIAL):
        super().__init__(params, layout, xp, mu1=mu1, weight_decay=weight_decay,
                         exclude_bn_bias=exclude_bn_bias, team=team)
        self.mu2 = float(mu2)
        self.eps = float(eps)

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "mu2": self.mu2, "eps": self.eps}

    def _apply(self, views, g, mask, coef, grad_scale):
        w, d, m = views
        self._ops.hybrid_update(w, d, m, g, mask, coef.eta, coef.a_sgd, coef.a_rms, self.mu1,
                                self.mu2, self.eps, self.weight_decay, grad_scale)


class MomentumSGD(_FlatOptimizer):
    """The baseline: d = mu1*d - g, w += eta*d (a_sgd and a_rms of the schedule are ignored)."""

    kind = "sgd"
    state_names = ("d",)

    def _apply(self, views, g, mask, coef, grad_scale):
        w, d = views
        self._ops.sgd_update(w, d, g, mask, coef.eta, self.mu1, self.weight_decay, grad_scale)


def make_optimizer(name: str, params, layout, backend=None, **hyper):
    """"hybrid" or "sgd" over the flat buffer `params` of `layout` on `backend` (NumPy if None);
    `team=model.ws.team` splits CPU updates over the model's threads."""
    xp = np if backend is None else backend.xp
    if name == "hybrid":
        return HybridOptimizer(params, layout, xp, **hyper)
    if name == "sgd":
        return MomentumSGD(params, layout, xp, **hyper)
    raise ValueError(f"optimizer: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
