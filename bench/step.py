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
"""
import argparse
import os
import sys
import time
from pathlib import Path


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="BLAS / torch threads (default 2)")
    p.add_argument("--runs", nargs="+", default=["64:16", "224:8"],
                   help="SIZE:BATCH pairs to measure (default 64:16 224:8)")
    p.add_argument("--steps", type=int, default=4, help="timed steps of each (after 1 warm-up), taken in turns")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--profile", action="store_true", help="cProfile our step at the first size")
    p.add_argument("--memory", nargs=2, type=int, metavar=("B1", "B2"),
                   help="instead of timing: peak memory per image at the first size, from the "
                        "peak RSS of one step at batch B1 and at B2 (each in a fresh process)")
    p.add_argument("--probe", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    runs = []
    for r in args.runs:
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

import numpy as np  # noqa: E402

from engine.backend import get_backend  # noqa: E402
from engine.loss import softmax_cross_entropy  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.optimizer import HybridOptimizer  # noqa: E402
from engine.schedule import Coefficients  # noqa: E402

CLASSES = 1000
COEF = Coefficients(eta=0.1, a_sgd=0.5, a_rms=0.5 * 3e-4 / 0.1)   # mid-warm-up: both terms live


def our_step(size, batch):
    model = build_model(ARGS.arch, CLASSES, get_backend("cpu"))
    opt = HybridOptimizer(model.params, model.layout, np, team=model.ws.team)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, batch)

    def step():
        _, dlogits = softmax_cross_entropy(model.forward(x, train=True), labels, 0.1)
        model.backward(dlogits)
        opt.step(model.grads, coef=COEF)
    return step


def torch_step(size, batch, channels_last):
    import torch
    from engine.torch_reference import TorchResNet
    torch.set_num_threads(ARGS.threads)
    torch.manual_seed(0)
    net = TorchResNet(ARGS.arch, CLASSES).train()
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (batch,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(net(x), labels, label_smoothing=0.1).backward()
        opt.step()
    return step


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
    for i, (size, batch) in enumerate(RUNS):
        steps = [our_step(size, batch), torch_step(size, batch, False), torch_step(size, batch, True)]
        if ARGS.profile and i == 0:
            profile(steps[0])
        (t_ours, t_nchw, t_nhwc), (c_ours, c_nchw, c_nhwc) = interleaved_medians(steps, ARGS.steps)
        del steps
        best = min(t_nchw, t_nhwc)
        print(f"{size:>5} {batch:>5} {batch / t_ours:>11.1f} {batch / t_nchw:>11.1f} "
              f"{batch / t_nhwc:>11.1f} {best / t_ours:>7.2f} {min(c_nchw, c_nhwc) / c_ours:>15.2f}", flush=True)
    print("ratio = our images/s over the faster torch layout's, from wall time (above 1: we are faster);")
    print("cpu-time ratio = the same from the CPU time the process used: steadier on a loaded")
    print("machine, but it counts threads spinning at barriers (compare at --threads 1)")


if __name__ == "__main__":
    main()
