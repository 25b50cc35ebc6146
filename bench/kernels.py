"""Kernel benchmarks in llm.c's manner: each kernel validated against the CPU path, then timed.

    python bench/kernels.py            # no GPU: static report + CPU path timing
    python bench/kernels.py --gpu      # on a GPU: validate, then time each CUDA kernel

Without a GPU it prints, for every kernel and sm_70/sm_80/sm_90, what ptxas reports
(registers, spills) and the widths of its global loads (PTX for all three; SASS through
nvdisasm for sm_80/sm_90), then times the CPU path (engine.hostmath, the host build of the
same math) against a NumPy-expression version of the same formulas measured in the same
run, and reports the bytes each fused kernel moves over the minimum (each input read once,
each output written once), from its access pattern.

With --gpu, each kernel is first compared with the CPU path, then timed with CUDA events,
the L2 cache flushed between repeats, the median kept; achieved GB/s (minimum bytes / time)
is reported against a device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))      # its kernel_check
import kernel_check as kc  # noqa: E402
from engine import batchnorm, hostmath, precision  # noqa: E402
from engine.parallel import Team  # noqa: E402

HYPER = dict(eta=0.8, a_sgd=0.6, a_rms=0.3, mu1=0.9, mu2=0.99, eps=1e-8, wd=5e-4, gscale=1 / 64)
RESNET50_PARAMS = 25_557_032


# ---- traffic model: bytes per element of each fused op --------------------------------
# (minimum: each input read once, each output written once; kernel: what the launches read
# and write, by their access pattern; per-channel vectors are negligible and left out)
def traffic(op: str) -> tuple[float, float]:
    table = {
        # w, d, m, g read, mask byte read; w, d, m written
        "hybrid_update_f32": (4 * 4 + 1 + 3 * 4, 4 * 4 + 1 + 3 * 4),
        "hybrid_update_f16": (3 * 4 + 2 + 1 + 3 * 4, 3 * 4 + 2 + 1 + 3 * 4),
        "sgd_update_f32": (3 * 4 + 1 + 2 * 4, 3 * 4 + 1 + 2 * 4),
        # x read, y written; the statistics pass reads x once more
        "bn_train_forward": (4 + 4, 2 * 4 + 4),
        # dy, x, y (ReLU mask) read, dx written; the reduction pass reads dy, x, y once more
        "bn_backward_relu": (3 * 4 + 4, 2 * 3 * 4 + 4),
        "bn_infer": (4 + 4, 4 + 4),
        "pack_fp16": (4 + 2, 4 + 2),
        "unpack_fp16": (2 + 4, 2 + 4),
    }
    return table[op]


# ---- NumPy-expression peers of the CPU path -------------------------------------------

def numpy_hybrid(w, d, m, g, mask, eta, a_sgd, a_rms, mu1, mu2, eps, wd, gscale):
    """The same formulas as NumPy expressions (temporaries, one pass per operator)."""
    g = g.astype(np.float32) * np.float32(gscale) + np.float32(wd) * mask * w
    m *= np.float32(mu2)
    m += np.float32(1 - mu2) * g * g
    d *= np.float32(mu1)
    d -= (np.float32(a_sgd) + np.float32(a_rms) / (np.sqrt(m) + np.float32(eps))) * g
    w += np.float32(eta) * d


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---- static report ------------------------------------------------------------------

def static_report():
    print(f"== static report (NVRTC {'.'.join(map(str, kc.nvrtc_version()))}, the loader's options "
          f"{' '.join(kc.NVRTC_OPTIONS[:1])} ..., no GPU needed)")
    print(f"{'kernel':24s} {'arch':6s} {'regs':>4s} {'spill':>5s}  global loads by width, bits:count (PTX | SASS)")
    for path in kc.kernel_files():
        for arch in kc.ARCHS:
            out = kc.compile_kernel_file(path, arch, (kc.PTXAS_VERBOSE,))
            ptx = kc.global_load_widths(out.ptx)
            sass = kc.sass_global_load_widths(out.cubin) if arch in kc.SASS_ARCHS else None
            for name, info in sorted(kc.ptxas_report(out.log).items()):
                fmt = lambda w: " ".join(f"{b}:{c}" for b, c in sorted(w.items(), reverse=True))
                sass_txt = fmt(sass[name]) if sass else "(nvdisasm 13 reads no sm_70)"
                print(f"{name:24s} {arch:6s} {info.registers:4d} {info.spill_stores + info.spill_loads:5d}  "
                      f"{fmt(ptx[name])} | {sass_txt}")


# ---- CPU path -------------------------------------------------------------------------

def cpu_bench(n, rows, C, repeats, threads):
    rng = np.random.default_rng(0)
    print(f"\n== CPU path: engine.hostmath vs NumPy expressions (best of {repeats}; "
          f"update n={n:,}, BN x=({rows:,}, {C}))")
    print(f"{'op':20s} {'hostmath ms':>12s} {'numpy ms':>10s} {'speedup':>8s} {'host GB/s':>10s} "
          f"{'kernel bytes/min':>17s}  max rel diff")

    def row(op, t_host, t_np, nbytes_min, diff, traffic_op):
        lo, hi = traffic(traffic_op)
        print(f"{op:20s} {t_host * 1e3:12.2f} {t_np * 1e3:10.2f} {t_np / t_host:8.2f} "
              f"{nbytes_min / t_host / 1e9:10.2f} {hi / lo:17.2f}  {diff:.1e}")

    w0 = rng.standard_normal(n).astype(np.float32)
    d0 = (0.01 * rng.standard_normal(n)).astype(np.float32)
    m0 = (1e-3 * rng.random(n)).astype(np.float32)
    mask = (rng.random(n) < 0.9).astype(np.uint8)
    for gdt, op in ((np.float32, "hybrid_update_f32"), (np.float16, "hybrid_update_f16")):
        g = (64 * rng.standard_normal(n)).astype(gdt)
        a = [w0.copy(), d0.copy(), m0.copy()]
        b = [w0.copy(), d0.copy(), m0.copy()]
        hostmath.hybrid_update(*a, g, mask, **HYPER)          # validate first
        numpy_hybrid(*b, g, mask, **HYPER)
        diff = max(np.max(np.abs(x - y)) / np.max(np.abs(y)) for x, y in zip(a, b))
        t_host = best_of(lambda: hostmath.hybrid_update(*a, g, mask, **HYPER), repeats)
        t_np = best_of(lambda: numpy_hybrid(*b, g, mask, **HYPER), repeats)
        row(op, t_host, t_np, n * traffic(op)[0], diff, op)

    x = (3 + rng.standard_normal((rows, C))).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    dy = rng.standard_normal((rows, C)).astype(np.float32)
    var = rng.uniform(0.5, 2, C).astype(np.float32)
    y, mean, _, inv = hostmath.bn_train_forward(x, gamma, beta, 1e-5, True)
    bn_ops = {   # name: (hostmath call taking run=, the NumPy version, minimum bytes, traffic op)
        "bn_train_forward": (lambda run: hostmath.bn_train_forward(x, gamma, beta, 1e-5, True, None, run)[0],
                             lambda: batchnorm.xp_bn_train_forward(x, gamma, beta, 1e-5, True)[0],
                             x.nbytes * 2, "bn_train_forward"),
        "bn_backward (relu)": (lambda run: hostmath.bn_backward(dy, x, y, gamma, mean, inv, True, None, run)[0],
                               lambda: batchnorm.xp_bn_backward(dy, x, y, gamma, mean, inv, True)[0],
                               x.nbytes * 4, "bn_backward_relu"),
        "bn_infer": (lambda run: hostmath.bn_infer_forward(x, gamma, beta, mean, var, 1e-5, True, None, run),
                     lambda: batchnorm.xp_bn_infer_forward(x, gamma, beta, mean, var, 1e-5, True),
                     x.nbytes * 2, "bn_infer"),
    }
    for op, (host_fn, numpy_fn, nbytes, traffic_op) in bn_ops.items():
        got, ref = host_fn(hostmath.serial), numpy_fn()
        t_host = best_of(lambda: host_fn(hostmath.serial), repeats)
        t_np = best_of(numpy_fn, repeats)
        row(op, t_host, t_np, nbytes, np.max(np.abs(got - ref)) / np.max(np.abs(ref)), traffic_op)
    print("(numpy column for BN: engine.batchnorm's xp_* code, what CuPy and float64 run; "
          "kernel bytes/min: the CUDA kernels' traffic model over the minimum)")
    team = Team(threads, min_split=1)
    print(f"\nBN rows split over {threads} threads (engine.parallel.Team, as the model does):")
    for op, (host_fn, _, nbytes, _) in bn_ops.items():
        t1 = best_of(lambda: host_fn(hostmath.serial), repeats)
        tn = best_of(lambda: host_fn(team.map), repeats)
        print(f"{op:20s} 1 thread {t1 * 1e3:7.2f} ms   {threads} threads {tn * 1e3:7.2f} ms   speedup {t1 / tn:5.2f}")


# ---- GPU ------------------------------------------------------------------------------

def gpu_bench(repeats):
    import cupy as cp
    from engine import cuda_ops
    rng = np.random.default_rng(0)
    flush = cp.empty(512 * 2**20 // 4, np.float32)   # larger than any L2 (H100: 50 MB)

    def timed(fn):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        fn()  # warm-up (and compile)
        times = []
        for _ in range(repeats):
            flush.fill(1.0)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
        return statistics.median(times)

    def copy_rate():            # its buffers are freed on return
        src = cp.empty(RESNET50_PARAMS * 4, np.float32)
        dst = cp.empty_like(src)
        return 2 * src.nbytes / timed(lambda: dst.__setitem__(Ellipsis, src)) / 1e9

    copy_gbs = copy_rate()
    print(f"\n== GPU {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: device-to-device copy "
          f"{copy_gbs:.0f} GB/s (median of {repeats}, L2 flushed)")
    print(f"{'kernel':20s} {'max rel err':>11s} {'us':>9s} {'GB/s':>8s} {'of copy':>8s}")

    def report(op, err, t, nbytes):
        print(f"{op:20s} {err:11.1e} {t * 1e6:9.1f} {nbytes / t / 1e9:8.0f} {nbytes / t / 1e9 / copy_gbs:8.2f}")

    n = RESNET50_PARAMS
    w, d, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    m = np.abs(m) * 1e-3
    mask = (rng.random(n) < 0.9).astype(np.uint8)
    scal = cp.asarray(np.array([HYPER[k] for k in cuda_ops.SCALARS], np.float32))   # read on the device
    fixed = [HYPER[k] for k in ("mu1", "mu2", "eps", "wd")]
    for gdt, op in ((np.float32, "hybrid_update_f32"), (np.float16, "hybrid_update_f16")):
        g = rng.standard_normal(n).astype(gdt)
        dev = [cp.asarray(a) for a in (w, d, m, g, mask)]
        host = [w.copy(), d.copy(), m.copy()]
        hostmath.hybrid_update(*host, g, mask, **HYPER)
        cuda_ops.hybrid_update(*dev, scal, *fixed)
        err = max(np.max(np.abs(cp.asnumpy(a) - b)) / np.max(np.abs(b)) for a, b in zip(dev, host))
        report(op, err, timed(lambda: cuda_ops.hybrid_update(*dev, scal, *fixed)), n * traffic(op)[0])

    rows, C = 32 * 56 * 56, 256
    x = (3 + rng.standard_normal((rows, C))).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    x_d, gamma_d, beta_d = (cp.asarray(a) for a in (x, gamma, beta))
    ref = hostmath.bn_train_forward(x, gamma, beta, 1e-5, True)
    got = cuda_ops.bn_train_forward(x_d, gamma_d, beta_d, 1e-5, True)
    err = np.max(np.abs(cp.asnumpy(got[0]) - ref[0])) / np.max(np.abs(ref[0]))
    report("bn_train_forward", err, timed(lambda: cuda_ops.bn_train_forward(x_d, gamma_d, beta_d, 1e-5, True)), 2 * x.nbytes)

    dy = rng.standard_normal((rows, C)).astype(np.float32)
    dy_d = cp.asarray(dy)
    ref_b = hostmath.bn_backward(dy, x, ref[0], gamma, ref[1], ref[3], True)
    dev_in = (dy_d, x_d, cp.asarray(ref[0]), gamma_d, cp.asarray(ref[1]), cp.asarray(ref[3]))
    got_b = cuda_ops.bn_backward(*dev_in, True)
    err = max(np.max(np.abs(cp.asnumpy(a) - b)) / np.max(np.abs(b)) for a, b in zip(got_b, ref_b))
    report("bn_backward (relu)", err, timed(lambda: cuda_ops.bn_backward(*dev_in, True)), 4 * x.nbytes)

    var = rng.uniform(0.5, 2, C).astype(np.float32)
    ref_i = hostmath.bn_infer_forward(x, gamma, beta, ref[1], var, 1e-5, True)
    args_i = (x_d, gamma_d, beta_d, cp.asarray(ref[1]), cp.asarray(var), 1e-5, True)
    err = np.max(np.abs(cp.asnumpy(cuda_ops.bn_infer_forward(*args_i)) - ref_i)) / np.max(np.abs(ref_i))
    report("bn_infer", err, timed(lambda: cuda_ops.bn_infer_forward(*args_i)), 2 * x.nbytes)

    flat = rng.standard_normal(n).astype(np.float32)
    dflat = cp.asarray(flat)
    h = precision.pack_fp16(dflat, 64.0)
    err = float(np.any(cp.asnumpy(h).view(np.uint16) != precision.pack_fp16(flat, 64.0).view(np.uint16)))
    report("pack_fp16", err, timed(lambda: precision.pack_fp16(dflat, 64.0, out=h)), n * 6)
    out = cp.empty_like(dflat)
    back = precision.unpack_fp16(h, 1 / 64)
    err = float(np.any(cp.asnumpy(back) != precision.unpack_fp16(cp.asnumpy(h), 1 / 64)))
    report("unpack_fp16", err, timed(lambda: precision.unpack_fp16(h, 1 / 64, out=out)), n * 6)
    print("(GB/s counts the minimum bytes; pack/unpack 'err' is 1 if any bit differs from the host path)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="validate and time the CUDA kernels (needs CuPy and a GPU)")
    ap.add_argument("--n", type=int, default=4_000_000, help="elements of the CPU optimizer update")
    ap.add_argument("--bn-rows", type=int, default=8 * 28 * 28, help="rows (N*H*W) of the CPU batch-norm runs")
    ap.add_argument("--bn-channels", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="threads of the split BN rows (default 2)")
    args = ap.parse_args(argv)
    if args.gpu:
        gpu_bench(max(args.repeats, 20))
        return
    try:
        static_report()
    except kc.NvrtcError as e:      # NVRTC comes with the test extras, not the core install
        print(f"== static report skipped: {e}; `make test` installs it")
    cpu_bench(args.n, args.bn_rows, args.bn_channels, args.repeats, args.threads)


if __name__ == "__main__":
    main()
