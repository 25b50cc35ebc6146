"""Weights in torchvision's names and layouts, to and from our flat buffers.

torchvision          ours
conv  (O, I, KH, KW) (O, KH, KW, I)     OHWI, see engine/layers.py
fc    (out, in)      (in, out)
bn    weight, bias, running_mean, running_var, num_batches_tracked
                     weight, bias in the flat buffer; eval_mean, eval_var on the layer

running_var holds what inference normalizes with: our eval_var (the biased variance of the
last batch, or of all ranks' batches after BN sync); we keep no moving averages.

Files: `load_checkpoint(path)` reads a .npz (numpy.savez of a state dict) or, when torch is
installed, anything torch.load reads (.pth/.pt, optionally wrapped in {"state_dict": ...}).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _to_ours(name, array):
    if array.ndim == 4:                 # OIHW -> OHWI
        return array.transpose(0, 2, 3, 1)
    if name == "fc.weight":
        return array.T
    return array


def _to_torchvision(name, array):
    if array.ndim == 4:                 # OHWI -> OIHW
        return array.transpose(0, 3, 1, 2)
    if name == "fc.weight":
        return array.T
    return array


def to_torchvision(model) -> dict:
    """The model's state as {torchvision name: numpy array}, in torchvision's order."""
    be = model.backend
    state = {}
    for s in reversed(model.layout.slots):          # layout is reverse forward order
        view = model.layout.view(model.params, s.name)
        state[s.name] = np.ascontiguousarray(_to_torchvision(s.name, be.asnumpy(view)))
    for bn in model.batchnorms:
        state[f"{bn.name}.running_mean"] = be.asnumpy(bn.eval_mean).copy()
        state[f"{bn.name}.running_var"] = be.asnumpy(bn.eval_var).copy()
        state[f"{bn.name}.num_batches_tracked"] = np.array(0, dtype=np.int64)
    return _forward_order(model, state)


def _forward_order(model, state):
    order = {s.name: i for i, s in enumerate(reversed(model.layout.slots))}
    def key(name):
        layer = name.rsplit(".", 1)[0]
        return (order.get(f"{layer}.weight", len(order)), name)
    return {k: state[k] for k in sorted(state, key=key)}


def from_torchvision(model, state, strict=True):
    """Load {torchvision name: array-like} (numpy arrays or torch tensors) into the model.
    With strict, every parameter and BN statistic must be present and nothing else."""
    xp = model.xp
    state = {k: _as_numpy(v) for k, v in state.items()}
    expected = set(model.layout.by_name)
    for bn in model.batchnorms:
        expected |= {f"{bn.name}.running_mean", f"{bn.name}.running_var"}
    optional = {f"{bn.name}.num_batches_tracked" for bn in model.batchnorms}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - optional)
    if strict and (missing or unexpected):
        raise KeyError(f"state dict does not match {model.arch} with {model.num_classes} classes: "
                       f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for s in model.layout.slots:
        if s.name not in state:
            continue
        value = _to_ours(s.name, state[s.name])
        if value.shape != s.shape:
            raise ValueError(f"{s.name}: shape {tuple(state[s.name].shape)} in the state dict "
                             f"does not fit this model")
        model.layout.view(model.params, s.name)[...] = xp.asarray(value, dtype=model.dtype)
    for bn in model.batchnorms:
        for ours, theirs in (("eval_mean", "running_mean"), ("eval_var", "running_var")):
            key = f"{bn.name}.{theirs}"
            if key in state:
                if state[key].shape != (bn.channels,):
                    raise ValueError(f"{key}: shape {state[key].shape}, expected ({bn.channels},)")
                getattr(bn, ours)[...] = xp.asarray(state[key], dtype=model.dtype)


def _as_numpy(value):
    if hasattr(value, "detach"):                     # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def load_checkpoint(path) -> dict:
    """A torchvision state dict from a .npz, or from a torch file when torch is installed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading a torch checkpoint needs torch; "
                          f"or convert it to .npz with numpy.savez") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: _as_numpy(v) for k, v in state.items()}


def save_npz(model, path):
    """Export the model as a torchvision state dict in a .npz."""
    np.savez(path, **model.state_dict())
