"""Buffers reused across steps, so a training step allocates (and page-faults) nothing new.

Three kinds:
  * the arena: one flat buffer per dtype, as large as the largest request so far, lent as
    a C-contiguous view of its front to whoever needs it next (the im2col matrices: each
    lives only inside one layer's forward or backward call, so one buffer serves all);
  * scratch: named buffers for one purpose (an im2col matrix, a zero-padded copy of an
    input). Layers with the same geometry share one, because only one layer runs at a
    time and none of them keeps its content after returning.
  * a free list of gradient buffers: backward takes one for each layer's input gradient
    and gives back the output gradient it consumed. Any free buffer that is large enough
    serves any shape, so the list holds only as many buffers as are ever live at once.
"""
from __future__ import annotations

import numpy as np

from engine.parallel import SERIAL


class Workspace:
    """The buffers above, the Team (engine.parallel) that the layers split their non-GEMM
    work over (SERIAL unless given), and the precision mode of their GEMMs (engine.gemm)."""

    def __init__(self, xp, team=SERIAL, precision="fp32"):
        self.xp = xp
        self.team = team
        self.precision = precision
        self._scratch = {}
        self._arenas = {}
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

    def arena(self, shape, dtype):
        """A view of `shape` at the front of the shared arena; valid until the next call."""
        n = int(np.prod(shape, dtype=np.int64))
        key = np.dtype(dtype).str
        buf = self._arenas.get(key)
        if buf is None or buf.size < n:
            buf = self._arenas[key] = self.xp.empty(n, dtype=dtype)
        return buf[:n].reshape(shape)

    def take(self, shape, dtype):
        """A gradient buffer of this shape (content undefined), owned by the caller: the
        front of the smallest free buffer that is large enough, whatever shape it had."""
        n = int(np.prod(shape, dtype=np.int64))
        key = np.dtype(dtype).str
        free = self._free.setdefault(key, [])
        fits = [i for i, b in enumerate(free) if b.size >= n]
        if fits:
            buf = free.pop(min(fits, key=lambda i: free[i].size))
        else:
            buf = self.xp.empty(n, dtype=dtype)
            self._owned[_data_ptr(buf)] = buf
        return buf[:n].reshape(shape)

    def give(self, buf):
        """Hand back a buffer from `take` (any view of it that starts where it starts) that
        the caller is done with. Arrays that did not come from `take` are ignored: they are
        simply freed."""
        own = self._owned.get(_data_ptr(buf))
        if own is not None and own.dtype == buf.dtype:
            free = self._free.setdefault(own.dtype.str, [])
            if any(b is own for b in free):
                raise RuntimeError("Workspace.give: buffer given back twice")
            free.append(own)

    def nbytes(self) -> int:
        arrays = list(self._arenas.values()) + list(self._scratch.values()) + list(self._owned.values())
        return sum(int(b.nbytes) for b in arrays)


def _data_ptr(a) -> int:
    """Address of the first element (NumPy and CuPy spell it differently)."""
    iface = getattr(a, "__array_interface__", None)
    return iface["data"][0] if iface is not None else a.data.ptr
