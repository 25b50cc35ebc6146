"""Does the recipe matter? Momentum SGD at the linearly scaled rate vs the hybrid recipe.

Trains the same network on the built-in digits data set at a global batch that is large
for it (512 of 1,438 training images per step by default), three times per seed, with the same
epochs, seeds, data order and initialization:

  baseline: --optimizer sgd    --schedule goyal  (linear scaling, 5/90 warm-up, steps)
  recipe:   --optimizer hybrid --schedule paper  (RMSprop warm-up, slow-start)
  ablation: --optimizer sgd    --schedule paper  (slow-start alone, no RMSprop warm-up)

and writes recipe_experiment.png (validation top-1 and training loss per epoch),
recipe_experiment.md (settings, the table, what the numbers say) and the raw results
recipe_experiment.json into --out: runs/recipe_experiment/ unless told otherwise, so a run
never rewrites the copies in docs/ (pass --out docs to update them). Each run is
`mpiexec -n NP python -m engine.train`; its metrics.jsonl is read back.

    python bench/recipe_experiment.py                  # about 5 minutes on 2 CPU cores
    python bench/recipe_experiment.py --seeds 0 1 2    # more seeds, more minutes
    python bench/recipe_experiment.py --replot --out docs   # redraw docs/ from its recipe_experiment.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "sgd (goyal)": ["--optimizer", "sgd", "--schedule", "goyal"],
    "hybrid (paper)": ["--optimizer", "hybrid", "--schedule", "paper"],
    # Separates the two parts of the recipe: the slow-start rate without the RMSprop warm-up.
    "sgd (slow-start)": ["--optimizer", "sgd", "--schedule", "paper"],
}


def run_one(label, extra, seed, args, log_dir: Path):
    venv_bin = Path(sys.executable).parent
    mpiexec = venv_bin / "mpiexec"
    cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(args.np), sys.executable, "-m", "engine.train",
           "--dataset", "digits", "--arch", args.arch, "--batch-per-rank", str(args.batch_per_rank),
           "--epochs", str(args.epochs), "--seed", str(seed), "--eval-every", "1", "--device", "cpu",
           "--no-checkpoint", "--log-dir", str(log_dir), "--print-every", "1000", *extra]
    metrics = log_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    print(f"[{label}, seed {seed}] {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    return {"label": label, "seed": seed, "seconds": seconds,
            "eval_epoch": [r["epoch"] for r in evals], "eval_top1": [100 * r["top1"] for r in evals],
            "eval_loss": [r["loss"] for r in evals],
            "train_epoch": [r["epoch"] for r in train], "train_loss": [r["loss"] for r in train],
            "lr": [r["lr"] for r in train], "a_sgd": [r["a_sgd"] for r in train]}


def plot(results, path: Path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(RUNS, ("tab:blue", "tab:red", "tab:green")))
    labelled = set()
    for r in results:
        kw = dict(color=colors[r["label"]], alpha=0.85, label=None if r["label"] in labelled else r["label"])
        labelled.add(r["label"])
        ax1.plot(r["eval_epoch"], r["eval_top1"], marker="o", **kw)
        ax2.plot(r["train_epoch"], r["train_loss"], **kw)
    ax1.set(xlabel="epoch", ylabel="validation top-1 (%)", ylim=(0, 100),
            title=f"digits, {args.arch}, global batch {args.np * args.batch_per_rank}, "
                  f"seeds {', '.join(map(str, args.seeds))}")
    ax2.set(xlabel="epoch", ylabel="training loss (per step)", yscale="log", title="training loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def first_epoch_at(r, threshold):
    return next((e for e, a in zip(r["eval_epoch"], r["eval_top1"]) if a >= threshold), None)


def jitter(results):
    """Largest change of validation top-1 between consecutive epochs in a run's second half."""
    worst = 0.0
    for r in results:
        acc = r["eval_top1"][len(r["eval_top1"]) // 2:]
        worst = max([worst] + [abs(b - a) for a, b in zip(acc, acc[1:])])
    return worst


def write_report(results, path: Path, args):
    gb = args.np * args.batch_per_rank
    lines = [
        "# Does the recipe matter on a small data set? (bench/recipe_experiment.py)",
        "",
        f"ResNet ({args.arch}) on the built-in digits (1,438 training / 359 validation images, "
        f"8x8 upscaled to 32 px), {args.np} CPU ranks x {args.batch_per_rank} = global batch {gb} "
        f"({gb / 1438:.0%} of the training set per step), {args.epochs} epochs, seeds "
        f"{', '.join(map(str, args.seeds))}, weight decay and momentum at the engine's defaults. "
        f"Base rate 0.1 per 256 images, so eta = {0.1 * gb / 256:g}.",
        "",
        "- **sgd (goyal)**: momentum SGD at the linearly scaled rate, linear warm-up over 5/90 of "
        "the run, x0.1 at 30/90, 60/90, 80/90.",
        "- **hybrid (paper)**: RMSprop warm-up (a_sgd from 0.5*exp(2(e-c)/p), smooth middle "
        "branch, c = 10/90, p = 5/90 of the run; eta_rms = 3e-4) with the slow-start rate "
        "(0.5, 0.075, 0.01, 0.001 of eta at 40, 70, 85 of 90).",
        "- **sgd (slow-start)**: momentum SGD with the slow-start rate and no RMSprop warm-up. "
        "The hybrid run differs from the baseline in two ways (the warm-up, and a rate that "
        "starts at 0.5*eta with no ramp); this run tells them apart.",
        "",
        "Validation top-1 (%) after each epoch:",
        "",
        "| epoch | " + " | ".join(f"{r['label']} s{r['seed']}" for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for i, epoch in enumerate(results[0]["eval_epoch"]):
        lines.append(f"| {epoch:g} | " + " | ".join(f"{r['eval_top1'][i]:.1f}" for r in results) + " |")
    lines += ["", "| run | final top-1 | best top-1 | first epoch >= 80% | final val loss | "
              "last train loss | wall time |", "|---|---|---|---|---|---|---|"]
    for r in results:
        reach = first_epoch_at(r, 80.0)
        lines.append(f"| {r['label']} s{r['seed']} | {r['eval_top1'][-1]:.1f} | {max(r['eval_top1']):.1f} | "
                     f"{'never' if reach is None else f'{reach:g}'} | {r['eval_loss'][-1]:.3f} | "
                     f"{r['train_loss'][-1]:.3f} | {r['seconds']:.0f} s |")
    by_label = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r["eval_top1"][-1])
    means = {k: sum(v) / len(v) for k, v in by_label.items()}
    ranking = sorted(means.items(), key=lambda kv: -kv[1])
    lines += ["", "## What the numbers say", "",
              f"Mean final validation top-1 over {len(args.seeds)} seed(s): "
              + ", ".join(f"{k} {v:.1f}%" for k, v in ranking) + ".",
              "Training loss, maximum over the run (a spike means the rate was too high for "
              "that point of training): " + ", ".join(
                  f"{r['label']} s{r['seed']} {max(r['train_loss']):.2f}" for r in results) + ".",
              "The RMSprop warm-up (a_sgd < 1) covered "
              + ", ".join(sorted({f"{sum(a < 1 for a in r['a_sgd'])} of {len(r['a_sgd'])}"
                                  for r in results if r["label"] == "hybrid (paper)"}))
              + " steps of the hybrid runs.",
              f"Part of the recipe: against the baseline, the slow-start rate alone changes the "
              f"mean final top-1 by {means['sgd (slow-start)'] - means['sgd (goyal)']:+.1f} points; "
              f"adding the RMSprop warm-up to it changes it by "
              f"{means['hybrid (paper)'] - means['sgd (slow-start)']:+.1f} points.",
              "",
              f"Read with care: this is a 1,438-image, 10-class problem trained for a handful of "
              f"steps per epoch on CPU ranks. In these runs, validation top-1 moved by up to "
              f"{jitter(results):.1f} points between consecutive epochs of the second half of a "
              f"run; differences of that size between runs say little without more seeds "
              f"(`--seeds 0 1 2 3`). The paper's claim "
              "is about 32k-image batches on ImageNet, where SGD at the linearly scaled rate "
              "diverges or loses accuracy; this experiment only shows how the recipes behave "
              "at a batch that is large relative to a small data set.",
              "", "![curves](recipe_experiment.png)", ""]
    path.write_text("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--np", type=int, default=2, help="MPI ranks")
    ap.add_argument("--batch-per-rank", type=int, default=256)
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "recipe_experiment",
                    help="folder of the report, the figure and the raw results (default runs/recipe_experiment; "
                         "docs to update the published copies)")
    ap.add_argument("--replot", action="store_true",
                    help="redraw the figure and the report from OUT/recipe_experiment.json, no training")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "recipe_experiment.json"
    if args.replot:
        saved = json.loads(raw.read_text())
        for key in ("arch", "np", "batch_per_rank", "epochs", "seeds"):
            setattr(args, key, saved["args"][key])
        results = saved["results"]
    else:
        results = train_all(args)
        raw.write_text(json.dumps({"args": {k: getattr(args, k) for k in ("arch", "np", "batch_per_rank",
                                                                          "epochs", "seeds")},
                                   "results": results}, indent=1))
    plot(results, args.out / "recipe_experiment.png", args)
    write_report(results, args.out / "recipe_experiment.md", args)
    print(f"wrote {args.out / 'recipe_experiment.png'} and {args.out / 'recipe_experiment.md'}")


def train_all(args):
    results = []
    for seed in args.seeds:
        for label, extra in RUNS.items():
            slug = "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")
            log_dir = ROOT / "runs" / "recipe_experiment" / f"{slug}_seed{seed}"
            results.append(run_one(label, extra, seed, args, log_dir))
    return results


if __name__ == "__main__":
    main()
