"""Device operations of one GPU training step, counted without a GPU.

The real Trainer (engine.train) runs its GPU code paths on tests/gpu_standins.py, a
NumPy-backed CuPy that logs each device operation (kernel launch, CuPy elementwise or
reduction kernel, cuBLAS GEMM, copy, fill, transfer, collective, event, allocation) and a
one-rank NCCL; the fused kernels are logged by engine.cuda_ops._launch and skipped (their
outputs are not needed to count). After `--warmup` steps, one step (train_step and the
submit of its loss/top-1 sums) is counted and tabulated by kind and by the engine code that
issued it (the innermost layer's class, else the engine module).

    python bench/opcount.py                           # ResNet-50, 128 px, 16 per rank
    python bench/opcount.py --arch resnet18 --image-size 64 --batch 2 --list

The count depends on the shapes only where the code chooses a path by shape: Conv2d takes
its dx-by-convolution path where N*Ho*Wo >= 4*Cout, and col2im/MaxPool skip the kernel
offsets that see only padding (1x1 maps). The default, 128 px at 16 images, takes the
same paths as the recipe's 224 px at 32 images per GPU (the last line printed says which ran), at a cost the
CPU can afford.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import gpu_standins  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="images per rank")
    p.add_argument("--warmup", type=int, default=1, help="steps run before the counted one")
    p.add_argument("--precision", default=None, help="passed to engine.train when it has --precision")
    p.add_argument("--list", action="store_true", help="also print every counted operation in order")
    return p.parse_args(argv)


def count_step(trainer, warmup: int) -> list:
    """The ops of step warmup+1 (its train_step and stats submit)."""
    step_ops, submit_ops, _ = gpu_standins.run_steps(trainer, warmup + 1)[-1]
    return step_ops + submit_ops


def count_paths(monkeypatch) -> collections.Counter:
    """Counts, as they run, the shape-chosen paths of a conv's input gradient."""
    import engine.layers
    seen = collections.Counter()
    for name, label in (("col2im", "col2im"), ("Conv2d._dx_by_conv", "by convolution")):
        owner, attr = (engine.layers.Conv2d, "_dx_by_conv") if "." in name else (engine.layers, name)
        original = getattr(owner, attr)

        def counted(*args, _original=original, _label=label, **kwargs):
            seen[_label] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(owner, attr, counted)
    return seen


def table(ops) -> str:
    kinds = [k for k in (*gpu_standins.LAUNCHES, "event", "sync", "alloc") if any(o.kind == k for o in ops)]
    by_where = collections.defaultdict(collections.Counter)
    for o in ops:
        by_where[o.where][o.kind] += 1
    width = max(len(w) for w in by_where) + 2
    head = "where".ljust(width) + "".join(f"{k[:9]:>10}" for k in kinds) + f"{'launches':>10}"
    lines = [head, "-" * len(head)]
    order = sorted(by_where, key=lambda w: -sum(by_where[w][k] for k in gpu_standins.LAUNCHES))
    for w in order + ["total"]:
        c = by_where[w] if w != "total" else collections.Counter(o.kind for o in ops)
        launches = sum(c[k] for k in gpu_standins.LAUNCHES)
        lines.append(w.ljust(width) + "".join(f"{c[k]:>10}" for k in kinds) + f"{launches:>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import numpy as np
    a = parse(argv)
    extra = ["--arch", a.arch, "--image-size", str(a.image_size), "--batch-per-rank", str(a.batch)]
    if a.precision:
        extra += ["--precision", a.precision]
    with gpu_standins.Patches() as mp, np.errstate(all="ignore"):   # skipped kernels leave garbage
        trainer = gpu_standins.trainer_on_standins(mp, extra)
        paths = count_paths(mp)
        try:
            ops = count_step(trainer, a.warmup)
        finally:
            trainer.close()
    launches = sum(o.kind in gpu_standins.LAUNCHES for o in ops)
    allocs = sum(o.kind == "alloc" for o in ops)
    print(f"{a.arch}, {a.image_size} px, {a.batch} images per rank, precision {a.precision or 'default'}: "
          f"step {a.warmup + 1} after {a.warmup} warm-up step(s)")
    print(table(ops))
    print(f"device operations: {launches} launches (kernels, GEMMs, copies, fills, transfers, collectives) "
          f"+ {allocs} allocations = {launches + allocs}; "
          f"{sum(o.kind == 'event' for o in ops)} event records/waits, {sum(o.kind == 'sync' for o in ops)} host syncs")
    print(f"conv input gradients, over the {a.warmup + 1} steps run: " + ", ".join(f"{v} {k}" for k, v in sorted(paths.items())))
    if a.list:
        for o in ops:
            print(f"{o.kind:15} {o.where:15} {o.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
