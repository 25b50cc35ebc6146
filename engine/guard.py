"""A failing rank brings the whole job down; a stuck collective is reported, then ends it.

    guard.install()                                  # first thing in every rank's main
    dog = guard.Watchdog(comm, timeout=300).start()  # comm: an engine.comm Communicator
    ...
    dog.stop()

Without this, an exception on one rank leaves every other rank blocked in its next
collective forever. `install()` hooks sys.excepthook and threading.excepthook: an uncaught
exception in any thread prints "[rank R/N host] <traceback>" to stderr and calls MPI_Abort,
which ends every process of the job with a non-zero exit code.

`Watchdog` runs a thread per rank that sends a heartbeat (the communicator's progress
counters) to rank 0 every `interval` seconds on a private duplicate communicator, with
non-blocking sends. Rank 0 watches the table: when a rank's oldest unfinished collective
(#k) has waited longer than `timeout`, the late ranks are those that have not started
collective #k yet, or whose heartbeats stopped; rank 0 prints them and aborts the job
(exit code STUCK_EXIT_CODE). If rank 0 itself never answers, any rank whose collective waits
twice the timeout reports that and aborts. An asynchronous NCCL error ends the job the same way.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import traceback

import numpy as np

STUCK_EXIT_CODE = 3
# Stopped on request (SIGTERM, SIGINT) after a checkpoint: EX_TEMPFAIL, "try again later",
# which a scheduler's requeue rule can match.
STOPPED_EXIT_CODE = 75
_FORWARD_GRACE_S = 0.5
_HEARTBEAT_TAG = 0x4842


def _world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


def _who(world) -> str:
    return f"rank {world.rank}/{world.size} {socket.gethostname()} pid {os.getpid()}"


def abort_job(message: str, code: int = 1, world=None, quiet: bool = False) -> None:
    """Print `message` with this rank's identity and end every process of the job.

    quiet: for an error every rank meets alike, which rank 0 reports: this rank prints
    nothing and gives rank 0's report time to get out before it aborts."""
    world = world or _world()
    if not quiet:
        sys.stderr.write(f"\n[{_who(world)}] {message}\n[{_who(world)}] aborting the whole job (MPI_Abort {code})\n")
    sys.stderr.flush()
    sys.stdout.flush()
    # mpiexec forwards each rank's output through a proxy that MPI_Abort kills at once:
    # without a pause the report above is lost in about a third of aborts.
    time.sleep(_FORWARD_GRACE_S * (4 if quiet else 1))
    world.Abort(code)
    os._exit(code)      # MPI_Abort does not return; if an MPI ever did, run nothing after it


def on_every_rank(world, fn, errors):
    """fn() on every rank of `world` (collective). When it raises one of `errors` (engine.errors
    EngineError types) on any rank, every rank raises the same error, of the first failing
    rank's type, whose message names each reason once with the ranks that met it, marked
    `collective` (rank 0 reports it)."""
    try:
        result, failure = fn(), None
    except errors as e:
        result, failure = None, (type(e), str(e))
    failures = world.allgather(failure)
    ranks_by_reason: dict = {}
    for r, f in enumerate(failures):
        if f:
            ranks_by_reason.setdefault(f, []).append(str(r))
    if not ranks_by_reason:
        return result
    error_type = next(f for f in failures if f)[0]
    raise error_type("\n  ".join(f"{why} (rank {', '.join(ranks)} of {world.size})"
                                  for (_, why), ranks in ranks_by_reason.items()), collective=True)


class SaveAbandoned(BaseException):
    """Raised inside a stop's save by StopSignals when the user insists (a third signal) or
    its grace time runs out: the save removes its temporary file and the job ends saying so.
    A BaseException, so no `except Exception` on the way swallows it."""


class StopSignals:
    """The first SIGTERM, SIGINT or SIGHUP (a closed terminal, where it reaches the process)
    is remembered (`received`): the job stops at the next step boundary agreed by all ranks
    and saves a checkpoint. `request(signum)` does the same from inside the job (SIGPIPE:
    its output pipe closed).

    A second signal ends the process at once (the default action), except during the stop's
    save (`protect_save`, on every rank until rank 0's checkpoint is durable): then it is
    deferred and the save goes on for at most `grace_s`; a third signal, or the end of the
    grace, abandons the file being written (`writing`: SaveAbandoned is raised inside it,
    engine.checkpoint.save removes its temporary file) or, outside it, ends the process.
    Under mpiexec, hydra kills every rank itself on a second Ctrl-C: nothing here can
    defer that."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, notice: str | None = None, grace_s: float = 60.0):
        self.received = 0          # signal number, 0: none
        self.notice = notice       # printed when the first signal arrives (by one rank only)
        self.grace_s = grace_s
        self.saving = self.writing = False
        self.insisted = 0          # signals received during the stop's save

    def install(self) -> "StopSignals":
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def request(self, signum: int) -> None:
        """Stop at the next step boundary as if `signum` had arrived (once)."""
        self.received = self.received or signum

    def _say(self, text: str) -> None:
        if self.notice:             # the rank that reports; stderr may be gone as well
            try:
                os.write(2, f"{text}\n".encode())
            except OSError:
                pass

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.received:
            self._say(f"{name}: {self.notice}")
            self.received = signum
            return
        if self.saving and not self.insisted:
            self.insisted = 1
            self._say(f"{name} again: finishing the checkpoint being written (at most {self.grace_s:g} s; "
                      f"once more abandons it)")
            signal.signal(signal.SIGALRM, self._on_grace_over)
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)
            return
        if self.writing:
            raise SaveAbandoned(f"{name} a third time")
        signal.signal(signum, signal.SIG_DFL)       # not saving, or insisting: end at once
        os.kill(os.getpid(), signum)

    def _on_grace_over(self, signum, frame) -> None:
        if self.writing:
            raise SaveAbandoned(f"still writing {self.grace_s:g} s after the second signal")

    @contextlib.contextmanager
    def protect_save(self):
        """The stop's save on every rank, until rank 0's file is durable (see the class)."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    @contextlib.contextmanager
    def writing_file(self):
        """Rank 0 writing the checkpoint: what a third signal abandons."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False


def _on_exception(exc_type, exc, tb, where: str, world) -> None:
    text = "".join(traceback.format_exception(exc_type, exc, tb)).rstrip()
    abort_job(f"uncaught exception in {where}:\n{text}", 1, world)


def install(world=None) -> None:
    """Any uncaught exception on this rank, in any thread, aborts the whole job."""
    world = world or _world()
    sys.excepthook = lambda t, e, tb: _on_exception(t, e, tb, "the main thread", world)

    def thread_hook(args):
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "a thread"
        _on_exception(args.exc_type, args.exc_value, args.exc_traceback, f"thread {name!r}", world)
    threading.excepthook = thread_hook


class Watchdog:
    """Reports collectives stuck longer than `timeout` seconds, with the late ranks."""

    def __init__(self, comm, timeout: float, interval: float | None = None, world=None):
        if timeout <= 0:
            raise ValueError(f"watchdog timeout must be positive, got {timeout}")
        self.comm, self.timeout = comm, float(timeout)
        self.interval = float(interval) if interval else min(1.0, self.timeout / 4)
        self.world = world if world is not None else getattr(comm, "world", None) or _world()
        self.rank, self.size = self.world.rank, self.world.size
        self._hb = self.world.Dup()           # collective: every rank creates its watchdog
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog-rank{self.rank}", daemon=True)
        self._sends = []
        # rank 0: per rank, last heartbeat [started, finished, oldest seq, oldest age ms] and when
        self._table = {}

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    # -- heartbeats ------------------------------------------------------------------------
    def _snapshot(self, now: float):
        started, finished, oldest = self.comm.progress()
        if oldest is None:
            return np.array([started, finished, -1, 0], np.int64), None
        age = now - (oldest.started_at or oldest.launched_at)
        return np.array([started, finished, oldest.seq, int(age * 1e3)], np.int64), oldest

    def _run(self):
        self.comm.bind_thread()             # this thread queries the GPU rank's CUDA events
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            beat, oldest = self._snapshot(now)
            check = getattr(self.comm, "check_async_error", None)
            if check is not None:
                try:
                    check()
                except Exception as exc:      # an NCCL peer failed: nothing will complete
                    abort_job(f"asynchronous communication error: {exc}", STUCK_EXIT_CODE, self.world)
            if self.rank == 0:
                self._table[0] = (beat, now)
                self._receive(now)
                self._judge(now)
            else:
                self._sends = [r for r in self._sends if not r.Test()]
                self._sends.append(self._hb.Isend(beat, dest=0, tag=_HEARTBEAT_TAG))
                if oldest is not None and beat[3] > 2e3 * self.timeout:
                    abort_job(f"{oldest.name} #{oldest.seq} ({oldest.count} elements) has waited "
                              f"{beat[3] / 1e3:.1f} s and rank 0's watchdog has not ended the job; "
                              "rank 0 is probably the late rank", STUCK_EXIT_CODE, self.world)

    def _receive(self, now):
        from mpi4py import MPI
        status = MPI.Status()
        while self._hb.Iprobe(source=MPI.ANY_SOURCE, tag=_HEARTBEAT_TAG, status=status):
            beat = np.empty(4, np.int64)
            self._hb.Recv(beat, source=status.Get_source(), tag=_HEARTBEAT_TAG)
            self._table[status.Get_source()] = (beat, now)

    def _judge(self, now):
        stuck = {r: b for r, (b, _) in self._table.items() if b[2] >= 0 and b[3] > 1e3 * self.timeout}
        if not stuck:
            return
        seq = min(int(b[2]) for b in stuck.values())
        waiting = sorted(stuck)
        late, notes = [], []
        for r in range(self.size):
            beat, seen = self._table.get(r, (None, None))
            if beat is None:
                late.append(r)
                notes.append(f"rank {r}: no heartbeat yet")
            elif now - seen > self.timeout:
                late.append(r)
                notes.append(f"rank {r}: silent for {now - seen:.1f} s")
            elif beat[0] <= seq:
                late.append(r)
                notes.append(f"rank {r}: has started only {beat[0]} collectives")
        age = max(b[3] for b in stuck.values()) / 1e3
        abort_job(f"collective #{seq} has waited {age:.1f} s (timeout {self.timeout:g} s) on rank(s) "
                  f"{waiting}; late rank(s): {late}" + ("".join(f"\n  {n}" for n in notes)),
                  STUCK_EXIT_CODE, self.world)

    def stop(self) -> None:
        """Stop watching (collective: every rank calls it)."""
        self._stop.set()
        self._thread.join()
        self._hb.Barrier()                  # every heartbeat is sent before rank 0 drains
        if self.rank == 0:
            self._receive(time.perf_counter())
        for r in self._sends:
            r.Wait()
        self._hb.Free()
