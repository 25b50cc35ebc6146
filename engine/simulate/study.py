"""docs/simulate.md, "The study": the tables and the plot, from the presets alone.

    python -m engine.simulate --study docs/simulate.png

Every figure here comes from engine.simulate's presets (their sources and assumptions are
written next to them); ResNet-50 at 224 px, 90 epochs of ImageNet's 1,281,167 images; the
all-reduce algorithm NCCL 2.18 would pick per bucket (auto) unless a row names another.
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from engine.simulate.profiles import analytic_profile
from engine.simulate.report import bucket_label, pyplot, table
from engine.simulate.step import Network, simulate
from engine.simulate.systems import PRESETS

GPUS = 1024
BATCHES = (8, 16, 32, 64, 128, 256)
SCALES = (8, 32, 128, 512, 1024, 2048, 4096)
BUCKETS = (0, 1, 4, 25, 100)


@lru_cache(maxsize=None)
def _profile(name: str, batch: int):
    return analytic_profile(replace(PRESETS[name], batch=batch))


def run(name: str, batch: int = 32, **net) -> dict:
    s = PRESETS[name]
    net = Network.of(s, **{"ranks": GPUS, "algo": "auto", **net})
    return simulate(_profile(name, batch), net, decode_s=s.decode_s, workers=s.workers, node_cores=s.node_cores)


def study(png: str) -> None:
    seed = run("seed", algo="ring")
    print("1. The seed's configuration: ResNet-50, 1024 P100, 32/GPU, FP16 ring (as ChainerMN ran it), 25 MB buckets\n")
    print(table([("seed, ring, overlapped", seed), ("seed, auto (NCCL 2.18's choice)", run("seed"))]))
    print(f"   ring, serial (all-reduce after backward): step {seed['serial_s'] * 1e3:.1f} ms, "
          f"{90 * 1281167 / (GPUS * 32 / seed['serial_s']) / 60:.1f} min; all-reduce per step: latency "
          f"{seed['latency_s'] * 1e3:.1f} ms + bandwidth {seed['bandwidth_s'] * 1e3:.1f} ms; loader "
          f"{seed['load_s'] * 1e3:.0f} ms per step\n")
    for name in ("seed", "dgx-h100"):
        print(f"2. {name}, {GPUS} devices, 32/device (the seed's 32k global batch)\n")
        rows = [(f"bucket {bucket_label(mb)}", run(name, bucket_mb=mb)) for mb in BUCKETS]
        rows += [(f"{algo}, {wire}, 25 MB", run(name, algo=algo, wire=wire))
                 for algo in ("auto", "ring", "tree", "hier") for wire in ("fp16", "fp32")]
        print(table(rows) + "\n")
        rows = [(f"{b}/device, {algo}", run(name, b, algo=algo)) for b in BATCHES for algo in ("auto", "ring")]
        print(table(rows) + "\n")
    print("3. Device count, 32/device, 25 MB buckets\n")
    rows = [(f"{name} {n}, {algo}", run(name, ranks=n, algo=algo))
            for name in ("seed", "dgx-h100") for algo in ("auto", "ring") for n in SCALES]
    print(table(rows))
    plot(png)
    print(f"\nwrote {png}")


def plot(png: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {("seed", "auto"): "C0-o", ("seed", "ring"): "C0--s", ("dgx-h100", "auto"): "C3-o",
              ("dgx-h100", "ring"): "C3--s"}
    label = {"seed": "P100 (seed)", "dgx-h100": "H100"}
    for (name, algo), style in styles.items():
        runs = [run(name, ranks=n, algo=algo) for n in SCALES]
        axes[0].plot(SCALES, [r["scaling"] for r in runs], style, label=f"{label[name]}, {algo}")
        runs = [run(name, b, algo=algo) for b in BATCHES]
        axes[1].plot(BATCHES, [r["scaling"] for r in runs], style, label=f"{label[name]}, {algo}")
    axes[0].set(xscale="log", xlabel="devices (32 images each, 25 MB buckets, FP16)", ylabel="scaling efficiency",
                title="scaling with device count", ylim=(0, 1.05))
    axes[1].set(xscale="log", xlabel=f"images per device ({GPUS} devices)", ylabel="scaling efficiency",
                title="scaling with images per device", ylim=(0, 1.05))
    for name, style in (("seed", "C0"), ("dgx-h100", "C3")):
        runs = [run(name, bucket_mb=mb) for mb in BUCKETS]
        xs = range(len(BUCKETS))
        axes[2].plot(xs, [r["step_s"] / r["compute_s"] for r in runs], f"{style}-o", label=f"{label[name]} overlapped")
        axes[2].plot(xs, [r["serial_s"] / r["compute_s"] for r in runs], f"{style}:x", label=f"{label[name]} serial")
    axes[2].set(xticks=range(len(BUCKETS)), xticklabels=[bucket_label(b) for b in BUCKETS], yscale="log",
                xlabel=f"bucket size ({GPUS} devices, 32 each, FP16, auto)", ylabel="step / compute-only step",
                title="bucket size")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
