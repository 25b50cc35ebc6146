"""Buffers reused across steps, so a training step allocates (and page-faults) nothing new.

Two kinds:
  * scratch: named buffers for one purpose (an im2col matrix, a zero-padded copy of an
    input). Layers with the same geometry share one, because only one layer runs at a
    time and none of them keeps its content after returning.
  * a free list of gradient buffers by shape: backward takes one for each layer's input
    gradient and gives back the output gradient it consumed.
"""
from __future__ import annotations

import numpy as np


class Workspace:
    def __init__(self, xp):
        self.xp = xp
        self._scratch = {}
        self._free = {}
        self._owned = {}          # data pointer -> array handed out by take()

    def scratch(self, key, shape, dtype, fill=None):
        """The buffer named `key`; `fill` is written once, when it is first allocated
        (a zero border that no caller ever overwrites stays zero)."""
        full_key = (key, tuple(shape), np.dtype(dtype).str)
        buf = self._scratch.get(full_key)
        if buf is None:
            buf = self.xp.empty(shape, dtype=dtype)
            if fill is not None:
                buf.fill(fill)
            self._scratch[full_key] = buf
        return buf

    def take(self, shape, dtype):
        """A gradient buffer of this shape (content undefined), owned by the caller."""
        free = self._free.get((tuple(shape), np.dtype(dtype).str))
        if free:
            return free.pop()
        buf = self.xp.empty(shape, dtype=dtype)
        self._owned[_data_ptr(buf)] = buf
        return buf

    def give(self, buf):
        """Hand back a buffer from `take` (or any view of all of it) that the caller is done
        with. Arrays that did not come from `take` are ignored: they are simply freed."""
        own = self._owned.get(_data_ptr(buf))
        if own is not None and own.size == buf.size:
            free = self._free.setdefault((own.shape, own.dtype.str), [])
            if any(b is own for b in free):
                raise RuntimeError("Workspace.give: buffer given back twice")
            free.append(own)

    def nbytes(self) -> int:
        arrays = list(self._scratch.values()) + list(self._owned.values())
        return sum(int(b.nbytes) for b in arrays)


def _data_ptr(a) -> int:
    """Address of the first element (NumPy and CuPy spell it differently)."""
    iface = getattr(a, "__array_interface__", None)
    return iface["data"][0] if iface is not None else a.data.ptr
