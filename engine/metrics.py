"""What rank 0 tells the user: progress lines (or a bar on a terminal) and a JSONL file.

Every training step appends one JSON object to metrics.jsonl ({"kind": "train", ...}),
every evaluation one {"kind": "eval", ...}; the file is line-buffered so it can be
followed while the run goes on. On a terminal the progress bar is redrawn in place; in a
pipe or log file, a plain line is printed every `print_every` steps.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

BAR_WIDTH = 24


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite: training cannot go on."""


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


class Progress:
    """Rank 0's reporter; on other ranks every method is a no-op (active=False)."""

    def __init__(self, active: bool, log_dir: str | None, total_steps: int, print_every: int = 10,
                 stream=None, resume: bool = False):
        self.active, self.total, self.every = active, total_steps, max(1, print_every)
        self.stream = stream or sys.stdout
        self.tty = active and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.file = None
        self.t0 = time.time()
        if active and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.file = open(os.path.join(log_dir, "metrics.jsonl"), "a" if resume else "w", buffering=1)

    def _record(self, kind: str, r: dict) -> None:
        if self.file:
            self.file.write(json.dumps(dict(kind=kind, time=round(time.time() - self.t0, 3), **r)) + "\n")

    def train(self, r: dict) -> None:
        if not self.active:
            return
        self._record("train", r)
        if self.tty:
            done = r["step"] / max(1, self.total)
            fill = int(BAR_WIDTH * done)
            bar = "#" * fill + "." * (BAR_WIDTH - fill)
            self.stream.write(f"\r[{bar}] {format_train(r)}\x1b[K")
            self.stream.flush()
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
            print(prefix + text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
