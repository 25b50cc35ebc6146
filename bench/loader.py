"""Data loader throughput: decoded and augmented images/s, in-process and per worker process.

    python bench/loader.py [--images 256] [--size 224] [--workers 1 2] [--batch 32]

Writes a temporary ImageNet-layout folder of JPEGs (random smooth images of --source-px,
the typical ImageNet size), then times the training pipeline (JPEG decode, random-resized
crop, flip) through engine.loader.Loader: first in the calling process (workers=0), then
with each worker count. Reported: images/s and images/s per worker, and the ratio of each
run to the in-process figure measured in the same run (the peer), since absolute numbers
depend on the machine and its load.
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

from engine.data import imagefolder  # noqa: E402
from engine.loader import Loader, ShardSampler  # noqa: E402
from engine.transforms import TrainTransform, ValTransform  # noqa: E402


def write_folder(root: str, n: int, source_px: tuple, rng) -> None:
    """n JPEGs in 4 classes under root/train and a few under root/val."""
    h, w = source_px
    yy, xx = np.mgrid[0:h, 0:w] / 40.0
    for split, count in (("train", n), ("val", 4)):
        for k in range(count):
            d = os.path.join(root, split, f"class{k % 4}")
            os.makedirs(d, exist_ok=True)
            phase = rng.uniform(0, 6, size=(3, 2))
            img = np.stack([127 + 100 * np.sin(xx + p[0]) * np.cos(yy + p[1]) for p in phase], -1)
            img += rng.normal(0, 12, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{k}.JPEG"), quality=90)


def measure(train, size: int, batch: int, workers: int, epochs: int = 2) -> float:
    """Images/s through the loader over `epochs` passes (after one warm-up batch)."""
    sampler = ShardSampler(len(train), 0, 1, batch, seed=0)
    with Loader(train, TrainTransform(size), ValTransform(size), seed=0, workers=workers) as ld:
        next(iter(ld.train_batches(sampler, epoch=99)))          # start-up and first batch
        t0, n = time.perf_counter(), 0
        for epoch in range(epochs):
            for _, b in ld.train_batches(sampler, epoch):
                n += len(b.labels)
        return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="training JPEGs to write and decode")
    p.add_argument("--source-px", type=int, nargs=2, default=(375, 500), help="JPEG height and width")
    p.add_argument("--size", type=int, default=224, help="crop size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    a = p.parse_args(argv)
    rng = np.random.default_rng()
    with tempfile.TemporaryDirectory() as root:
        write_folder(root, a.images, tuple(a.source_px), rng)
        train, _ = imagefolder(root)
        print(f"loader: {a.images} JPEGs of {a.source_px[1]}x{a.source_px[0]} -> random-resized crop "
              f"{a.size}, flip; batch {a.batch}; {os.cpu_count()} CPU(s)")
        base = measure(train, a.size, a.batch, 0)
        print(f"  in-process (workers=0): {base:8.1f} images/s                  (peer: 1.00)")
        for w in a.workers:
            rate = measure(train, a.size, a.batch, w)
            print(f"  workers={w}:             {rate:8.1f} images/s, {rate / w:7.1f} per worker "
                  f"(x{rate / base:.2f} the in-process rate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
