"""The command line of engine.simulate (its docstring is the help text)."""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace

import engine.simulate as sim
from engine.simulate import (ALGOS, DTYPE_BYTES, GB, PRESETS, Link, Network, System, analytic_profile,
                             run_step, simulate, trace_profile, write_trace)


def _floats(text: str) -> list:
    return [float(x) for x in text.split(",")]


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m engine.simulate", description=sim.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed", help=f"system: {', '.join(PRESETS)} (default seed)")
    p.add_argument("--trace", help="measured trace with per-layer spans (instead of the device model)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--px", type=int, default=224, help="image size of the device model (default 224)")
    p.add_argument("--batch", type=int, help="images per device (default: the preset's)")
    p.add_argument("--gpus", help="device counts, comma-separated (default: the preset's)")
    p.add_argument("--per-node", type=int, help="devices per node (default: the preset's)")
    p.add_argument("--bucket-mb", default="25", help="bucket sizes in MB, comma-separated, 0 = per layer")
    p.add_argument("--first-bucket-mb", type=float, default=1.0)
    p.add_argument("--algo", choices=ALGOS, help="all-reduce algorithm (default: the preset's)")
    p.add_argument("--wire", choices=tuple(DTYPE_BYTES), help="gradient precision on the wire")
    for level in ("intra", "inter"):
        p.add_argument(f"--{level}-alpha-us", type=float, help=f"{level}-node latency per message step (us)")
        p.add_argument(f"--{level}-gbs", type=float, help=f"{level}-node bandwidth (GB/s, one direction)")
    p.add_argument("--contention", type=float, default=0.0, help="compute slowdown while communicating")
    p.add_argument("--comm-contention", type=float, default=0.0, help="comm slowdown while computing")
    p.add_argument("--calib-ips", type=float, help="measured images/s of one device at --calib-batch, 224 px")
    p.add_argument("--calib-batch", type=int)
    p.add_argument("--decode-ms", type=float, help="loader cost per image per worker (ms)")
    p.add_argument("--workers", type=int, help="loader workers per device")
    p.add_argument("--epochs", type=float, default=90)
    p.add_argument("--images", type=int, default=1281167, help="images per epoch (ImageNet's by default)")
    p.add_argument("--out-trace", help="write the overlapped step of the first configuration here")
    p.add_argument("--plot", metavar="PNG", help="plot the sweep: step time and scaling against devices")
    p.add_argument("--study", metavar="PNG", help="print the study tables of docs/overlap.md and plot them to PNG")
    a = p.parse_args(argv)
    for opt in ("intra_alpha_us", "inter_alpha_us", "decode_ms", "contention", "comm_contention"):
        if getattr(a, opt) is not None and getattr(a, opt) < 0:
            p.error(f"--{opt.replace('_', '-')} must be >= 0, got {getattr(a, opt)}")
    for opt in ("intra_gbs", "inter_gbs", "calib_ips"):
        if getattr(a, opt) is not None and getattr(a, opt) <= 0:
            p.error(f"--{opt.replace('_', '-')} must be > 0, got {getattr(a, opt)}")
    if a.preset not in PRESETS:
        p.error(f"unknown preset {a.preset!r}; choose one of {', '.join(PRESETS)}")
    return a


def system_from_args(a) -> System:
    s = PRESETS[a.preset]
    links = {}
    for level in ("intra", "inter"):
        link = getattr(s, level)
        alpha, gbs = getattr(a, f"{level}_alpha_us"), getattr(a, f"{level}_gbs")
        links[level] = Link(link.alpha_s if alpha is None else alpha * 1e-6,
                            link.bandwidth if gbs is None else gbs * GB)
    pick = lambda value, default: default if value is None else value      # noqa: E731
    return replace(s, **links, batch=pick(a.batch, s.batch), per_node=pick(a.per_node, s.per_node),
                   algo=pick(a.algo, s.algo), wire=pick(a.wire, s.wire), calib_ips=pick(a.calib_ips, s.calib_ips),
                   calib_batch=pick(a.calib_batch, s.calib_batch),
                   decode_s=s.decode_s if a.decode_ms is None else a.decode_ms * 1e-3,
                   workers=pick(a.workers, s.workers))


def bucket_label(mb: float) -> str:
    """A bucket size as the tables name it: "layer" for per-layer buckets (0 MB), else "N MB"."""
    return "layer" if mb == 0 else f"{mb:g} MB"


def _cell(v, width):
    return f"{'-' if math.isnan(v) else format(v, '.0%'):>{width}}"


def table(rows) -> str:
    """One line per configuration: rows are (label, figures) pairs."""
    head = (f"{'configuration':<34} {'buckets':>7} {'step ms':>8} {'compute':>8} {'exposed':>8} "
            f"{'hid(steps)':>10} {'hid(trace)':>10} {'images/s':>9} {'scaling':>7} {'train':>8}  bound")
    lines = [head]
    for label, r in rows:
        lines.append(f"{label:<34} {r['buckets']:>7} {r['step_s'] * 1e3:8.1f} {r['compute_s'] * 1e3:8.1f} "
                     f"{r['exposed_s'] * 1e3:8.1f} {_cell(r['hidden_steps'], 10)} "
                     f"{_cell(r['hidden_trace'], 10)} {r['images_s']:9.0f} {r['scaling']:7.0%} "
                     f"{r['train_s'] / 60:7.1f}m  {r['bound']}")
    return "\n".join(lines)


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
    `figures` runs over counts, then buckets (as main builds them)."""
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


def main(argv=None) -> int:
    a = parse(argv)
    if a.study:
        from engine.simulate.study import study
        study(a.study)
        return 0
    s = system_from_args(a)
    try:
        profile = (trace_profile(a.trace, a.arch, a.classes) if a.trace
                   else analytic_profile(s, a.arch, a.classes, a.px))
    except (OSError, ValueError) as e:
        print(f"engine.simulate: {e}", file=sys.stderr)
        return 2
    if a.batch:
        profile = replace(profile, batch=a.batch)
    print(f"profile: {profile.source}\nsystem: {a.preset}, {s.algo} all-reduce, {s.wire} on the wire")
    rows, first = [], None
    counts, buckets = ([int(g) for g in a.gpus.split(",")] if a.gpus else [s.gpus]), _floats(a.bucket_mb)
    for gpus in counts:
        for bucket in buckets:
            net = Network.of(s, ranks=gpus, bucket_mb=bucket, first_bucket_mb=a.first_bucket_mb,
                             contention=a.contention, comm_contention=a.comm_contention)
            first = first or net
            r = simulate(profile, net, decode_s=s.decode_s, workers=s.workers, epochs=a.epochs, images=a.images)
            rows.append((f"{gpus} devices, bucket {bucket_label(bucket)}", r))
    print(table(rows))
    if a.plot:
        plot(counts, buckets, [r for _, r in rows], f"{a.preset}: {profile.source}", a.plot)
        print(f"wrote {a.plot}")
    if a.out_trace:
        write_trace(run_step(profile, first, "overlap"), a.out_trace)
        print(f"wrote {a.out_trace}")
    return 0

