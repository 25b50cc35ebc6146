"""The training job as a user or a scheduler meets it: a real `mpiexec -n 2 python -m
engine.train` on the digits (ResNet-18, 32 px, 8 images per rank), signalled, run twice on
one directory, given bad options; every job bounded by a timeout."""
import fcntl
import json
import os
import pty
import re
import signal
import struct
import termios
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.guard import STOPPED_EXIT_CODE

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-per-rank", "8", "--eval-every", "0",
        "--watchdog", "0", "--print-every", "1", "--progress", "lines"]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCALRANKID", "HYDRA"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


class Job:
    """`mpiexec -n 2 python -m engine.train ARGS` in `cwd`, its output collected line by line."""

    def __init__(self, cwd, args, ranks=2):
        self.proc = subprocess.Popen([str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", "engine.train", *args],
                                     cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines, self._new = [], threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()

    def wait_for(self, text, timeout=120):
        with self._new:
            assert self._new.wait_for(lambda: any(text in line for line in self.lines), timeout), \
                f"no {text!r} within {timeout} s:\n" + "\n".join(self.lines)

    def finish(self, timeout=180):
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc, "\n".join(self.lines)


def _tiny_total_steps(ranks):
    """The steps of a TINY job of `ranks` ranks at the default --epochs: whole global batches
    of the digits' training split per epoch (the sampler drops the remainder)."""
    from engine import data
    from engine.train import parse_args
    per_epoch = len(data.digits(32)[0]) // (ranks * int(TINY[TINY.index("--batch-per-rank") + 1]))
    return round(parse_args([]).epochs * per_epoch)


def _train_rows(path):
    rows = [json.loads(line) for line in open(path)]
    return [r["step"] for r in rows if r["kind"] == "train"], rows


@pytest.mark.slow
def test_sigterm_stops_every_rank_with_a_checkpoint_and_resume_auto_continues(tmp_path):
    args = TINY + ["--max-steps", "60", "--run-name", "pre", "--resume", "auto"]
    job = Job(tmp_path, args)
    job.wait_for("step 3/")
    job.proc.send_signal(signal.SIGTERM)           # what a scheduler sends before it kills the job
    rc, out = job.finish()
    assert rc == STOPPED_EXIT_CODE, out
    stops = [line for line in out.splitlines() if "stopped by SIGTERM" in line]
    assert len(stops) == 1, out
    saved = sorted((tmp_path / "runs/pre/checkpoints").glob("ckpt-*.npz"))
    assert len(saved) == 1 and str(saved[0].relative_to(tmp_path)) in stops[0], out
    step = int(saved[0].stem.split("-")[1])
    assert 3 <= step < 60 and f"at step {step}/" in stops[0] and "--resume auto --run-name pre" in stops[0]
    # The same command line, resubmitted: continues from that checkpoint and finishes.
    rc, out = Job(tmp_path, args).finish()
    assert rc == 0 and f"resumed from {saved[0].relative_to(tmp_path)} at step {step}" in out, out
    steps, rows = _train_rows(tmp_path / "runs/pre/metrics.jsonl")
    assert steps == list(range(1, 61)), steps                  # no step twice, none missing
    assert [r["step"] for r in rows if r["kind"] == "start"] == [0, step]
    # And once more: the run is complete, nothing to do, exit 0.
    rc, out = Job(tmp_path, args).finish()
    assert rc == 0 and "run pre is complete" in out and "step 61" not in out, out


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    # ResNet-50: a step and a checkpoint take long enough that the second Ctrl-C lands first.
    job = Job(tmp_path, TINY + ["--arch", "resnet50", "--max-steps", "2000", "--run-name", "int"])
    job.wait_for("step 2/")
    job.proc.send_signal(signal.SIGINT)
    job.wait_for("Press Ctrl-C again")             # hydra forwarded the first to every rank
    job.proc.send_signal(signal.SIGINT)
    rc, out = job.finish(timeout=60)
    # mpiexec's own status after a forced abort is hydra's (non-zero as a rule, 0 when its
    # proxy trips over its own cleanup), so it is not what is checked. What is: hydra's forced
    # abort is what ended the job, and no rank went on to save, report a stop, or finish.
    assert "Ctrl-C caught... cleaning up processes" in out, out
    assert rc != STOPPED_EXIT_CODE and "stopped by" not in out and "done:" not in out, out
    assert not list((tmp_path / "runs" / "int" / "checkpoints").glob("*.npz")), out


@pytest.mark.slow
def test_a_second_job_on_the_same_run_directory_is_refused_naming_the_holder(tmp_path):
    first = Job(tmp_path, TINY + ["--max-steps", "2000", "--run-name", "shared"])
    first.wait_for("step 1/")
    rc, out = Job(tmp_path, TINY + ["--max-steps", "5", "--run-name", "shared"]).finish(timeout=120)
    assert rc == 2, out
    refusals = [line for line in out.splitlines() if "in use by another job" in line]
    assert len(refusals) == 1, out
    holder = (tmp_path / "runs/shared/.lock").read_text().split()
    assert f"host {holder[1]} pid {holder[3]}" in refusals[0], out
    assert "Traceback" not in out
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish()[0] == STOPPED_EXIT_CODE


@pytest.mark.parametrize("argv, once", [
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--epochs", "inf"], "--epochs must be a finite number"),
    (["--help"], "usage: python -m engine.train"),
    (TINY + ["--log-dir", "/proc/engine-metrics", "--no-checkpoint"], "--log-dir /proc/engine-metrics: cannot write"),
])
def test_usage_errors_help_and_refusals_are_printed_once_per_job(tmp_path, argv, once):
    rc, out = Job(tmp_path, argv).finish(timeout=120)
    assert rc == (0 if argv == ["--help"] else 2), out
    assert out.count(once) == 1, out


def test_fresh_runs_get_their_own_directories(tmp_path):
    for _ in range(2):
        rc, out = Job(tmp_path, TINY + ["--max-steps", "2", "--keep-checkpoints", "1"]).finish()
        assert rc == 0, out
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2, runs
    for name in runs:
        assert [p.name[:14] for p in (tmp_path / "runs" / name / "checkpoints").glob("*.npz")] == ["ckpt-00000002-"]
        assert _train_rows(tmp_path / "runs" / name / "metrics.jsonl")[0] == [1, 2]


def test_the_bar_shows_under_mpiexec_when_the_users_terminal_is_a_terminal(tmp_path):
    """mpiexec's stdout is an 80-column terminal (a pty); rank 0's own stdout is a pipe to
    hydra's proxy. The bar is drawn, redrawn in place, and never wider than the terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    args = [a for a in TINY if a not in ("--progress", "lines")] + ["--max-steps", "4", "--no-checkpoint"]
    proc = subprocess.Popen([str(MPIEXEC), "-n", "2", sys.executable, "-m", "engine.train", *args],
                            cwd=tmp_path, env=_env(), stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:                 # EIO: every writer of the pty has gone
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")
    text = out.decode()
    bars = re.findall(r"\r(\[[#.]{24}\][^\r\n\x1b]*)\x1b\[K", text)
    assert [b.split()[2] for b in bars] == [f"{s}/{_tiny_total_steps(ranks=2)}" for s in range(1, 5)], text
    assert all(len(b) == 79 for b in bars), bars     # the full line is longer: cut, never wrapped
    assert not re.search(r"^epoch \d", text, flags=re.M), text      # no plain progress lines


def test_a_non_finite_loss_is_reported_once_without_a_traceback(tmp_path):
    rc, out = Job(tmp_path, TINY + ["--optimizer", "sgd", "--schedule", "goyal", "--lr", "1e30",
                                    "--max-steps", "5", "--no-checkpoint"]).finish(timeout=120)
    assert rc != 0 and len(re.findall(r"engine\.train: loss is \S+ at step \d+", out)) == 1, out
    assert "Traceback" not in out


def test_ranks_that_disagree_on_the_configuration_are_told_once(tmp_path):
    """An MPMD job whose ranks got different seeds: every rank finds the difference in the
    same allgather, and rank 0 alone says so."""
    cmd = [sys.executable, "-m", "engine.train", *TINY, "--max-steps", "1", "--no-checkpoint", "--run-name", "r"]
    proc = subprocess.run([str(MPIEXEC), "-n", "1", *cmd, "--seed", "0", ":", "-n", "1", *cmd, "--seed", "1"],
                          cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert proc.stdout.count("configuration differs between ranks") == 1, proc.stdout
    assert "seed=1 (rank 0: 0)" in proc.stdout and "Traceback" not in proc.stdout


def test_a_device_no_rank_can_use_is_reported_once(tmp_path):
    env = dict(_env(), CUDA_VISIBLE_DEVICES="")      # hides any GPU the machine has
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "engine.train", *TINY, "--device", "gpu",
                           "--no-checkpoint"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert len(re.findall(r"engine\.train: --device gpu: no usable CUDA device: .*\(rank 0, 1 of 2\)",
                          proc.stdout)) == 1, proc.stdout
    assert proc.stdout.count("no usable CUDA device") == 1 and "Traceback" not in proc.stdout


def test_a_data_set_the_ranks_cannot_read_is_reported_once_before_any_run_directory(tmp_path):
    (tmp_path / "data").mkdir()
    rc, out = Job(tmp_path, TINY + ["--data", str(tmp_path / "data")]).finish(timeout=120)
    assert rc != 0, out
    assert len(re.findall(r"engine\.train: \S+/data/train: not a directory .*\(rank 0, 1 of 2\)", out)) == 1, out
    assert out.count("not a directory") == 1 and "Traceback" not in out, out
    assert not (tmp_path / "runs").exists()


def _loader_workers(parent_pids):
    """pids of the `python -m engine.loader` processes whose parent is one of parent_pids."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue                    # gone meanwhile
        if ppid in parent_pids and b"engine.loader" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _descendants(pid):
    children = {pid}
    for _ in range(4):                  # mpiexec -> hydra proxy -> rank -> worker
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) in children:
                    children.add(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                continue
    return children


def test_a_killed_loader_worker_is_replaced_with_one_line_naming_it(tmp_path):
    job = Job(tmp_path, TINY + ["--dataset", "synthetic", "--workers", "1", "--max-steps", "12", "--no-checkpoint"])
    job.wait_for("step 2/")
    workers = _loader_workers(_descendants(job.proc.pid))
    assert workers, "no loader worker found"
    os.kill(workers[0], signal.SIGKILL)
    rc, out = job.finish(timeout=120)
    assert rc == 0 and "done: 12 steps" in out, out
    assert len(re.findall(r"data loader worker \d+ died \(exit code -9: killed by SIGKILL; .*started a new one",
                          out)) == 1, out
    assert "Traceback" not in out
