"""engine.simulate's output: the table, the JSON report and the sweep plot (shared by the
command line and the study, which import this and not each other)."""
from __future__ import annotations

import dataclasses
import math
import sys


def bucket_label(mb: float) -> str:
    """A bucket size as the tables name it: "layer" for per-layer buckets (0 MB), else "N MB"."""
    return "layer" if mb == 0 else f"{mb:g} MB"


def _cell(v, width):
    return f"{'-' if math.isnan(v) else format(v, '.0%'):>{width}}"


def algo_label(algos: dict) -> str:
    """The algorithms the buckets ran: "tree", or "ring 2 + tree 1" where they differ."""
    if len(algos) <= 1:
        return next(iter(algos), "-")
    return " + ".join(f"{a} {n}" for a, n in algos.items())


def table(rows) -> str:
    """One line per configuration: rows are (label, figures) pairs."""
    head = (f"{'configuration':<34} {'buckets':>7} {'step ms':>8} {'serial':>8} {'compute':>8} {'exposed':>8} "
            f"{'hid(steps)':>10} {'hid(trace)':>10} {'images/s':>9} {'scaling':>7} {'train':>8}  {'bound':<9} algorithm")
    lines = [head]
    for label, r in rows:
        lines.append(f"{label:<34} {r['buckets']:>7} {r['step_s'] * 1e3:8.1f} {r['serial_s'] * 1e3:8.1f} "
                     f"{r['compute_s'] * 1e3:8.1f} {r['exposed_s'] * 1e3:8.1f} {_cell(r['hidden_steps'], 10)} "
                     f"{_cell(r['hidden_trace'], 10)} {r['images_s']:9.0f} {r['scaling']:7.0%} "
                     f"{r['train_s'] / 60:7.1f}m  {r['bound']:<9} {algo_label(r['algos'])}")
    return "\n".join(lines)


def _plain(value):
    """JSON-ready: dataclasses as dicts, NaN as null."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_report(inputs: dict, system, profile_source: str, rows: list) -> dict:
    """Every figure of every row (seconds, fractions, images/s) with the inputs that made it."""
    return _plain({"inputs": inputs, "system": system, "profile": profile_source,
                   "rows": [{"label": label, **config, **figures} for label, config, figures in rows]})


def pyplot():
    """matplotlib.pyplot drawing to files; a clear exit where the bench extra is missing."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("engine.simulate: plots need matplotlib, which `make bench` (or "
                 "pip install -e '.[bench]') installs")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(counts, buckets, figures, title, png) -> None:
    """Step time and scaling efficiency against device count, one line per bucket size;
    `figures` runs over counts, then buckets (as the command line builds them)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for j, bucket in enumerate(buckets):
        runs = figures[j::len(buckets)]
        label = "per-layer buckets" if bucket == 0 else f"{bucket:g} MB buckets"
        ax1.plot(counts, [r["step_s"] * 1e3 for r in runs], "o-", label=label)
        ax2.plot(counts, [r["scaling"] for r in runs], "o-", label=label)
    ax1.plot(counts, [r["compute_s"] * 1e3 for r in figures[::len(buckets)]], "k--", label="compute only")
    ax1.set(xscale="log", yscale="log", xlabel="devices", ylabel="step (ms)")
    ax2.set(xscale="log", xlabel="devices", ylabel="scaling efficiency", ylim=(0, 1.05))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
