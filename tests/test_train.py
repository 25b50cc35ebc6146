"""The training job: options, learning for real, exact resume, NaN stop.

The mpi tests run the real Trainer on both ranks of `mpiexec -n 2` with ResNet-18 at 32 px
on the digits (small enough for about a minute on two CPU cores).
"""
import json
import os
import re

import numpy as np
import pytest

from engine.train import build_parser, parse_args

REQUIRED_OPTIONS = ("--data", "--dataset", "--arch", "--batch-per-rank", "--epochs", "--schedule",
                    "--optimizer", "--bucket-mb", "--fp16-allreduce", "--device", "--checkpoint-dir",
                    "--resume", "--trace", "--seed", "--eval-every", "--image-size", "--workers", "--lr",
                    "--label-smoothing", "--checkpoint-every", "--log-dir")


def test_help_explains_every_option():
    text = build_parser().format_help()
    for opt in REQUIRED_OPTIONS:
        assert opt in text, opt
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_defaults_train_resnet50_on_digits_with_the_paper_recipe(tmp_path):
    a = parse_args([])
    assert (a.arch, a.dataset, a.schedule, a.optimizer) == ("resnet50", "digits", "paper", "hybrid")
    assert a.image_size >= 32 and a.workers == 0     # in-memory digits need no decoding workers
    folder = parse_args(["--data", str(tmp_path)])
    assert folder.dataset == "imagefolder" and folder.workers > 0


@pytest.mark.parametrize("argv, named", [
    (["--batch-per-rank", "0"], "--batch-per-rank"),
    (["--dataset", "mnist"], "--dataset"),
    (["--image-size", "16"], "--image-size"),
    (["--dataset", "imagefolder"], "--data"),
    (["--resume", "/no/such/checkpoint"], "--resume"),
    (["--epochs", "-1"], "--epochs"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--momentum", "1"], "--momentum"),
    (["--workers", "-2"], "--workers"),
    (["--lr", "fast"], "--lr"),
    (["--no-such-option"], "--no-such-option"),
    (["--max-steps", "0"], "--max-steps"),
    (["--epochs", "inf"], "--epochs"),
    (["--lr", "nan"], "--lr"),
    (["--checkpoint-minutes", "-1"], "--checkpoint-minutes"),
    (["--run-name", "../elsewhere"], "--run-name"),
    (["--progress", "fancy"], "--progress"),
])
def test_bad_options_are_errors_naming_the_option(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert named in capsys.readouterr().err


# ---- real runs under MPI ------------------------------------------------------------------

def _shared_dir(comm, tmp_path):
    """One directory for all ranks (rank 0's pytest tmp_path)."""
    return comm.bcast(str(tmp_path), root=0)


def _train(argv):
    from engine.train import Trainer
    trainer = Trainer(parse_args(argv))
    try:
        return trainer.run()
    finally:
        trainer.close()


def _losses(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


SMALL = ["--arch", "resnet18", "--image-size", "32", "--batch-per-rank", "16", "--watchdog", "0",
         "--print-every", "1000"]


@pytest.mark.mpi
@pytest.mark.slow
def test_training_learns_the_digits(comm, tmp_path):
    assert comm.size == 2
    root = _shared_dir(comm, tmp_path)
    result = _train(SMALL + ["--epochs", "2", "--lr", "0.2", "--eval-every", "0",
                             "--log-dir", f"{root}/log", "--checkpoint-dir", f"{root}/ck"])
    # Ten classes: chance is 10%. Every validation image is counted once, on all ranks alike.
    from engine.data import digits
    assert result["count"] == len(digits(32)[1])
    assert result["top1"] > 0.7, result
    assert comm.allgather(result["top1"]) == [result["top1"]] * 2
    if comm.rank == 0:
        losses = _losses(f"{root}/log")
        first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in sorted(losses)[-5:]])
        assert last < 0.5 * first, (first, last)


@pytest.mark.mpi
@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_trajectory(comm, tmp_path):
    from engine import checkpoint
    root = _shared_dir(comm, tmp_path)
    common = SMALL + ["--epochs", "1", "--lr", "0.1", "--eval-every", "0", "--checkpoint-every", "3"]
    _train(common + ["--max-steps", "6", "--log-dir", f"{root}/a", "--checkpoint-dir", f"{root}/a/ck"])
    _train(common + ["--max-steps", "3", "--log-dir", f"{root}/b", "--checkpoint-dir", f"{root}/b/ck"])
    _train(common + ["--max-steps", "6", "--log-dir", f"{root}/b", "--checkpoint-dir", f"{root}/b/ck",
                     "--resume", f"{root}/b/ck"])
    if comm.rank == 0:
        a, b = _losses(f"{root}/a"), _losses(f"{root}/b")
        assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
        assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]   # bit for bit
        pa, _ = checkpoint.load(checkpoint.list_checkpoints(f"{root}/a/ck")[-1])
        pb, _ = checkpoint.load(checkpoint.list_checkpoints(f"{root}/b/ck")[-1])
        assert os.path.basename(checkpoint.list_checkpoints(f"{root}/b/ck")[-1]).startswith("ckpt-00000006-")
        for k in pa:
            assert np.array_equal(pa[k], pb[k]), k
    comm.Barrier()
    # A checkpoint of another run is refused on every rank, naming the field that differs.
    from engine.rundir import Refused
    with pytest.raises(Refused, match=r"lr=0\.1.*lr=0\.3"):
        _train(common + ["--lr", "0.3", "--max-steps", "6", "--log-dir", f"{root}/c",
                         "--checkpoint-dir", f"{root}/c/ck", "--resume", f"{root}/b/ck"])


@pytest.mark.mpi
def test_non_finite_loss_stops_every_rank_naming_the_same_step(comm, tmp_path):
    """The loss is read one step late (engine.stepstats), from the all-reduced stats: every
    rank stops naming the same step, and rank 0 logged each step before it and none after."""
    from engine.metrics import NonFiniteLoss
    root = _shared_dir(comm, tmp_path)
    with pytest.raises(NonFiniteLoss, match=r"at step \d+") as info:
        _train(SMALL + ["--optimizer", "sgd", "--schedule", "goyal", "--lr", "1e30", "--max-steps", "5",
                        "--no-checkpoint", "--log-dir", f"{root}/log"])
    step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert comm.allgather(step) == [step] * comm.size
    if comm.rank == 0:
        assert sorted(_losses(f"{root}/log")) == list(range(1, step))


@pytest.mark.mpi
def test_a_failing_save_keeps_training_reports_once_and_retries(comm, tmp_path, monkeypatch, capsys):
    """Periodic checkpoints fall due at every step (--checkpoint-minutes by rank 0's clock); the
    disk fills during the first two saves: training goes on, one report, no temp file left,
    the later saves are written and pruned to the newest two."""
    import errno

    from engine import checkpoint
    root = _shared_dir(comm, tmp_path)
    real_savez, calls = checkpoint.np.savez, []

    def savez(f, **arrays):
        calls.append(1)
        if len(calls) <= 2:
            f.write(b"the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savez(f, **arrays)

    monkeypatch.setattr(checkpoint.np, "savez", savez)
    _train(SMALL + ["--max-steps", "6", "--checkpoint-minutes", "1e-6", "--eval-every", "0",
                    "--log-dir", f"{root}/log", "--checkpoint-dir", f"{root}/ck"])
    if comm.rank == 0:
        err = capsys.readouterr().err
        assert len(calls) == 6 and err.count("not saved: No space left on device") == 1, err
        assert err.count("saving checkpoints works again") == 1, err
        assert [n[:14] for n in sorted(os.listdir(f"{root}/ck"))] == [".lock", "ckpt-00000005-", "ckpt-00000006-"]
        assert sorted(_losses(f"{root}/log")) == [1, 2, 3, 4, 5, 6]
    comm.Barrier()


@pytest.mark.mpi
def test_every_rank_gets_the_same_stop_and_checkpoint_answers(comm):
    """A signal seen by rank 1 only stops both ranks; only rank 0's clock makes a checkpoint due."""
    import signal
    import time
    from types import SimpleNamespace

    from engine.control import StepControl
    assert comm.size == 2
    seen = SimpleNamespace(received=0)
    # Rank 1's interval is tiny, rank 0's an hour: nothing is due.
    control = StepControl(comm, seen, 3600.0 if comm.rank == 0 else 1e-6)
    time.sleep(0.01)
    assert control.poll() == (0, False)
    seen.received = signal.SIGTERM if comm.rank == 1 else 0
    control.checkpoint_s = 1e-6 if comm.rank == 0 else 3600.0
    assert control.poll() == (signal.SIGTERM, True)
    control.checkpointed()
    control.checkpoint_s = 3600.0
    assert control.poll() == (signal.SIGTERM, False)
    control.close()


# ---- logs and evaluation arithmetic ----------------------------------------------------------

def test_metrics_of_a_resumed_run_keep_one_row_per_step(tmp_path):
    """The rows after the checkpoint's step (replayed by the resumed job) and a torn last
    line are dropped; the file is then appended to."""
    from engine.metrics import Progress
    path = tmp_path / "metrics.jsonl"
    rows = [dict(kind="train", step=s, loss=1.0) for s in range(1, 9)] + [dict(kind="eval", step=8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')
    resumed = Progress(True, str(tmp_path), total_steps=20, stream=_Stream(False), resume_step=6)
    resumed.start(6, 2, "ck/ckpt-00000006.npz")
    for s in (7, 8):
        resumed.train(_record(s, loss=0.5))
    resumed.close()
    got = [json.loads(line) for line in open(path)]
    assert [(r["kind"], r["step"]) for r in got] == [("train", s) for s in range(1, 7)] + [
        ("start", 6), ("train", 7), ("train", 8)]
    assert got[-1]["loss"] == 0.5 and got[6]["resumed_from"] == "ck/ckpt-00000006.npz"


def test_a_fresh_run_sets_an_earlier_runs_metrics_aside(tmp_path, capsys):
    from engine.metrics import Progress
    old = tmp_path / "metrics.jsonl"
    old.write_text('{"kind": "train", "step": 1, "loss": 9.0}\n')
    fresh = Progress(True, str(tmp_path), total_steps=20, stream=_Stream(False))
    fresh.train(_record(1))
    fresh.close()
    kept = [p for p in tmp_path.iterdir() if p.name not in ("metrics.jsonl", "train.log")]
    assert len(kept) == 1 and kept[0].name.startswith("metrics.") and kept[0].suffix == ".jsonl"
    assert json.loads(kept[0].read_text())["loss"] == 9.0 and str(kept[0]) in capsys.readouterr().err
    assert [json.loads(line)["loss"] for line in open(old)] == [1.25]


def test_a_failing_log_write_never_stops_training(tmp_path, monkeypatch, capsys):
    import errno

    from engine import metrics
    real_write, failing = os.write, {"on": False}

    def write(fd, data):
        if failing["on"] and fd == progress.file.fd:
            real_write(fd, data[:10])       # a torn line, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(metrics.os, "write", write)
    progress = metrics.Progress(True, str(tmp_path), total_steps=20, print_every=100, stream=_Stream(False))
    progress.train(_record(1))
    failing["on"] = True
    for s in (2, 3, 4):
        progress.train(_record(s))
    failing["on"] = False
    progress.train(_record(5))
    progress.close()
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 1 and err.count("works again") == 1, err
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 5]


def test_run_directory_checks_name_the_option_and_the_holder(tmp_path, monkeypatch):
    import errno
    import socket

    from engine import rundir
    lock = rundir.RunLock(str(tmp_path), "--log-dir")
    with pytest.raises(rundir.RunDirError, match=rf"--log-dir {tmp_path} is in use by another job "
                                                 rf"\(host {socket.gethostname()} pid {os.getpid()} since "):
        rundir.RunLock(str(tmp_path), "--log-dir")
    lock.release()
    rundir.RunLock(str(tmp_path), "--log-dir").release()      # free again once released

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", read_only)
    with pytest.raises(rundir.RunDirError, match=rf"--checkpoint-dir {tmp_path}/ck: cannot write there "
                                                 r"\(Read-only file system\)"):
        rundir.check_writable(str(tmp_path / "ck"), "--checkpoint-dir")
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    rundir.check_room(str(tmp_path), free // 2, "--checkpoint-dir")
    with pytest.raises(rundir.RunDirError, match="MiB free, a checkpoint needs about"):
        rundir.check_room(str(tmp_path), 2 * free + 2**30, "--checkpoint-dir")


def test_default_run_names(tmp_path):
    from engine import rundir
    settings = dict(arch="resnet50", dataset="digits", seed=0, epochs=6.0)
    name = rundir.default_run_name(settings)
    assert name.startswith("resnet50-digits-") and name == rundir.default_run_name(dict(settings))
    assert name != rundir.default_run_name(dict(settings, seed=1))
    stamp = rundir.default_run_name(None)
    assert rundir.claim_new(str(tmp_path), stamp) == str(tmp_path / stamp)
    assert rundir.claim_new(str(tmp_path), stamp) == str(tmp_path / f"{stamp}-2")


def test_a_short_run_is_told_what_the_compressed_schedule_does():
    from engine.train import SHORT_RUN_EPOCHS, short_schedule_note
    note = short_schedule_note(2)
    assert "compresses the recipe's 90 epochs 45x" in note and "ends at epoch 0.28" in note
    assert "--max-steps" in note and SHORT_RUN_EPOCHS <= parse_args([]).epochs


def test_resume_command_replaces_resume_and_run_name():
    from engine.train import resume_command
    cmd = resume_command(["--epochs", "3", "--resume", "runs/x/ck", "--run-name=old", "--seed", "1"], 4, "new")
    assert cmd.endswith("-m engine.train --epochs 3 --seed 1 --resume auto --run-name new")
    assert " -n 4 " in cmd and cmd.split()[0].endswith("mpiexec")


def _record(step, loss=1.25):
    return dict(epoch=step / 10, step=step, total_steps=20, loss=loss, top1=0.5, lr=0.1, a_sgd=0.3,
                a_rms=0.01, images_per_s=100.0, step_s=0.5, data_wait_s=0.001, exposed_comm_s=0.002)


class _Stream:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_plain_lines_bar_on_a_terminal_and_jsonl(tmp_path):
    from engine.metrics import Progress
    plain = Progress(True, str(tmp_path), total_steps=20, print_every=5, stream=_Stream(False), mode="auto")
    for s in range(1, 21):
        plain.train(_record(s))
    plain.eval(dict(top1=0.9, top5=1.0, loss=0.3, count=359, seconds=1.0, step=20, epoch=2.0))
    plain.close()
    lines = plain.stream.text.splitlines()
    assert len(lines) == 5 and lines[0].startswith("epoch 0.50 step 5/20 loss 1.2500 top1 50.0% lr 0.1 a_sgd 0.300")
    assert "exposed-comm 2.0 ms" in lines[0] and "100.0 img/s" in lines[0] and "top1 90.00%" in lines[-1]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["kind"] for r in records] == ["train"] * 20 + ["eval"]
    assert [r["step"] for r in records[:20]] == list(range(1, 21))
    bar = Progress(True, None, total_steps=20, stream=_Stream(True))
    bar.columns = 60                # the bar never wraps: cut to the terminal's width
    bar.train(_record(10))
    assert bar.stream.text.startswith("\r[" + "#" * 12 + "." * 12 + "]")
    assert bar.stream.text.endswith("\x1b[K") and len(bar.stream.text) == 1 + 59 + 3
    forced = Progress(True, None, total_steps=20, stream=_Stream(False), mode="bar")
    forced.train(_record(5))
    assert forced.stream.text.startswith("\r[######")
    lines = Progress(True, None, total_steps=20, print_every=5, stream=_Stream(True), mode="lines")
    lines.train(_record(5))
    assert lines.stream.text.startswith("epoch 0.50 step 5/20")
    silent = Progress(False, str(tmp_path / "other"), total_steps=20, stream=_Stream(False))
    silent.train(_record(5))
    assert silent.stream.text == "" and not os.path.exists(tmp_path / "other")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_message_names_the_step(bad):
    from engine.metrics import NonFiniteLoss, check_finite
    check_finite(2.5, 7, 0.7)
    with pytest.raises(NonFiniteLoss, match=r"at step 7 \(epoch 0\.70\)"):
        check_finite(bad, 7, 0.7)


def test_topk_hits_against_a_sorting_reference():
    from engine.evaluate import topk_hits
    rng = np.random.default_rng()
    logits = rng.standard_normal((200, 12))
    labels = rng.integers(0, 12, 200)
    for k in (1, 3, 5, 12, 20):
        ref = sum(labels[i] in np.argsort(-logits[i])[:min(k, 12)] for i in range(200))
        assert topk_hits(logits, labels, k) == ref


@pytest.mark.mpi
def test_trace_of_every_rank_merges_on_a_common_clock_mark(comm, tmp_path):
    """--trace writes one valid trace per rank, with per-layer spans, bucket all-reduces and
    one clock_sync mark each; `merge` lines the ranks up on that mark."""
    from engine import trace
    assert comm.size == 2
    d = _shared_dir(comm, tmp_path)
    _train(SMALL + ["--max-steps", "2", "--eval-every", "0", "--no-checkpoint",
                    "--trace", os.path.join(d, "run.json"), "--log-dir", os.path.join(d, "log")])
    comm.Barrier()
    paths = [os.path.join(d, f"run.rank{r}.json") for r in range(2)]
    for p in paths:
        with open(p) as f:
            events = json.load(f)
        events = events["traceEvents"] if isinstance(events, dict) else events
        names = [e.get("name", "") for e in events]
        assert names.count("clock_sync") == 1, p
        assert {"forward layer1.0.conv1", "backward layer1.0.conv1", "allreduce b0"} <= set(names), p
    if comm.rank == 0:
        out = os.path.join(d, "all.json")
        trace.merge(paths, out)
        with open(out) as f:
            merged = json.load(f)
        merged = merged["traceEvents"] if isinstance(merged, dict) else merged
        marks = [e["ts"] for e in merged if e.get("name") == "clock_sync"]
        assert len(marks) == 2 and marks[0] == pytest.approx(marks[1])
    comm.Barrier()
