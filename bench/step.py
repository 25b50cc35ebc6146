"""Images/s of a full ResNet-50 training step on the CPU: ours (NumPy) against PyTorch's
CPU build, same model, batch, resolution and thread count, measured side by side.

A step is forward, softmax cross-entropy, backward and the parameter update: ours with
engine.optimizer.HybridOptimizer over the flat buffers, torch with torch.optim.SGD
(momentum, weight decay; torch has no hybrid rule, and either update is a few
elementwise passes over 25.6M parameters). Torch runs in NCHW and in channels_last; the
faster of the two is the peer. The three steps are timed in turns, and each figure is the
median over its timed steps, so a change in the machine's load hits all three alike.

    python bench/step.py                      # 64 px batch 16, 224 px batch 8, 2 threads
    python bench/step.py --threads 2 --runs 64:16 224:16 --steps 5
    python bench/step.py --runs 224:1 --memory 4 8   # peak memory per image at 224 px

--device gpu: the same step on one GPU, data synthetic and resident on the device (no
loader): torch's torchvision resnet50 (tests/torch_reference.py TorchResNet without
torchvision) in channels_last, in fp32, TF32 and AMP bf16 (torch.autocast bfloat16, float32
weights, SGD momentum), against ours in --precision fp32 / tf32 / bf16 (the hybrid update
over the flat buffers), with the convolutions by im2col and through cuDNN ("cudnn" entries,
--conv), side by side. All entries of a run are timed in turns with CUDA events after
warm-up; each figure is the median of its timed steps, and each of ours is divided by the
BEST torch figure of that run. A time budget (--budget-s, about 3 minutes by default) sets
the number of timed rounds; --json writes the figures after every run.

    python bench/step.py --device gpu                       # 224 px, batch 32 and 256
    python bench/step.py --device gpu --runs 224:32 --json step.json
"""
import argparse
import os
import sys
import time
from pathlib import Path


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: ours (NumPy) against torch's CPU build (default); gpu: see above")
    p.add_argument("--threads", type=int, default=2, help="BLAS / torch threads (default 2)")
    p.add_argument("--runs", nargs="+", default=None,
                   help="SIZE:BATCH pairs to measure (default 64:16 224:8; with --device gpu 224:32 224:256)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps of each, taken in turns (default 4; with --device gpu at most 30, "
                        "fewer when the budget says so)")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="--device gpu: seconds for the whole benchmark, warm-ups included (default 150)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="--device gpu: also our step captured once as a CUDA graph and replayed, as "
                        "engine.train --cuda-graph runs it (engine/graph_step.py)")
    p.add_argument("--conv", nargs="+", choices=("im2col", "cudnn"), default=["im2col", "cudnn"],
                   help="--device gpu: our step with its convolutions by im2col and/or through cuDNN "
                        "(engine.train --conv), side by side (default both)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--profile", action="store_true", help="cProfile our step at the first size")
    p.add_argument("--memory", nargs=2, type=int, metavar=("B1", "B2"),
                   help="instead of timing: peak memory per image at the first size, from the "
                        "peak RSS of one step at batch B1 and at B2 (each in a fresh process)")
    p.add_argument("--probe", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == "gpu"
    args.steps = args.steps if args.steps is not None else (30 if gpu else 4)
    runs = []
    for r in args.runs or (["224:32", "224:256"] if gpu else ["64:16", "224:8"]):
        try:
            size, batch = (int(v) for v in r.split(":"))
        except ValueError:
            p.error(f"--runs: expected SIZE:BATCH, got {r!r}")
        runs.append((size, batch))
    return args, runs


ARGS, RUNS = parse()
# Thread counts must be fixed before NumPy's OpenBLAS starts.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
# Both steps run in this one process, in turns: by default OpenBLAS's idle worker keeps
# spinning on a core after our last GEMM and slows torch's step that follows (torch at
# 64 px measured 39.8 img/s with the spin, 46-47 without). Idle workers sleep at once here;
# our own step is unaffected by this setting (within noise).
os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))      # its torch_reference

import numpy as np  # noqa: E402

from engine.backend import get_backend  # noqa: E402
from engine.loss import softmax_cross_entropy  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.optimizer import make_optimizer  # noqa: E402
from engine.schedule import Coefficients  # noqa: E402
from engine.train import build_parser  # noqa: E402

CLASSES = 1000
COEF = Coefficients(eta=0.1, a_sgd=0.5, a_rms=0.5 * 3e-4 / 0.1)   # mid-warm-up: both terms live
# bytes: engine.train's default --cudnn-workspace-mb
CUDNN_WORKSPACE = int(build_parser().get_default("cudnn_workspace_mb") * (1 << 20))


def our_step(size, batch, backend=None, precision="fp32", conv="im2col"):
    """Our training step on `backend` (the CPU by default) in `precision`, its convolutions
    by im2col or, on a GPU, through cuDNN (`conv`, as engine.train --conv), on a fixed batch
    resident where the model is."""
    backend = backend or get_backend("cpu")
    model = build_model(ARGS.arch, CLASSES, backend, precision=precision)
    if conv == "cudnn":
        from engine.cudnn_conv import route_convolutions
        route_convolutions(model.convs, precision, CUDNN_WORKSPACE)
    opt = make_optimizer("hybrid", model.params, model.layout, backend, team=model.ws.team,
                         weight_copy=model.params_lp)
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((batch, size, size, 3)).astype(np.float32).astype(model.input_dtype))
    labels = backend.asarray(rng.integers(0, CLASSES, batch))

    def step():
        _, dlogits = softmax_cross_entropy(model.forward(x, train=True), labels, 0.1)
        model.backward(dlogits)
        opt.step(model.grads, coef=COEF)
    step.optimizer = opt
    return step


def torch_training_step(net, x, labels, precision="fp32"):
    """torch's step on `net` and a fixed batch: SGD momentum; `precision` fp32, tf32 (TF32
    tensor cores for matmuls and convolutions) or bf16 (autocast to bfloat16, float32 weights)."""
    import contextlib
    import torch
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    on_gpu = x.is_cuda

    def autocast():
        if precision == "bf16":
            return torch.autocast(x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step():
        if on_gpu:     # process-wide flags, and entries of several precisions run in turns
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        opt.zero_grad(set_to_none=False)
        with autocast():
            loss = torch.nn.functional.cross_entropy(net(x), labels, label_smoothing=0.1)
        loss.backward()
        opt.step()
    return step


def torch_step(size, batch, channels_last):
    import torch
    from torch_reference import TorchResNet
    torch.set_num_threads(ARGS.threads)
    torch.manual_seed(0)
    net = TorchResNet(ARGS.arch, CLASSES).train()
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return torch_training_step(net, x, torch.randint(0, CLASSES, (batch,)))


def interleaved_medians(steps, rounds):
    """Median wall time and median CPU time (all threads of this process) of each step
    function, timed in turns (one of each per round), so a change in the machine's load
    hits all of them alike."""
    for step in steps:
        step()                                  # warm-up: buffers, workspaces, caches
    wall, cpu = [[] for _ in steps], [[] for _ in steps]
    for _ in range(rounds):
        for step, w, c in zip(steps, wall, cpu):
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            w.append(time.perf_counter() - start)
            c.append(time.process_time() - start_cpu)
    return [float(np.median(t)) for t in wall], [float(np.median(t)) for t in cpu]


def profile(step):
    import cProfile
    import pstats
    step()
    cProfile.runctx("step()", globals(), {"step": step}, "/tmp/step.prof")
    pstats.Stats("/tmp/step.prof").sort_stats("tottime").print_stats(25)


def peak_rss_of_steps(who, size, batch):
    """Peak resident memory (bytes) of this process after two training steps."""
    import resource
    step = our_step(size, batch) if who == "ours" else torch_step(size, batch, channels_last=False)
    step()
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_per_image(size, b1, b2):
    """(peak(b2) - peak(b1)) / (b2 - b1): what one more image costs, model and workspace
    fixed costs cancelled."""
    import subprocess
    print(f"{ARGS.arch} training step at {size} px: peak memory per image from batch {b1} to {b2}")
    for who in ("ours", "torch"):
        peaks = []
        for b in (b1, b2):
            out = subprocess.run([sys.executable, __file__, "--threads", str(ARGS.threads), "--arch", ARGS.arch,
                                  "--runs", f"{size}:{b}", "--probe", who],
                                 check=True, capture_output=True, text=True).stdout
            peaks.append(int(out.split()[-1]))
        per_image = (peaks[1] - peaks[0]) / (b2 - b1)
        print(f"{who:>6}: peak {peaks[0] / 2**20:.0f} MiB at batch {b1}, {peaks[1] / 2**20:.0f} MiB at batch {b2}, "
              f"{per_image / 2**20:.1f} MiB per image")


# ---- --device gpu ---------------------------------------------------------------------------

PRECISIONS = ("fp32", "tf32", "bf16")
WARMUP = 2          # the first step compiles kernels, autotunes cuDNN and fills the pools
MIN_ROUNDS = 3


class Unavailable(Exception):
    """An entry that this build cannot measure (said in the table, not an error)."""


def torch_gpu_net():
    """(torch ResNet on the GPU in channels_last, which implementation it is)."""
    import torch
    torch.manual_seed(0)
    try:
        import torchvision
        net, source = getattr(torchvision.models, ARGS.arch)(num_classes=CLASSES), f"torchvision {torchvision.__version__}"
    except ImportError:
        from torch_reference import TorchResNet
        net, source = TorchResNet(ARGS.arch, CLASSES), "tests/torch_reference.py TorchResNet (no torchvision)"
    return net.cuda().train().to(memory_format=torch.channels_last), source


def torch_gpu_step(size, batch, precision):
    import torch
    net, _ = torch_gpu_net()
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    return torch_training_step(net, x, torch.randint(0, CLASSES, (batch,), device="cuda"), precision)


def our_graph_step(size, batch, backend, precision, conv):
    """Our step run by engine.graph_step.GraphedStep, as --cuda-graph runs the trainer's: its
    eager warm-up steps, then the capture and its first replay, all before the timing."""
    from types import SimpleNamespace
    from engine.graph_step import WARMUP_STEPS, GraphedStep
    step = our_step(size, batch, backend, precision, conv)
    graphed = GraphedStep(backend, lambda images, labels, coef: step(), step.optimizer, 1.0)
    # The batch is already resident (as in our_step); a token one goes through the copies.
    token = SimpleNamespace(images=np.zeros(1, np.uint8), labels=np.zeros(1, np.int64))

    def replay():
        graphed(token, COEF)
    for _ in range(WARMUP_STEPS + 1):
        replay()
    return replay


def gpu_entries(size, batch, backend):
    """(name, builder of the step function) of every entry of one run, torch's first."""
    entries = [(f"torch {p if p != 'bf16' else 'bf16-amp'}", lambda p=p: torch_gpu_step(size, batch, p))
               for p in PRECISIONS]
    for conv in ARGS.conv:
        name = "" if conv == "im2col" else " cudnn"
        entries += [(f"ours {p}{name}", lambda p=p, c=conv: our_step(size, batch, backend, p, c)) for p in PRECISIONS]
        if ARGS.cuda_graph:
            entries += [(f"ours {p}{name} graph", lambda p=p, c=conv: our_graph_step(size, batch, backend, p, c))
                        for p in PRECISIONS]
    return entries


def cuda_clock():
    """A pair of timing events on the current (null) stream, which CuPy and torch share."""
    import cupy
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    return start, end, lambda: cupy.cuda.get_elapsed_time(start, end) / 1e3


def device_sync():
    import cupy
    cupy.cuda.Device().synchronize()


def error_text(e):
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def build_and_warm(entries):
    """{name: step function} of the entries that build and survive WARMUP steps, and
    {name: why not} of the others; one failure never stops the rest."""
    steps, failed = {}, {}
    for name, build in entries:
        try:
            step = build()
            for _ in range(WARMUP):
                step()
            device_sync()
            steps[name] = step
        except Unavailable as e:
            failed[name] = f"not measured: {e}"
        except Exception as e:      # an error of one entry (out of memory, a CUDA error) is its result
            failed[name] = f"failed: {error_text(e)}"
    return steps, failed


def one_round(steps, times, host, failed):
    """One step of each entry, in turns, timed with CUDA events; one sync at the end of the
    round, so no entry's step waits on the host between its launches and the event."""
    pending = []
    for name in list(steps):
        start, end, seconds = cuda_clock()
        start.record()
        t0 = time.perf_counter()
        try:
            steps[name]()
        except Exception as e:
            failed[name] = f"failed while timed: {error_text(e)}"
            del steps[name]
            continue
        host[name].append(time.perf_counter() - t0)
        end.record()
        pending.append((name, seconds))
    device_sync()
    for name, seconds in pending:
        times[name].append(seconds())


def time_gpu_run(size, batch, backend, budget_s):
    """Figures of one run: {name: {...}} with img/s, ms per step (median over the timed
    steps), host ms per step (time to queue the step), timed steps; or why not."""
    started = time.perf_counter()
    steps, failed = build_and_warm(gpu_entries(size, batch, backend))
    times, host = {n: [] for n in steps}, {n: [] for n in steps}
    rounds = 0
    while steps and rounds < ARGS.steps:
        t0 = time.perf_counter()
        one_round(steps, times, host, failed)
        rounds += 1
        left = budget_s - (time.perf_counter() - started)
        if rounds >= MIN_ROUNDS and left < time.perf_counter() - t0:
            break
    results = {}
    for name, t in times.items():
        if name in steps and t:
            med = float(np.median(t))
            results[name] = {"images_per_s": batch / med, "ms_per_step": 1e3 * med,
                             "host_ms_per_step": 1e3 * float(np.median(host[name])), "timed_steps": len(t)}
    results.update({name: {"error": why} for name, why in failed.items()})
    best = max((r["images_per_s"] for n, r in results.items() if n.startswith("torch") and "error" not in r),
               default=None)
    for name, r in results.items():
        if name.startswith("ours") and "error" not in r and best:
            r["over_best_torch"] = r["images_per_s"] / best
    return {"size": size, "batch": batch, "rounds": rounds, "seconds": time.perf_counter() - started,
            "best_torch_images_per_s": best, "entries": results}


def free_device_pools():
    """Give each run the whole device: the previous run's cached blocks go back."""
    import cupy
    import torch
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def print_gpu_run(run, order):
    print(f"{run['size']} px, batch {run['batch']}: {run['rounds']} rounds in turns after {WARMUP} warm-up "
          f"steps, {run['seconds']:.0f} s")
    print(f"  {'entry':<20} {'img/s':>8} {'ms/step':>8} {'host ms':>8} {'vs best torch':>14}")
    for name in order:
        r = run["entries"][name]
        if "error" in r:
            print(f"  {name:<20} {r['error']}")
            continue
        ratio = f"{r['over_best_torch']:.2f}" if "over_best_torch" in r else ""
        print(f"  {name:<20} {r['images_per_s']:>8.1f} {r['ms_per_step']:>8.2f} {r['host_ms_per_step']:>8.2f} "
              f"{ratio:>14}", flush=True)


def gpu_setup():
    """The versions and device of this run, for the table's head and the JSON."""
    import cupy
    import torch
    runtime = cupy.cuda.runtime
    props = runtime.getDeviceProperties(cupy.cuda.Device().id)
    _, source = torch_gpu_net()
    return {"arch": ARGS.arch, "device": props["name"].decode(), "cupy": cupy.__version__,
            "cuda_runtime": runtime.runtimeGetVersion(), "driver": runtime.driverGetVersion(),
            "torch": torch.__version__, "torch_model": source, "cudnn": torch.backends.cudnn.version()}


def gpu_main():
    from engine.backend import probe_gpus
    found = probe_gpus()
    if found.count == 0:
        return f"bench/step.py --device gpu: no usable CUDA device: {found.reason}"
    import torch
    started = time.perf_counter()
    backend = get_backend("gpu", local_rank=0)
    torch.cuda.set_device(backend.device_id)
    torch.backends.cudnn.benchmark = True       # the fast peer: cuDNN's autotuned algorithms
    report = {"setup": gpu_setup(), "runs": []}
    print("{arch} training step on {device}: CuPy {cupy}, CUDA runtime {cuda_runtime}, driver {driver}, "
          "torch {torch} (cuDNN {cudnn}), torch model: {torch_model}".format(**report["setup"]))
    for i, (size, batch) in enumerate(RUNS):
        budget = (ARGS.budget_s - (time.perf_counter() - started)) / (len(RUNS) - i)
        run = time_gpu_run(size, batch, backend, budget)
        report["runs"].append(run)
        print_gpu_run(run, [name for name, _ in gpu_entries(size, batch, backend)])
        free_device_pools()
        report["seconds"] = time.perf_counter() - started
        write_json(report)
    print(f"vs best torch = our images/s over the best torch entry of that run; "
          f"total {time.perf_counter() - started:.0f} s")
    failed = [n for run in report["runs"] for n, r in run["entries"].items() if r.get("error", "").startswith("failed")]
    return f"failed entries: {', '.join(sorted(set(failed)))}" if failed else 0


def write_json(report):
    if ARGS.json:
        import json
        Path(ARGS.json).write_text(json.dumps(report, indent=1) + "\n")


def main():
    if ARGS.probe:
        size, batch = RUNS[0]
        print(peak_rss_of_steps(ARGS.probe, size, batch))
        return
    if ARGS.memory:
        memory_per_image(RUNS[0][0], *ARGS.memory)
        return
    print(f"{ARGS.arch} training step, {ARGS.threads} threads, median of {ARGS.steps} steps")
    print(f"{'size':>5} {'batch':>5} {'ours img/s':>11} {'torch NCHW':>11} {'torch NHWC':>11} {'ratio':>7}"
          f" {'cpu-time ratio':>15}")
    report = {"arch": ARGS.arch, "threads": ARGS.threads, "steps": ARGS.steps, "runs": []}
    for i, (size, batch) in enumerate(RUNS):
        steps = [our_step(size, batch), torch_step(size, batch, False), torch_step(size, batch, True)]
        if ARGS.profile and i == 0:
            profile(steps[0])
        (t_ours, t_nchw, t_nhwc), (c_ours, c_nchw, c_nhwc) = interleaved_medians(steps, ARGS.steps)
        del steps
        best = min(t_nchw, t_nhwc)
        print(f"{size:>5} {batch:>5} {batch / t_ours:>11.1f} {batch / t_nchw:>11.1f} "
              f"{batch / t_nhwc:>11.1f} {best / t_ours:>7.2f} {min(c_nchw, c_nhwc) / c_ours:>15.2f}", flush=True)
        report["runs"].append({"size": size, "batch": batch, "ours": batch / t_ours, "torch_nchw": batch / t_nchw,
                               "torch_nhwc": batch / t_nhwc, "ratio": best / t_ours})
        write_json(report)
    print("ratio = our images/s over the faster torch layout's, from wall time (above 1: we are faster);")
    print("cpu-time ratio = the same from the CPU time the process used: steadier on a loaded")
    print("machine, but it counts threads spinning at barriers (compare at --threads 1)")


if __name__ == "__main__":
    sys.exit(gpu_main() if ARGS.device == "gpu" else main())
