"""How much of the gradient all-reduce hides behind backprop: a sweep over bucket sizes.

    .venv/bin/python bench/overlap.py                 # spawns mpiexec -n 2 itself
    .venv/bin/python bench/overlap.py --np 4 --arch resnet50 --px 64 --buckets 0,1,4,25

Every rank runs the real training step (ResNet forward, loss, backward, optimizer update)
on its own random batch, in these modes, each timed for --steps steps after a warm-up step (one step of every mode per round, so
load drift on a shared machine hits all modes alike):

    compute    backward with no communication at all (the floor)
    serial     all buckets all-reduced after backward, then the update
    wait-all   buckets launched from backward as they complete; wait for all, one update
    per-bucket buckets launched from backward; each bucket updated as soon as it lands
    early      as per-bucket, but updates may already run inside backward

For each bucket size it prints the median step time (slowest rank), and the hidden
fraction two ways (docs/overlap.md, "Reading the overlap figures"):

    hidden (steps) = (serial - overlapped) / (serial - compute)
    hidden (trace) = from the timeline: all-reduce time covered by compute / all-reduce time

A table goes to stdout, the numbers to OUT.json and a plot to OUT.png.

--predict validates engine.simulate against this machine, in the same MPI job: besides the
compute, serial and per-bucket steps it measures (1) the all-reduce time of a sweep of
sizes (fit T = a + b * bytes, hence the ring's alpha and bandwidth), (2) the per-layer
profile of compute-only steps (a trace with engine.trace.instrument, OUT.rank0.json),
(3) contention: how much slower compute runs while all-reduces are in flight and how much
slower all-reduces run while compute runs. It then predicts the compute, serial and
per-bucket step times from those alone and prints the error per configuration:

    .venv/bin/python bench/overlap.py --predict --np 2 --arch resnet50 --px 64 --batch 8 --buckets 0,4,25 --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# As the job does (engine/train.py): OpenBLAS's workers sleep at once after a GEMM instead of
# spinning on the cores the next layer's work is split over; read when NumPy loads.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODES = ("compute", "serial", "wait-all", "per-bucket", "early")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=2, help="MPI ranks (default 2)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--px", type=int, default=32, help="image size (default 32)")
    p.add_argument("--batch", type=int, default=8, help="images per rank (default 8)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--buckets", default="0,1,4,16,64", help="bucket sizes in MB, 0 = per layer")
    p.add_argument("--first-bucket-mb", type=float, default=0.25)
    p.add_argument("--fp16", action="store_true", help="FP16 all-reduce")
    p.add_argument("--poll-us", type=float, default=200.0,
                   help="MPI communication thread: test interval in us, 0 = blocking waits (default 200)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration (round-robin)")
    p.add_argument("--out", default="runs/overlap", help="OUT.json and OUT.png are written")
    p.add_argument("--predict", action="store_true",
                   help="also fit engine.simulate's inputs in this run and predict the measured steps")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.bucket_list = [float(b) for b in a.buckets.split(",")]
    if a.np < 1 or a.steps < 1 or a.batch < 1 or any(b < 0 for b in a.bucket_list):
        p.error("--np, --steps, --batch must be >= 1 and bucket sizes >= 0")
    return a


# ---------------------------------------------------------------- one rank's measurements ----

def worker(a) -> None:
    from mpi4py import MPI
    from engine import guard
    from engine.backend import get_backend
    from engine.comm import create_communicator
    from engine.loss import softmax_cross_entropy
    from engine.model import build_model
    from engine.optimizer import make_optimizer
    from engine.reducer import Reducer
    from engine.schedule import Coefficients
    from engine.trace import Timeline

    guard.install()
    world = MPI.COMM_WORLD
    be = get_backend("cpu")
    comm = create_communicator(be, world, poll_s=a.poll_us * 1e-6)
    model = build_model(a.arch, a.classes, be, seed=0)
    opt = make_optimizer("sgd", model.params, model.layout, be)
    coef = Coefficients(eta=1e-3)
    rng = np.random.default_rng([1, comm.rank])
    x = rng.standard_normal((a.batch, a.px, a.px, 3)).astype(np.float32)
    y = rng.integers(0, a.classes, a.batch)
    scale = 1.0 / comm.size

    def one_step(mode, reducer, tl):
        tl.begin_step(0)
        with tl.span("forward", "forward"):
            _, dlogits = softmax_cross_entropy(model.forward(x, train=True), y)
        overlapped = mode in ("wait-all", "per-bucket", "early")
        if mode == "early":
            reducer.prepare(lambda s, e: opt.update(reducer.reduced, s, e, coef=coef, grad_scale=scale))
        with tl.span("backward", "backward"):
            model.backward(dlogits, grad_ready=reducer.grad_ready if overlapped else None)
        if mode == "compute":
            with tl.span("update", "update"):
                opt.step(model.grads, coef=coef, grad_scale=scale)
        else:
            if mode == "serial":
                reducer.all_reduce_after_backward()
            if mode == "wait-all":
                reducer.finish()
                with tl.span("update", "update"):
                    opt.step(reducer.reduced, coef=coef, grad_scale=scale)
            else:
                reducer.finish(update=lambda s, e: opt.update(reducer.reduced, s, e, coef=coef,
                                                              grad_scale=scale))
        return tl.end_step()

    # Configurations are timed round-robin, one step each per round, so that drift in the
    # machine's load (other processes, caches) spreads over all of them alike.
    modes = ("serial", "per-bucket") if a.predict else MODES[1:]
    configs = [("compute", None)] + [(m, b) for b in a.bucket_list for m in modes]
    runs = []
    profile_tl = None
    if a.predict:       # per-layer spans of the compute-only steps, timed among the others
        from engine.trace import instrument
        profile_tl = Timeline(f"{a.out}.rank{comm.rank}.json", rank=comm.rank)
        instrument(model, profile_tl)
        profile_tl.instant("profile", {"batch": a.batch})
    for mode, bucket_mb in configs:
        tl = profile_tl if mode == "compute" and profile_tl else Timeline(None, rank=comm.rank)
        reducer = Reducer(model.layout, model.grads, comm, bucket_mb=bucket_mb or 0.0,
                          first_bucket_mb=a.first_bucket_mb, fp16=a.fp16, timeline=tl,
                          early_update=(mode == "early"))
        if bucket_mb == 0 and mode == "serial":
            one_step("wait-all", reducer, tl)        # per-layer buckets are learnt from one step
        one_step(mode, reducer, tl)                  # warm-up
        runs.append((mode, bucket_mb, reducer, tl, [], []))
    for _ in range(a.steps):
        for mode, _, reducer, tl, times, figures in runs:
            world.Barrier()
            t0 = time.perf_counter()
            figures.append(one_step(mode, reducer, tl))
            times.append(time.perf_counter() - t0)
    results = []
    for mode, bucket_mb, reducer, tl, times, figures in runs:
        slowest = world.allreduce(float(np.median(times)), op=MPI.MAX)
        comm_s = world.allreduce(float(np.median([f["comm_s"] for f in figures])), op=MPI.MAX)
        exposed = world.allreduce(float(np.median([f["exposed_s"] for f in figures])), op=MPI.MAX)
        results.append({"mode": mode, "bucket_mb": bucket_mb, "buckets": len(reducer.buckets) or None,
                        "step_s": slowest, "comm_s": comm_s, "exposed_s": exposed})
    fitted = measure_model_inputs(a, world, comm, model) if a.predict else None
    if profile_tl:
        profile_tl.close()
    comm.close()
    if comm.rank == 0:
        print("RESULTS " + json.dumps(results), flush=True)
        if fitted:
            print("FITTED " + json.dumps(fitted), flush=True)


# ------------------------------------------------------------- --predict: the model's inputs ----

def measure_model_inputs(a, world, comm, model) -> dict:
    """All-reduce sweep and contention (module docstring), after the timed steps."""
    from mpi4py import MPI

    def slowest(seconds):
        return world.allreduce(float(seconds), op=MPI.MAX)

    sizes, times = [4 << (2 * k) for k in range(3, 12)], []      # 256 B .. 16 MB
    for nbytes in sizes:
        buf = np.zeros(nbytes // 4, np.float32)
        runs = []
        for _ in range(5):
            world.Barrier()
            t0 = time.perf_counter()
            comm.allreduce_async(buf, "sum").wait()
            runs.append(time.perf_counter() - t0)
        times.append(slowest(np.median(runs)))
    b, a0 = np.polyfit(sizes, times, 1, w=1 / np.asarray(times))     # relative residuals
    # Contention: a queue of all-reduces, alone, then with backward passes running beside it.
    x = np.random.default_rng(comm.rank).standard_normal((a.batch, a.px, a.px, 3)).astype(np.float32)

    def pass_():
        from engine.loss import softmax_cross_entropy
        _, d = softmax_cross_entropy(model.forward(x, train=True), np.zeros(a.batch, np.int64))
        model.backward(d)

    pass_()
    world.Barrier()
    t0 = time.perf_counter()
    pass_()
    alone = slowest(time.perf_counter() - t0)
    buf = np.zeros(4 << 20, np.float32)
    count = int(np.ceil(4 * alone / (a0 + b * buf.nbytes)))

    def queue(compute: bool):
        world.Barrier()
        works = [comm.allreduce_async(buf, "sum") for _ in range(count)]
        passes = []
        while compute and not works[-1].done():
            t = time.perf_counter()
            pass_()
            if not works[-1].done():           # the pass ran entirely beside communication
                passes.append(time.perf_counter() - t)
        for w in works:
            w.wait()
        return works[-1].finished_at - works[0].started_at, passes

    comm_alone, _ = queue(False)
    comm_shared, passes = queue(True)
    return {"sizes": sizes, "times": times, "a": float(a0), "b": float(b),
            "contention": max(0.0, slowest(np.median(passes) if passes else alone) / alone - 1),
            "comm_contention": max(0.0, slowest(comm_shared) / slowest(comm_alone) - 1),
            "passes_beside_comm": len(passes)}


def predict(results, fitted, a) -> list:
    """engine.simulate's step times for the measured configurations, with and without
    contention, beside the measured ones. Collectives make every rank wait for the slowest,
    so the profile is the slowest rank's (largest compute-only total)."""
    from engine.simulate import Link, Network, ring_link_from_fit, run_step, trace_profile
    profiles = [trace_profile(f"{a.out}.rank{r}.json", a.arch, a.classes) for r in range(a.np)]
    profile = max(profiles, key=lambda p: sum(l.forward_s + l.backward_s for l in p.layers) + p.other_s)
    p = a.np
    # one rank communicates nothing (its all-reduce is a copy the model does not count): any link will do
    link = ring_link_from_fit(fitted["a"], fitted["b"], p) if p > 1 else Link(0.0, 1.0)
    rows = []
    for r in results:
        mode = {"compute": "compute", "serial": "serial", "per-bucket": "overlap"}[r["mode"]]
        row = {"mode": r["mode"], "bucket_mb": r["bucket_mb"], "measured_s": r["step_s"]}
        for key, (kc, km) in (("predicted_s", (fitted["contention"], fitted["comm_contention"])),
                              ("no_contention_s", (0.0, 0.0))):
            net = Network(p, p, link, link, "ring", "fp16" if a.fp16 else "fp32", r["bucket_mb"] or 0.0,
                          a.first_bucket_mb, kc, km)
            row[key] = max(e for _, _, _, e, _ in run_step(profile, net, mode))
        row["error"] = row["predicted_s"] / row["measured_s"] - 1
        rows.append(row)
    return rows


def prediction_table(rows, fitted, a) -> str:
    errors = [abs(r["error"]) for r in rows if r["mode"] != "compute"]   # compute: the profile itself
    lines = [f"engine.simulate against the measured steps ({a.arch} {a.px}px, {a.batch}/rank, {a.np} ranks; "
             f"fp16 packing is not modelled)" if a.fp16 else
             f"engine.simulate against the measured steps ({a.arch} {a.px}px, {a.batch}/rank, {a.np} ranks)",
             f"all-reduce fit: T = {fitted['a'] * 1e6:.0f} us + bytes / {1 / fitted['b'] / 1e9:.2f} GB/s; "
             f"contention: compute x{1 + fitted['contention']:.2f} beside comm "
             f"({fitted['passes_beside_comm']} passes), comm x{1 + fitted['comm_contention']:.2f} beside compute",
             f"{'bucket MB':>9} {'mode':>10} {'measured ms':>11} {'predicted ms':>12} {'error':>7} {'no contention':>13}"]
    for r in rows:
        b = "-" if r["bucket_mb"] is None else ("layer" if r["bucket_mb"] == 0 else f"{r['bucket_mb']:g}")
        lines.append(f"{b:>9} {r['mode']:>10} {r['measured_s'] * 1e3:11.1f} {r['predicted_s'] * 1e3:12.1f} "
                     f"{r['error']:+7.1%} {r['no_contention_s'] * 1e3:13.1f}")
    lines.append(f"serial and per-bucket rows: median absolute error {np.median(errors):.1%}, largest "
                 f"{max(errors):.1%} (the compute row is the profile's own median step)")
    return "\n".join(lines)


# -------------------------------------------------------------------- driver: launch, report ----

def launch(a) -> tuple[list, dict | None]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(max(1, (os.cpu_count() or 1) // a.np)))
    cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(a.np), sys.executable, __file__,
           "--worker", *sys.argv[1:]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULTS ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"bench/overlap.py: the MPI job failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
    fitted = [l for l in out.stdout.splitlines() if l.startswith("FITTED ")]
    return json.loads(lines[-1][len("RESULTS "):]), (json.loads(fitted[-1][len("FITTED "):]) if fitted else None)


def summarize(results) -> list:
    compute = next(r["step_s"] for r in results if r["mode"] == "compute")
    rows = []
    for r in results:
        row = dict(r)
        serial = next((s["step_s"] for s in results if s["mode"] == "serial"
                       and s["bucket_mb"] == r["bucket_mb"]), None)
        if r["mode"] in ("wait-all", "per-bucket", "early") and serial is not None and serial > compute:
            row["hidden_steps"] = (serial - r["step_s"]) / (serial - compute)
        if r["mode"] != "compute" and r["comm_s"] > 0:
            row["hidden_trace"] = (r["comm_s"] - r["exposed_s"]) / r["comm_s"]
        row["vs_compute"] = r["step_s"] / compute
        rows.append(row)
    return rows


def table(rows, a) -> str:
    head = (f"{a.arch} {a.px}px, {a.batch} images/rank, {a.np} ranks, fp16 all-reduce: {a.fp16}, "
            f"MPI poll {a.poll_us:g} us\n"
            f"{'bucket MB':>9} {'buckets':>7} {'mode':>10} {'step ms':>8} {'x compute':>9} "
            f"{'comm ms':>8} {'exposed ms':>10} {'hidden(steps)':>13} {'hidden(trace)':>13}")
    lines = [head]
    for r in rows:
        b = "-" if r["bucket_mb"] is None else ("layer" if r["bucket_mb"] == 0 else f"{r['bucket_mb']:g}")
        hs = f"{r['hidden_steps']:.0%}" if "hidden_steps" in r else "-"
        ht = f"{r['hidden_trace']:.0%}" if "hidden_trace" in r else "-"
        lines.append(f"{b:>9} {r['buckets'] or '-':>7} {r['mode']:>10} {r['step_s'] * 1e3:8.1f} "
                     f"{r['vs_compute']:9.2f} {r['comm_s'] * 1e3:8.1f} {r['exposed_s'] * 1e3:10.1f} {hs:>13} {ht:>13}")
    return "\n".join(lines)


def plot(rows, a, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    compute = next(r["step_s"] for r in rows if r["mode"] == "compute")
    labels = ["layer" if b == 0 else f"{b:g}" for b in a.bucket_list]
    xs = np.arange(len(a.bucket_list))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ran = [m for m in MODES[1:] if any(r["mode"] == m for r in rows)]
    for mode in ran:
        ys = [next(r["step_s"] for r in rows if r["mode"] == mode and r["bucket_mb"] == b) * 1e3
              for b in a.bucket_list]
        ax1.plot(xs, ys, marker="o", label=mode)
    ax1.axhline(compute * 1e3, color="gray", linestyle="--", label="compute only")
    ax1.set(xticks=xs, xticklabels=labels, xlabel="bucket size (MB)", ylabel="step time (ms, slowest rank)",
            title=f"{a.arch} {a.px}px, {a.batch}/rank, {a.np} ranks")
    ax1.legend()
    for mode in ran[1:]:
        ys = [next(r.get("hidden_steps", np.nan) for r in rows if r["mode"] == mode and r["bucket_mb"] == b)
              for b in a.bucket_list]
        line, = ax2.plot(xs, ys, marker="o", label=f"{mode} (steps)")
        ys = [next(r.get("hidden_trace", np.nan) for r in rows if r["mode"] == mode and r["bucket_mb"] == b)
              for b in a.bucket_list]
        ax2.plot(xs, ys, marker="x", linestyle=":", color=line.get_color(), label=f"{mode} (trace)")
    ax2.set(xticks=xs, xticklabels=labels, xlabel="bucket size (MB)", ylabel="hidden fraction",
            title="communication hidden behind compute", ylim=(-0.2, 1.05))
    ax2.axhline(0, color="gray", linewidth=0.5)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    a = parse(argv)
    if a.worker:
        worker(a)
        return
    t0 = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results, fitted = launch(a)
    rows = summarize(results)
    print(table(rows, a))
    report = {"args": vars(a), "rows": rows}
    if fitted:
        report["fitted"], report["prediction"] = fitted, predict(results, fitted, a)
        print(prediction_table(report["prediction"], fitted, a))
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(rows, a, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
