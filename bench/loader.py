"""Data loader throughput per worker against the bare decode-and-crop bound, same run, same files.

    python bench/loader.py [--images 128] [--sources 500x375 1000x750] [--size 224]
                           [--workers 1 2] [--batch 32] [--passes 2]

For each source size (500x375 is ImageNet's typical JPEG; larger ones gain most from DCT
scaling) it writes a folder of random smooth JPEGs and, for the training transform
(random-resized crop + flip) and the validation transform (resize + center crop), times:

  bound, full decode   PIL alone: Image.open, decode to RGB (engine.data.to_rgb: no copy
                       when already RGB, unlike convert('RGB'), ~10% of a 500x375 decode),
                       one resize of the crop box;
  bound, DCT-scaled    the same, decoding the JPEG at the reduced scale the crop allows
                       (what the pipeline does);
  in-process           engine.loader.Loader with workers=0;
  N workers            the same through N worker processes: images/s, per worker, and
                       per worker as a fraction of the bound.

The pipeline is held to the faster of the two bounds, each the best of two measurements
taken in turn (the first measurement of a run came out up to 8% faster than the same work
measured again).

Each bound is one process on one core, like one worker. Absolute numbers depend on the
machine and its load (printed before and after); the ratios within one run are what count.
On a loaded machine the wall-clock rates measure the scheduler as much as the code, so
each line also gives CPU time per image (the workers' from /proc, Linux), and the ratio
of the bound's CPU time per image to the pipeline's: the pipeline's own overhead, load or not.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from engine import transforms  # noqa: E402
from engine.data import imagefolder, to_rgb  # noqa: E402
from engine.loader import Loader, ShardSampler, sample_rng  # noqa: E402

SEED = 0


def write_folder(root: str, n: int, source_px: tuple, rng) -> None:
    """n JPEGs in 4 classes under root/train, one under root/val (the layout needs one)."""
    w, h = source_px
    yy, xx = np.mgrid[0:h, 0:w] / 40.0
    for split, count in (("train", n), ("val", 4)):
        for k in range(count):
            d = os.path.join(root, split, f"class{k % 4}")
            os.makedirs(d, exist_ok=True)
            phase = rng.uniform(0, 6, size=(3, 2))
            img = np.stack([127 + 100 * np.sin(xx + p[0]) * np.cos(yy + p[1]) for p in phase], -1)
            img += rng.normal(0, 12, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{k}.JPEG"), quality=90)


def worker_cpu_s(ld) -> float:
    """CPU seconds (user + system) its worker processes have used so far."""
    total = 0
    for w in ld.workers:
        with open(f"/proc/{w.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])     # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def bound(paths, tf, passes: int, dct: bool) -> tuple:
    """(images/s, CPU s per image) of the bare decode and one crop-resize per file, with the
    crop boxes the loader draws for the same files in the same epochs (the crop's size sets
    the DCT scale and the resize's cost, so other boxes would be another workload)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for epoch in range(passes):
        for i, p in enumerate(paths):
            with Image.open(p) as im:
                box, _ = tf.plan(im.size[1], im.size[0], sample_rng(SEED, epoch, i))
                if dct:
                    transforms._resize_box(im, box, tf.size, tf.size)
                else:
                    np.asarray(to_rgb(im).resize((tf.size, tf.size), Image.BILINEAR, box=box))
    n = passes * len(paths)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def through_loader(ds, kind: str, tf, batch: int, workers: int, passes: int) -> tuple:
    """(images/s, decoding CPU s per image, the calling process's CPU s per image) through
    the Loader over `passes` epochs, after start-up and a first batch."""
    train_tf, val_tf = (tf, None) if kind == "train" else (None, tf)
    sampler = ShardSampler(len(ds), 0, 1, batch, seed=SEED)

    def one_pass(epoch):
        if kind == "train":
            return (b for _, b in ld.train_batches(sampler, epoch))
        return ld.eval_batches(np.arange(len(ds)), batch)

    with Loader(ds, train_tf, val_tf, seed=SEED, workers=workers) as ld:
        next(iter(one_pass(99)))
        t0, c0, w0 = time.perf_counter(), time.process_time(), worker_cpu_s(ld)
        n = sum(len(b.labels) for epoch in range(passes) for b in one_pass(epoch))
        wall, own, decoding = time.perf_counter() - t0, time.process_time() - c0, worker_cpu_s(ld) - w0
    return n / wall, (decoding if workers else own) / n, own / n


def report(label: str, rate: float, cpu: float, workers: int, bound_rate: float, bound_cpu: float,
           own_cpu: float) -> None:
    per = rate / max(workers, 1)
    # CPU time is counted in clock ticks (10 ms): a run too short to register has none.
    efficiency = f"{100 * bound_cpu / cpu:3.0f}% efficient" if cpu else "too short to time"
    print(f"    {label:12s} {rate:6.1f} images/s, {per:6.1f} per process {100 * per / bound_rate:4.0f}% of the "
          f"bound; CPU {1e3 * cpu:5.2f} ms/image ({efficiency}), rank {1e3 * own_cpu:5.2f} ms/image")


def source_size(text: str) -> tuple:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sources takes WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128, help="JPEGs per source size")
    p.add_argument("--sources", type=source_size, nargs="+", default=[(500, 375), (1000, 750)],
                   metavar="WxH", help="source JPEG sizes")
    p.add_argument("--size", type=int, default=224, help="crop size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    p.add_argument("--passes", type=int, default=2, help="passes over the files per measurement")
    a = p.parse_args(argv)
    rng = np.random.default_rng()
    print(f"loader: {a.images} JPEGs per source size, crops {a.size} px, batch {a.batch}, {a.passes} passes; "
          f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at start")
    for source in a.sources:
        with tempfile.TemporaryDirectory() as root:
            write_folder(root, a.images, source, rng)
            ds, _ = imagefolder(root)
            for kind, tf in (("train", transforms.TrainTransform(a.size)), ("val", transforms.ValTransform(a.size))):
                best = {}
                for dct in (False, True, False, True):
                    rate, cpu = bound(ds.paths, tf, a.passes, dct)
                    best[dct] = min(best.get(dct, (0.0, np.inf)), (rate, cpu), key=lambda r: r[1])
                (full, full_cpu), (dct, dct_cpu) = best[False], best[True]
                ref, ref_cpu = min(best.values(), key=lambda r: r[1])
                print(f"{source[0]}x{source[1]} {kind:5s} bound: {full:6.1f} images/s full decode, "
                      f"{dct:6.1f} DCT-scaled (x{dct / full:.2f}); CPU {1e3 * full_cpu:5.2f} and "
                      f"{1e3 * dct_cpu:5.2f} ms/image")
                for w in [0] + a.workers:
                    rate, cpu, own = through_loader(ds, kind, tf, a.batch, w, a.passes)
                    report("in-process" if w == 0 else f"{w} worker(s)", rate, cpu, w, ref, ref_cpu, own)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
