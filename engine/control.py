"""What every rank must decide alike at a step boundary: stop now, save a checkpoint now.

A stop signal may reach one rank and not another (a scheduler signalling one node), and
only rank 0's clock decides when a periodic checkpoint is due. Once per step every rank
contributes two host integers (the signal it received, 0 if none; rank 0: whether
`checkpoint_s` have passed since the last checkpoint) to one MPI allreduce(max) on a
private duplicate of the world communicator: a few microseconds of host traffic, no device
array read, and all ranks leave the step with the same answer.
"""
from __future__ import annotations

import signal
import time

import numpy as np


class StepControl:
    def __init__(self, world, signals, checkpoint_s: float):
        self.comm = world.Dup()              # collective: every rank builds its StepControl
        self.signals, self.checkpoint_s = signals, checkpoint_s
        self.last_checkpoint = time.monotonic()
        self._mine, self._all = np.zeros(2, np.int64), np.zeros(2, np.int64)

    def poll(self) -> tuple[int, bool]:
        """(signal number every rank stops for, 0: go on; whether a periodic checkpoint is due)."""
        from mpi4py import MPI
        due = (self.comm.rank == 0 and self.checkpoint_s > 0
               and time.monotonic() - self.last_checkpoint >= self.checkpoint_s)
        self._mine[:] = (self.signals.received, due)
        self.comm.Allreduce(self._mine, self._all, op=MPI.MAX)
        return int(self._all[0]), bool(self._all[1])

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()

    def close(self) -> None:
        self.comm.Free()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
