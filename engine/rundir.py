"""Run directories: where one run's metrics and checkpoints live, and which job holds them.

    runs/<run name>/                 the run directory (--runs-dir, --run-name); --log-dir
        .lock                        flock'ed by rank 0 of the job using it: "host H pid P since T"
        metrics.jsonl                engine.metrics
        train.log                    every line rank 0 prints (engine.metrics)
        checkpoints/                 --checkpoint-dir: ckpt-<step>-<run id>.npz (engine.checkpoint), its own .lock

The run name of a fresh run defaults to rank 0's start time (20261130-203501, "-2" added
if that directory exists). A job that may be a resubmission (--resume auto) cannot use the
clock: without --run-name its name is derived from the settings that define the run
(arch-dataset-<hash of arch, data, size, global batch, seed, epochs, recipe>), so the same
command line finds the same directory every time, also at another rank count with the same
global batch (a run named before issue 20 by ranks and images per rank is found by that name).

Every check here runs on rank 0 only (the directories may be shared by all ranks); the
verdict reaches every rank through `decided_by_rank0`, so a refusal is printed once and
every rank exits alike.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time

from engine.errors import EngineError


class Refused(EngineError):
    """A start-up refusal that every rank raises alike (printed once, by rank 0)."""
    collective = usage = True


class RunDirError(EngineError):
    """An output directory cannot be used: held by another job, unwritable, or too full."""


def default_run_name(settings: dict | None) -> str:
    """`settings` (a resubmittable run): a name derived from them; None: a time stamp."""
    if settings is None:
        return time.strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{settings['arch']}-{settings['dataset']}-{digest}"


def claim_new(runs_dir: str, name: str) -> str:
    """Create runs_dir/name, or name-2, name-3... if taken (mkdir is the atomic claim)."""
    for n in range(1, 1000):
        path = os.path.join(runs_dir, name if n == 1 else f"{name}-{n}")
        try:
            os.makedirs(runs_dir, exist_ok=True)
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:    # read-only, full, not a directory: the option, not an errno
            raise RunDirError(f"--runs-dir {runs_dir}: cannot create a run directory there "
                              f"({e.strerror or e})") from None
    raise RunDirError(f"{runs_dir}: no free run directory named {name}-N")


class RunLock:
    """An exclusive flock on DIR/.lock for the life of this process (released by the kernel
    when the process ends, however it ends: no stale locks). On NFS, Linux maps flock to
    fcntl locks, which the server arbitrates between hosts."""

    def __init__(self, directory: str, option: str):
        self.path = os.path.join(directory, ".lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise RunDirError(f"{option} {directory} is in use by another job ({holder}); wait for it "
                              f"to end, or give this job another --run-name") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError as e:    # a full disk: the probe file of check_writable took no space
            os.close(fd)
            raise RunDirError(f"{option} {directory}: cannot write there ({e.strerror or e})") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_writable(directory: str, option: str) -> None:
    """Create `directory` if needed and write a probe file into it, or raise RunDirError."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunDirError(f"{option} {directory}: cannot write there ({e.strerror or e})") from None


def check_room(directory: str, need_bytes: int, option: str, what: str = "a checkpoint needs") -> None:
    """Refuse a directory with less free space than `need_bytes` (`what`: who needs them)."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise RunDirError(f"{option} {directory}: {free / 2**20:.0f} MiB free, {what} about "
                          f"{need_bytes / 2**20:.0f} MiB; free some space, lower --keep-checkpoints or choose "
                          f"another directory")


def is_environment_error(exc: BaseException) -> bool:
    """An OSError caused by the machine (full or read-only disk, quota, I/O, a broken pipe),
    not by a bug: reported as one line instead of a traceback."""
    env = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EPIPE)
    return isinstance(exc, OSError) and exc.errno in env


def decided_by_rank0(world, decide):
    """Run `decide()` on rank 0 and give every rank its result; a Refused, RunDirError or
    engine CheckpointError raised there is raised as Refused on every rank."""
    from engine.checkpoint import CheckpointError
    verdict = None
    if world.rank == 0:
        try:
            verdict = ("ok", decide())
        except (Refused, RunDirError, CheckpointError) as e:
            verdict = ("refused", str(e))
    status, value = world.bcast(verdict, root=0)
    if status == "refused":
        raise Refused(value)
    return value
