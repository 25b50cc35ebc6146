"""What rank 0 tells the user: progress lines (or a bar on a terminal) and a JSONL file.

metrics.jsonl, one JSON object per line, appended (one file per run directory):
    {"kind": "start", "step", "time", "unix", "world", "resumed_from"}   each job of the run
    {"kind": "train", "step", "time", "epoch", "total_steps", "loss", "top1", "lr", "a_sgd",
     "a_rms", "images_per_s", "step_s", "data_wait_s", "exposed_comm_s", "comm_s"}
    {"kind": "eval", "step", "time", "epoch", "top1", "top5", "loss", "count", "seconds"}
`time` is seconds since the job started, `step` the global step after the update. A fresh
run that finds an earlier run's file there renames it to metrics.<its last write>.jsonl. A
resumed job first drops the rows after its checkpoint's step (they belong to the lost part
of the interrupted job, which the resumed job replays) and any torn last line, so every
step has exactly one train row. A failed write (full disk) is reported once and never
stops training: the row is lost and the file cut back to its last whole line.

Display: a bar redrawn in place when the user's terminal is a terminal (see
`launcher_terminal`), else a plain line every `print_every` steps. Every line rank 0 prints
(messages, warnings, the plain progress lines) is also appended to train.log beside
metrics.jsonl: the job's own log, whatever became of its stdout. When stdout is a pipe
whose reader has gone (`... | head`, a killed `tee`), its lines go on to stderr, the stream
is pointed at /dev/null (no error at exit), and `on_broken_output()` is called once.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

from engine.errors import EngineError

BAR_WIDTH = 24


class NonFiniteLoss(EngineError, FloatingPointError):
    """The loss became NaN or infinite: training cannot go on. The loss checked is the global
    batch's, so every rank raises it alike at the same step (rank 0's report is enough)."""
    collective = True


def check_finite(loss: float, step: int, epoch: float) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss} at step {step} (epoch {epoch:.2f}); stopping. "
                            f"Lower the learning rate (--lr) or check the input data.")


def format_train(r: dict) -> str:
    # exposed_comm_s only under --trace: measuring it costs host synchronisations
    exposed = f" exposed-comm {1000 * r['exposed_comm_s']:.1f} ms" if "exposed_comm_s" in r else ""
    return (f"epoch {r['epoch']:.2f} step {r['step']}/{r['total_steps']} loss {r['loss']:.4f} "
            f"top1 {100 * r['top1']:.1f}% lr {r['lr']:.4g} a_sgd {r['a_sgd']:.3f} "
            f"{r['images_per_s']:.1f} img/s data-wait {1000 * r['data_wait_s']:.1f} ms{exposed}")


def format_eval(r: dict) -> str:
    return (f"eval epoch {r['epoch']:.2f} step {r['step']}: top1 {100 * r['top1']:.2f}% "
            f"top5 {100 * r['top5']:.2f}% loss {r['loss']:.4f} ({r['count']} images, {r['seconds']:.1f} s)")


def _launchers(pid: int | None = None):
    """(pid, name) of the launcher processes this one's output passes through under MPICH's
    hydra (hydra_pmi_proxy, then mpiexec), nearest first; none outside hydra, and no mpiexec
    on a node other than mpiexec's (the proxy's parent is then sshd or the like)."""
    pid = os.getppid() if pid is None else pid
    for _ in range(3):
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            if not name.startswith(("hydra_pmi_proxy", "mpiexec")):
                return
            yield pid, name
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return


def launcher_terminal(pid: int | None = None) -> str | None:
    """The terminal the job was launched from, when this process's output reaches it only
    through mpiexec: under MPICH's hydra a rank's stdout is a pipe to hydra_pmi_proxy, whose
    output goes through mpiexec, whose stdout may be the user's terminal. Walks up through
    those launcher processes only (a pipe to `tee` or a log file means lines, not a bar)."""
    for launcher, _ in _launchers(pid):
        try:
            out = os.readlink(f"/proc/{launcher}/fd/1")
        except OSError:
            return None
        if out.startswith(("/dev/pts/", "/dev/tty")):
            return out
    return None


def write_past_the_launcher() -> list:
    """Point this process's stdout and stderr straight at mpiexec's own, where that is a pipe
    (`mpiexec ... | tee log`): hydra dies of SIGPIPE when it writes into a pipe whose reader
    has gone (a Ctrl-C kills tee too) and then SIGKILLs every rank, before any checkpoint.
    Written directly, the broken pipe is this process's own error (Python ignores SIGPIPE),
    which Progress turns into a stop with a checkpoint, and hydra, with nothing of this
    rank's to relay, lives. A file or a terminal is left alone (a second descriptor of a
    file would write at its own offset; a terminal breaks no pipe). Returns the fds moved."""
    mpiexec = [pid for pid, name in _launchers() if name.startswith("mpiexec")]
    moved = []
    for fd in ((1, 2) if mpiexec else ()):
        path = f"/proc/{mpiexec[0]}/fd/{fd}"
        try:
            if not os.readlink(path).startswith("pipe:"):
                continue
            # Non-blocking: opening a pipe for writing would wait for a reader forever; without
            # one it fails (ENXIO). Writes then block again, as the inherited stdout's do.
            target = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.set_blocking(target, True)
        except OSError:
            continue
        (sys.stdout if fd == 1 else sys.stderr).flush()
        os.dup2(target, fd)
        os.close(target)
        moved.append(fd)
    return moved


def _columns(stream, tty_path: str | None) -> int:
    """Width of the terminal the bar is drawn on (the bar must never wrap)."""
    try:
        if hasattr(stream, "fileno") and os.isatty(stream.fileno()):
            return os.get_terminal_size(stream.fileno()).columns
        if tty_path:
            fd = os.open(tty_path, os.O_RDONLY | os.O_NOCTTY)
            try:
                return os.get_terminal_size(fd).columns
            finally:
                os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass
    return shutil.get_terminal_size().columns


class MetricsFile:
    """metrics.jsonl, appended one whole line per write; see the module docstring."""

    def __init__(self, path: str, resume_step: int | None, warn):
        self.path, self.warn, self.failed = path, warn, False
        if resume_step is not None and os.path.exists(path):
            self._drop_after(resume_step)
        elif os.path.exists(path) and os.path.getsize(path):
            self._set_aside()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.good = os.fstat(self.fd).st_size

    def _set_aside(self) -> None:
        """A fresh run where an earlier one logged (the same --run-name or --log-dir): its file
        is kept under the time it was last written, never appended to or overwritten."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(self.path)))
        root = self.path[:-len(".jsonl")] if self.path.endswith(".jsonl") else self.path
        kept = f"{root}.{stamp}.jsonl"
        os.replace(self.path, kept)
        self.warn(f"{self.path} held an earlier run's metrics: kept as {kept}")

    def _drop_after(self, step: int) -> None:
        path = self.path
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:              # a torn line of a job that was killed mid-write
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
        if kept != lines:
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.writelines(kept)
            os.replace(tmp, path)

    def write(self, row: dict) -> None:
        data = (json.dumps(row) + "\n").encode()
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(28, "short write (disk full?)")
            self.good += len(data)
            if self.failed:
                self.failed = False
                self.warn(f"writing {self.path} works again")
        except OSError as e:
            try:
                os.ftruncate(self.fd, self.good)    # never leave half a line
            except OSError:
                pass
            if not self.failed:
                self.failed = True
                self.warn(f"cannot write {self.path} ({e.strerror or e}); training goes on, "
                          f"rows are lost until writes succeed again")

    def close(self) -> None:
        os.close(self.fd)


class Progress:
    """Rank 0's reporter; on other ranks every method is a no-op (active=False).

    mode: "bar" (redrawn in place), "lines", or "auto": a bar if the stream is a terminal or
    the job's launcher writes to one (launcher_terminal), else lines."""

    def __init__(self, active: bool, log_dir: str | None, total_steps: int, print_every: int = 10,
                 stream=None, resume_step: int | None = None, mode: str = "auto", on_broken_output=None):
        self.active, self.total, self.every = active, total_steps, max(1, print_every)
        self.stream = stream or sys.stdout
        self.on_broken_output = on_broken_output or (lambda: None)
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        launcher = None if tty or mode != "auto" else launcher_terminal()
        self.tty = active and (mode == "bar" or (mode == "auto" and (tty or launcher is not None)))
        self.columns = _columns(self.stream, launcher) if self.tty else 0
        self.file = self.log_fd = None
        self.t0 = time.time()
        if active and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.file = MetricsFile(os.path.join(log_dir, "metrics.jsonl"), resume_step, self.warn)
            self.log_fd = os.open(os.path.join(log_dir, "train.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _record(self, kind: str, r: dict) -> None:
        if self.file:
            self.file.write(dict(kind=kind, time=round(time.time() - self.t0, 3), **r))

    def start(self, step: int, world: int, resumed_from: str | None) -> None:
        if self.active:
            self._record("start", dict(step=step, unix=round(time.time(), 3), world=world,
                                       resumed_from=resumed_from))

    def train(self, r: dict) -> None:
        if not self.active:
            return
        self._record("train", r)
        if self.tty:
            fill = int(BAR_WIDTH * r["step"] / max(1, self.total))
            line = (f"[{'#' * fill}{'.' * (BAR_WIDTH - fill)}] step {r['step']}/{r['total_steps']} loss "
                    f"{r['loss']:.4f} top1 {100 * r['top1']:.1f}% {r['images_per_s']:.0f} img/s | {format_train(r)}")
            self._emit(f"\r{line[:max(BAR_WIDTH + 2, self.columns - 1)]}\x1b[K", self.stream, end="")
            if r["step"] % self.every == 0 or r["step"] == self.total:
                self._log(format_train(r))
        elif r["step"] % self.every == 0 or r["step"] == self.total:
            self.message(format_train(r))

    def eval(self, r: dict) -> None:
        if self.active:
            self._record("eval", r)
            self.message(format_eval(r))

    def message(self, text: str) -> None:
        """A line of its own (on a terminal, below the bar, which is redrawn next step)."""
        if self.active:
            prefix = "\r\x1b[K" if self.tty else ""
            self._emit(prefix + text, self.stream)
            self._log(text)

    def warn(self, text: str) -> None:
        """A line on stderr (rank 0's only reporter of trouble that does not stop the job)."""
        if self.active:
            self._emit(f"[rank 0] engine.train: {text}", sys.stderr)
            self._log(f"[rank 0] engine.train: {text}")

    def _emit(self, text: str, stream, end: str = "\n") -> None:
        try:
            stream.write(text + end)
            stream.flush()
        except (BrokenPipeError, ValueError):   # the reader is gone (ValueError: closed earlier)
            self._output_gone(stream)
            if stream is self.stream and stream is not sys.stderr:
                self.stream, self.tty = sys.stderr, False
                self.on_broken_output()
                self._emit(text.lstrip("\r"), self.stream, end="\n")

    @staticmethod
    def _output_gone(stream) -> None:
        """Point the stream's descriptor at /dev/null: what is still buffered, and any later
        write, goes nowhere instead of raising again (also at interpreter exit)."""
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def _log(self, text: str) -> None:
        """train.log; a failed write (full disk) is not reported again: metrics.jsonl in the
        same directory reports it."""
        if self.log_fd is not None:
            try:
                os.write(self.log_fd, (text + "\n").encode())
            except OSError:
                pass

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None
