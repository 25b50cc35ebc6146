"""Each step's loss and top-1 over the global batch, read one step late so no step blocks the host.

    stats = StepStats(backend, comm)
    loss, hits = <enqueue step s>                # both still on the device
    stats.submit(record, loss, hits, n)          # their all-reduce starts; nothing waits
    <enqueue step s + 1>, stats.submit(...)
    record = stats.pop()                         # step s: record + {"loss", "top1"}

On a GPU, reading a value on the host waits for everything queued before it, so a step
that read its own loss would stall the device between steps. `pop()` reads an older
step's sums instead, on a side stream that waits for that all-reduce alone: it blocks
until step s is done while step s + 1 is already queued. Every rank submits and pops in
the same order, so every rank sees the same numbers at the same step (a non-finite loss
stops all of them together, one step after it happened). On the CPU the side stream is a
no-op and `pop()` waits for the communication thread.
"""
from __future__ import annotations

from collections import deque


class StepStats:
    def __init__(self, backend, comm):
        self.backend, self.comm = backend, comm
        self._stream = backend.stream()
        self._pending: deque = deque()      # (record, device buffer, Work), oldest first

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, record: dict, loss, hits, n: int) -> None:
        """Start summing this rank's (loss * n, hits, n) over all ranks; `loss` (the batch mean)
        and `hits` (top-1 count) may be 0-d device arrays, and are never read here."""
        xp = self.backend.xp
        buf = xp.empty(3, xp.float32)       # one buffer per step: kept until popped
        # Slices, not elements: NumPy converts a value stored into one element through
        # float(), which on an array standing for a device value is a host read.
        buf[0:1] = loss * n
        buf[1:2] = hits
        buf[2] = n
        self._pending.append((record, buf, self.comm.allreduce_async(buf, "sum")))

    def pop(self) -> dict:
        """The oldest submitted step's record with "loss" (global batch mean) and "top1"."""
        record, buf, work = self._pending.popleft()
        with self._stream:          # GPU: the side stream, not the compute stream, waits
            work.wait()
            loss_sum, hits, n = (float(v) for v in self.backend.asnumpy(buf))
        return dict(record, loss=loss_sum / n, top1=hits / n)
