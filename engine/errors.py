"""The engine's one error family: what `engine.train`'s main turns into one line and an exit
status (README, "Exit status"), without a traceback.

    EngineError(message, collective=None, usage=None)

`collective`: raised alike on every rank, after a collective decision (an allgather that
found the failure, rank 0's verdict broadcast, a check of the global loss), so rank 0's line
is the job's one message. `usage`: the user's input or what it points at (an option, a data
set, a run directory, a checkpoint) refused before anything was trained: exit status 2, not
1. A subclass names the part of the job and may set either as its class's default; the
constructor's arguments override it for one raise.
"""
from __future__ import annotations


class EngineError(RuntimeError):
    collective = False
    usage = False

    def __init__(self, message: str, collective: bool | None = None, usage: bool | None = None):
        super().__init__(message)
        if collective is not None:
            self.collective = collective
        if usage is not None:
            self.usage = usage
