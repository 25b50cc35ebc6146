"""One contiguous buffer for all parameters, one for all gradients, one per optimizer state.

All of them share one `FlatLayout`: named slots, in the order gradients become final in
backward (reverse forward order), so that the reducer's buckets are contiguous slices
completed front to back, and the optimizer updates one flat range with one kernel.
Layers hold views into these buffers; nothing is ever packed or unpacked.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

# Every slot starts on a multiple of this many elements (64 bytes of float32), so every
# bucket boundary is aligned for 128-bit vector loads of fp32 and of fp16.
ALIGN = 16


@dataclass(frozen=True)
class Slot:
    name: str            # torchvision-style name, e.g. "layer3.2.conv2.weight"
    shape: tuple         # our in-memory layout (conv weights are OHWI, see layers.py)
    offset: int          # first element in the flat buffer
    decay: bool          # weight decay applies (False for batch-norm and bias parameters)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def stop(self) -> int:
        return self.offset + self.size


class FlatLayout:
    """Named, aligned slots in one flat index space."""

    def __init__(self, specs):
        """`specs`: iterable of (name, shape, decay) in layout order."""
        slots, offset = [], 0
        for name, shape, decay in specs:
            slot = Slot(name, tuple(int(d) for d in shape), offset, bool(decay))
            slots.append(slot)
            offset = -(-slot.stop // ALIGN) * ALIGN
        self.slots = tuple(slots)
        self.total = offset
        self.by_name = {s.name: s for s in slots}
        if len(self.by_name) != len(slots):
            raise ValueError("FlatLayout: duplicate parameter names")

    def __len__(self) -> int:
        return len(self.slots)

    def alloc(self, xp, dtype=np.float32):
        """A zeroed flat buffer of this layout (padding stays zero forever)."""
        return xp.zeros(self.total, dtype=dtype)

    def view(self, buf, name: str):
        slot = self.by_name[name]
        return buf[slot.offset:slot.stop].reshape(slot.shape)

    def views(self, buf) -> dict:
        return {s.name: buf[s.offset:s.stop].reshape(s.shape) for s in self.slots}

    def decay_mask(self, xp, dtype=np.float32):
        """1 where weight decay applies, 0 elsewhere (padding included)."""
        mask = np.zeros(self.total, dtype=dtype)
        for s in self.slots:
            if s.decay:
                mask[s.offset:s.stop] = 1
        return xp.asarray(mask)

    def signature(self) -> str:
        """A digest of names, shapes and offsets: equal on every rank or the job is refused.
        Conv weights are OHWI (Cout, KH, KW, Cin); their shapes are in the digest, so it
        differs from the one this layout had while they were HWIO (hwio_signature)."""
        return self._digest(lambda s: s.shape)

    def hwio_signature(self) -> str:
        """The signature this layout had before conv weights became OHWI (issue 17): every
        4-d slot's shape written (KH, KW, Cin, Cout). It recognises a checkpoint of the same
        model written in the old layout (engine.checkpoint.upgrade_conv_layout)."""
        return self._digest(lambda s: (*s.shape[1:], s.shape[0]) if len(s.shape) == 4 else s.shape)

    def _digest(self, shape_of) -> str:
        text = ";".join(f"{s.name}:{shape_of(s)}:{s.offset}" for s in self.slots)
        return hashlib.sha256(text.encode()).hexdigest()
