"""The CUDA kernels, checked without a GPU: NVRTC compile, ptxas spills, load widths, launchers."""
import re
import subprocess
import sys
import types
from functools import lru_cache

import numpy as np
import pytest

import kernel_check as kc
from engine import cuda_ops

FILES = kc.kernel_files()
ALL_SIGNATURES = {name: params for f in FILES for name, params in kc.kernel_signatures(f.read_text()).items()}
FILE_OF = {name: f.name for f in FILES for name in kc.kernel_signatures(f.read_text())}
# Kernels that stream a whole tensor: each must use 128-bit global loads.
STREAMING = ("hybrid_update_f32", "hybrid_update_f16", "sgd_update_f32", "sgd_update_f16",
             "bn_forward_apply_f32", "bn_forward_apply_bf16", "bn_backward_dx_f32", "bn_backward_dx_bf16",
             "bn_infer_f32", "bn_infer_bf16", "pack_fp16",
             # 16-byte (uint4) moves where C and alignment allow; packs of channels
             "im2col_f32", "im2col_bf16", "col2im_f32", "col2im_bf16",
             "maxpool_forward_f32", "maxpool_forward_bf16")


@lru_cache(maxsize=None)
def compiled(name: str, arch: str) -> kc.Compiled:
    return kc.compile_kernel_file(kc.KERNELS_DIR / name, arch, (kc.PTXAS_VERBOSE,))


def test_the_check_uses_the_loaders_options():
    assert kc.NVRTC_OPTIONS is cuda_ops.NVRTC_OPTIONS
    assert FILES and {f.name for f in FILES} >= {"optimizer_update.cu", "bn_forward.cu", "bn_backward.cu",
                                                 "bn_infer.cu", "fp16_pack.cu", "im2col.cu",
                                                 "maxpool.cu"}


@pytest.mark.parametrize("arch", kc.ARCHS)
def test_the_check_compiles_with_the_options_cupy_assembles(arch):
    """CuPy's own RawModule path, stopped at its NVRTC call: ours, between its include dirs,
    then -ftz=true, the architecture and --device-as-default-execution-space."""
    options = kc.cupy_options(arch)
    assert kc.runtime_options(arch) == options
    ours = options.index(cuda_ops.NVRTC_OPTIONS[0])
    assert options[ours:ours + len(cuda_ops.NVRTC_OPTIONS)] == cuda_ops.NVRTC_OPTIONS
    assert options[-3:] == ("-ftz=true", f"-arch={arch}", "--device-as-default-execution-space")
    # Without CuPy the check re-assembles the same, less the include dirs only CuPy has.
    assert tuple(o for o in options if not o.startswith("-I")) == kc.reassembled_options(arch)


def test_cupy_flushes_denormals_and_an_ftz_false_of_ours_cannot_undo_it(monkeypatch):
    """Evidence for the FTZ note of docs/kernels.md: .ftz instructions in the PTX of the run-time options."""
    source = cuda_ops.kernel_source("optimizer_update.cu")
    run_time = compiled("optimizer_update.cu", "sm_80").ptx
    ieee = kc.compile_source(source, "optimizer_update.cu", "sm_80", ("-ftz=false",)).ptx  # after CuPy's
    assert run_time.count(".ftz") > 100 and ieee.count(".ftz") == 0
    # Ours come before CuPy's -ftz=true, and NVRTC keeps the last of the two.
    monkeypatch.setattr(kc, "NVRTC_OPTIONS", (*cuda_ops.NVRTC_OPTIONS, "-ftz=false"))
    options = kc.cupy_options("sm_80")
    assert options.index("-ftz=false") < options.index("-ftz=true")
    ours = kc.compile_source(source, "optimizer_update.cu", "sm_80", options=options)
    assert ours.ptx.count(".ftz") == run_time.count(".ftz")


@pytest.mark.parametrize("arch", kc.ARCHS)
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_compiles_under_nvrtc_without_spills(path, arch):
    out = compiled(path.name, arch)
    kernels = set(kc.kernel_signatures(path.read_text()))
    entries = set(re.findall(r"\.entry (\w+)\(", out.ptx))
    assert kernels and entries == kernels
    assert out.cubin[:4] == b"\x7fELF"
    report = kc.ptxas_report(out.log)
    assert set(report) == kernels, out.log
    for name, info in report.items():
        assert info.spill_stores == 0 and info.spill_loads == 0, (name, arch, info)
        assert info.stack_frame == 0, (name, arch, info)
        assert 0 < info.registers <= 64, (name, arch, info)  # 4 blocks of 256 threads fit per SM


def test_a_kernel_error_is_reported_with_the_log():
    bad = 'extern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n'
    with pytest.raises(kc.NvrtcError, match=r"(?s)bad.cu for sm_80.*undefined_name"):
        kc.compile_source(bad, "bad.cu", "sm_80")


def test_an_edited_header_changes_the_loaded_source(monkeypatch, tmp_path):
    """CuPy caches by source text: a header edit must reach the text the loader compiles."""
    for f in ("recipe_math.cuh", "fp16_pack.cu"):
        (tmp_path / f).write_text((kc.KERNELS_DIR / f).read_text())
    monkeypatch.setattr(cuda_ops, "KERNELS_DIR", tmp_path)
    before = cuda_ops.kernel_source("fp16_pack.cu")
    (tmp_path / "recipe_math.cuh").write_text((tmp_path / "recipe_math.cuh").read_text() + "\n/* edit */\n")
    assert cuda_ops.kernel_source("fp16_pack.cu") != before


def test_ptxas_report_parses_spills():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
           "ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 0 barriers, 360 bytes cmem[0]\n")
    assert kc.ptxas_report(log) == {"k": kc.PtxasInfo(255, 8, 4, 16)}


@pytest.mark.parametrize("kernel", STREAMING)
def test_streaming_kernels_load_128_bits(kernel):
    for arch in kc.ARCHS:
        assert kc.global_load_widths(compiled(FILE_OF[kernel], arch).ptx)[kernel].get(128, 0) > 0, arch
    assert kc.nvdisasm_path(), "nvdisasm missing: install the test extra (nvidia-cuda-nvdisasm)"
    for arch in kc.SASS_ARCHS:
        assert kc.sass_global_load_widths(compiled(FILE_OF[kernel], arch).cubin)[kernel].get(128, 0) > 0, arch


def test_unpack_reads_four_halves_at_once():
    widths = kc.sass_global_load_widths(compiled("fp16_pack.cu", "sm_90").cubin)
    assert widths["unpack_fp16"].get(64, 0) > 0


def test_bn_block_shape_matches_the_header():
    header = (kc.KERNELS_DIR / "recipe_math.cuh").read_text()
    tx = int(re.search(r"#define RM_BN_TX (\d+)", header).group(1))
    ty = int(re.search(r"#define RM_BN_TY (\d+)", header).group(1))
    assert cuda_ops.BN_BLOCK == (tx, ty)


def test_loss_blocks_fit_the_kernels_shared_trees():
    source = (kc.KERNELS_DIR / "softmax_xent.cu").read_text()
    assert int(re.search(r"#define SOFTMAX_XENT_THREADS (\d+)", source).group(1)) == cuda_ops.XENT_MAX_THREADS
    for items in (0, 1, 10, 33, 64, 65, 1000, 1001, 10**6):
        (t,) = cuda_ops._xent_block(items)
        assert 32 <= t <= cuda_ops.XENT_MAX_THREADS and t & (t - 1) == 0 and (t >= items or t == 256)


# ---- launcher arguments against the C signatures --------------------------------------

def test_signature_parser():
    sig = kc.kernel_signatures('extern "C" __global__ void k(const float* __restrict__ x, '
                               'unsigned short* h,\n long long n, float s, int relu) {}')
    assert sig == {"k": [kc.Param("float", True, "x"), kc.Param("unsigned short", True, "h"),
                         kc.Param("long long", False, "n"), kc.Param("float", False, "s"),
                         kc.Param("int", False, "relu")]}


def test_checker_catches_the_classic_mistakes():
    params = kc.kernel_signatures('extern "C" __global__ void k(float* x, long long n, float s) {}')["k"]
    x = np.zeros(4, np.float32)
    assert kc.check_launch_args(params, (x, np.int64(4), np.float32(0.5))) == []
    assert "expects numpy float32 for C float, got float" in kc.check_launch_args(params, (x, np.int64(4), 0.5))[0]
    assert "got float64" in kc.check_launch_args(params, (x, np.int64(4), np.float64(0.5)))[0]
    assert "got int" in kc.check_launch_args(params, (x, 4, np.float32(0.5)))[0]
    assert "got int32" in kc.check_launch_args(params, (x, np.int32(4), np.float32(0.5)))[0]
    assert "expects float32 elements, got float16" in kc.check_launch_args(
        params, (x.astype(np.float16), np.int64(4), np.float32(0.5)))[0]
    assert "2 arguments for 3" in kc.check_launch_args(params, (x, np.int64(4)))[0]


@pytest.fixture
def recorded(monkeypatch):
    """Run the launchers on NumPy stand-ins, recording each launch instead of running it."""
    calls = []
    monkeypatch.setattr(cuda_ops, "_launch", lambda f, k, grid, block, args: calls.append((f, k, grid, block, args)))
    return calls


def run_every_launcher(rng):
    n, rows, C = 1000, 96, 20
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    w, d, m, g = f32(n), f32(n), f32(n), f32(n)
    mask = (rng.random(n) < 0.5).astype(np.uint8)
    scal, w_lp = f32(len(cuda_ops.SCALARS)), np.zeros(n, cuda_ops.BF16)
    # Python floats and ints on purpose: the launchers must cast them.
    cuda_ops.hybrid_update(w, d, m, g, mask, scal, 0.9, 0.99, 1e-8, 1e-4, w_lp=w_lp)
    cuda_ops.hybrid_update(w, d, m, g.astype(np.float16), None, scal, 0.9, 0.99, 1e-8, 1)
    cuda_ops.sgd_update(w, d, g, mask, scal, 0.9, 1e-4, w_lp=w_lp)
    cuda_ops.sgd_update(w, d, g.astype(np.float16), mask, scal, 0.9, 0)
    gamma, beta, mean, var = f32(C), f32(C), f32(C), np.abs(f32(C))
    for dtype in (np.float32, cuda_ops.BF16):
        x, dy = f32(rows, C).astype(dtype), f32(rows, C).astype(dtype)
        stats = f32(3, C)
        y, mu, v, inv = cuda_ops.bn_train_forward(x, gamma, beta, 1e-5, True, stats_out=tuple(stats))
        cuda_ops.bn_backward(dy, x, y, gamma, mu, inv, True, out=dy, grads_out=tuple(f32(2, C)))
        y, mu, v, inv = cuda_ops.bn_train_forward(x, gamma, beta, 1e-5, True, residual=dy)
        cuda_ops.bn_backward(dy, x, y, gamma, mu, inv, False, out=x.copy(), gate=True)
        cuda_ops.bn_infer_forward(x, gamma, beta, mean, var, 1e-5, True, residual=dy)
        cuda_ops.bn_infer_forward(x, gamma, beta, mean, var, 1e-5, False)
    h = cuda_ops.pack_fp16(w, 1024.0)
    cuda_ops.unpack_fp16(h, 1 / 1024)
    for dtype in (np.float32, cuda_ops.BF16):
        # Python ints for k, s, p on purpose
        x = f32(2, 9, 9, 8).astype(dtype)
        col = cuda_ops.im2col(x, 3, 2, 1, np.empty((2, 5, 5, 3, 3, 8), dtype))
        cuda_ops.col2im(col, np.empty_like(x), 2, 1)
        y = cuda_ops.maxpool_forward(x, np.empty((2, 5, 5, 8), dtype), 3, 2, 1)
        cuda_ops.maxpool_backward(x, y, np.empty_like(x), 3, 2, 1)
    # a Python float for the smoothing on purpose
    cuda_ops.softmax_xent(f32(rows, 1000), rng.integers(0, 1000, rows), 0.1)


def test_every_launch_matches_its_kernel_signature(recorded):
    run_every_launcher(np.random.default_rng())
    launched = set()
    for filename, kernel, grid, block, args in recorded:
        assert kernel in kc.kernel_signatures((kc.KERNELS_DIR / filename).read_text()), (filename, kernel)
        assert kc.check_launch_args(ALL_SIGNATURES[kernel], args) == [], kernel
        assert all(isinstance(v, int) and v > 0 for v in (*grid, *block)), (kernel, grid, block)
        assert int(np.prod(block)) <= 1024
        launched.add(kernel)
    assert launched == set(ALL_SIGNATURES), set(ALL_SIGNATURES) - launched


def test_launchers_refuse_wrong_arrays_by_name(recorded):
    w = np.zeros(8, np.float32)
    with pytest.raises(TypeError, match="cuda_ops: d must be float32, got float64"):
        cuda_ops.sgd_update(w, np.zeros(8), w.copy(), None, w[:4], 0.9, 0.0)
    with pytest.raises(ValueError, match="cuda_ops: mask has 4 elements, expected 8"):
        cuda_ops.sgd_update(w, w.copy(), w.copy(), np.zeros(4, np.uint8), w[:4], 0.9, 0.0)
    with pytest.raises(ValueError, match="cuda_ops: scal has 8 elements, expected 4"):
        cuda_ops.sgd_update(w, w.copy(), w.copy(), None, w, 0.9, 0.0)
    with pytest.raises(TypeError, match="cuda_ops: w_lp must be bfloat16, got float16"):
        cuda_ops.sgd_update(w, w.copy(), w.copy(), None, w[:4], 0.9, 0.0, w_lp=w.astype(np.float16))
    with pytest.raises(ValueError, match="cuda_ops: y2d is bfloat16"):
        x = np.zeros((4, 2), np.float32)
        cuda_ops.bn_backward(x, x, x.astype(cuda_ops.BF16), w[:2], w[:2], w[:2], True)
    with pytest.raises(ValueError, match="cuda_ops: x2d must be 2-D"):
        cuda_ops.bn_infer_forward(w, w, w, w, w, 1e-5, False)
    assert recorded == []


def test_loader_imports_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None; import engine.cuda_ops as c; "
            "print(c.NVRTC_OPTIONS[0])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "--std=c++17", res.stderr


def test_batchnorm_dispatches_device_arrays_to_the_fused_kernels(monkeypatch):
    """engine.batchnorm sends float32 non-NumPy (CuPy) arrays to cuda_ops, same arguments."""
    from engine import batchnorm

    class DeviceArray:
        dtype = np.dtype(np.float32)

    seen = {}
    for name in ("bn_train_forward", "bn_backward", "bn_infer_forward"):
        monkeypatch.setattr(cuda_ops, name, lambda *a, _n=name, **k: seen.setdefault(_n, (a, k)))
    x = DeviceArray()
    batchnorm.bn_train_forward(x, "g", "b", 1e-5, True, out="o", stats_out=("m", "v", "i"), residual="r")
    batchnorm.bn_backward(x, "x", "y", "g", "m", "s", False, out="o", grads_out=("dg", "db"), gate=True)
    batchnorm.bn_infer_forward(x, "g", "b", "m", "v", 1e-5, True)
    assert seen["bn_train_forward"] == ((x, "g", "b", 1e-5, True),
                                        {"out": "o", "stats_out": ("m", "v", "i"), "residual": "r"})
    assert seen["bn_backward"] == ((x, "x", "y", "g", "m", "s", False),
                                   {"out": "o", "grads_out": ("dg", "db"), "gate": True})
    assert seen["bn_infer_forward"] == ((x, "g", "b", "m", "v", 1e-5, True), {"out": None, "residual": None})
    # NumPy arrays stay on the generic path.
    seen.clear()
    x2d = np.random.default_rng().standard_normal((10, 4)).astype(np.float32)
    batchnorm.bn_train_forward(x2d, np.ones(4, np.float32), np.zeros(4, np.float32), 1e-5, False)
    assert seen == {}


def test_conv_and_pool_dispatch_device_arrays_to_the_fused_kernels(monkeypatch):
    """engine.conv's im2col/col2im and MaxPool send float32 and
    bfloat16 non-NumPy (CuPy) arrays to cuda_ops, one call each, in the workspace's buffers;
    float64 device arrays and NumPy arrays keep their paths."""
    from engine import backend, conv, layers

    class DeviceArray:
        def __init__(self, shape, dtype):
            self.shape, self.dtype = tuple(shape), np.dtype(dtype)
            self.size = int(np.prod(self.shape))

    class Workspace:
        def __init__(self):
            self.xp = types.SimpleNamespace(empty=lambda shape, dtype: DeviceArray(shape, dtype))
            self.team, self.given = None, []

        def arena(self, shape, dtype):
            self.col = DeviceArray(shape, dtype)
            return self.col

        def take(self, shape, dtype):
            self.taken = DeviceArray(shape, dtype)
            return self.taken

        def give(self, buf):
            self.given.append(buf)

    seen = []
    # each launcher returns the array it writes: which argument that is
    written = {"im2col": 4, "col2im": 1, "maxpool_forward": 1, "maxpool_backward": 2}
    for name, k in written.items():
        monkeypatch.setattr(cuda_ops, name, lambda *a, _n=name, _k=k: (seen.append((_n, a)), a[_k])[1])
    for dtype in (np.float32, cuda_ops.BF16):
        seen.clear()
        ws = Workspace()
        x = DeviceArray((2, 9, 9, 8), dtype)
        col = conv.im2col(ws, x, 3, 2, 1)
        assert col is ws.col and col.shape == (2, 5, 5, 3, 3, 8) and col.dtype == dtype
        dx = DeviceArray(x.shape, dtype)
        assert conv.col2im(ws, col, dx, 2, 1) is dx
        pool = layers.MaxPool("pool", ws, 3, 2, 1)
        y = pool.forward(x, train=True)
        assert y.shape == (2, 5, 5, 8) and y.dtype == dtype
        dy = DeviceArray(y.shape, dtype)
        assert pool.backward(dy) is ws.taken and ws.given == [dy]
        assert seen == [("im2col", (x, 3, 2, 1, col)), ("col2im", (col, dx, 2, 1)),
                        ("maxpool_forward", (x, y, 3, 2, 1)), ("maxpool_backward", (x, dy, ws.taken, 3, 2, 1))]
    assert backend.fused_kernels(DeviceArray((4,), np.float64)) is None
    assert backend.fused_kernels(DeviceArray((4,), np.float32), DeviceArray((4,), np.float64)) is None
    # NumPy arrays stay on the host paths.
    seen.clear()
    a = np.random.default_rng().standard_normal((2, 5, 5, 3)).astype(np.float32)
    from engine.parallel import SERIAL
    from engine.workspace import Workspace as HostWorkspace
    host = HostWorkspace(np, SERIAL, "fp32")
    conv.col2im(host, conv.im2col(host, a, 3, 2, 1), np.empty_like(a), 2, 1)
    pool = layers.MaxPool("pool", host, 3, 2, 1)
    pool.backward(pool.forward(a, train=True))
    assert backend.fused_kernels(a) is None and seen == []


def test_loss_dispatches_float32_device_logits_to_the_fused_kernels(monkeypatch):
    """engine.loss sends float32 non-NumPy (CuPy) logits to cuda_ops.softmax_xent (int64
    labels as they are, other integers cast); NumPy logits keep the xp code, whose hits are
    logits.argmax(axis=1) == labels summed (float64 device logits: the next test)."""
    from engine import loss as loss_mod

    class DeviceArray:
        ndim = 2

        def __init__(self, shape, dtype):
            self.shape, self.dtype = tuple(shape), np.dtype(dtype)
            self.flags = types.SimpleNamespace(c_contiguous=True)

        def astype(self, dtype):
            return DeviceArray(self.shape, dtype)

    class Xp:
        @staticmethod
        def asarray(a):
            return a

    seen = []
    monkeypatch.setattr(cuda_ops, "softmax_xent", lambda *a, **k: (seen.append((a, k)), ("loss", "d", "hits"))[1])
    monkeypatch.setattr(loss_mod, "array_module", lambda a: np if isinstance(a, np.ndarray) else Xp)
    z, y = DeviceArray((4, 10), np.float32), DeviceArray((4,), np.int64)
    assert loss_mod.softmax_cross_entropy_with_hits(z, y, 0.1) == ("loss", "d", "hits")
    assert loss_mod.softmax_cross_entropy(z, y) == ("loss", "d")
    assert seen == [((z, y, 0.1), {}), ((z, y, 0.0), {})]
    seen.clear()
    loss_mod.softmax_cross_entropy(z, DeviceArray((4,), np.int32))
    assert seen[0][0][1].dtype == np.int64
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\), got \(3,\)"):
        loss_mod.softmax_cross_entropy(z, DeviceArray((3,), np.int64))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        loss_mod.softmax_cross_entropy(z, y, 1.0)
    # NumPy logits (float32 too) stay on the xp code.
    seen.clear()
    rng = np.random.default_rng()
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    logits[0] = 1.0                                           # a tied row: the first index wins
    labels = np.array([0, 1, 2, 3, 4, 0])
    loss, d, hits = loss_mod.softmax_cross_entropy_with_hits(logits, labels, 0.1)
    assert seen == [] and d.dtype == np.float32 and hits == (logits.argmax(axis=1) == labels).sum()
    assert loss_mod.softmax_cross_entropy(logits.astype(np.float64), labels)[1].dtype == np.float64
    assert seen == []


def test_loss_on_the_standin_cupy_is_two_launches_and_device_scalars(monkeypatch):
    """On the stand-in CuPy (tests/gpu_standins.py, kernels emulated on the host): float32
    logits cost the two fused launches and two allocations (dlogits, the result buffer), and
    loss and hits stay 0-d device arrays; float64 logits take the generic xp code."""
    import gpu_standins
    from engine.loss import softmax_cross_entropy, softmax_cross_entropy_with_hits
    cupy = gpu_standins.install(monkeypatch, gpu_standins.emulated_launch)
    rng = np.random.default_rng()
    logits = rng.standard_normal((5, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 5)
    z, y = cupy.asarray(logits), cupy.asarray(labels)
    gpu_standins.reset()
    loss, d, hits = softmax_cross_entropy_with_hits(z, y, 0.1)
    assert [(o.kind, o.name) for o in gpu_standins.OPS if o.kind != "alloc"] == [
        ("kernel", "softmax_xent.cu:softmax_xent_rows"), ("kernel", "softmax_xent.cu:softmax_xent_reduce")]
    assert sum(o.kind == "alloc" for o in gpu_standins.OPS) == 2
    assert isinstance(loss, cupy.ndarray) and loss.shape == hits.shape == () and hits.dtype == np.float32
    ref_loss, ref_d = softmax_cross_entropy(logits, labels, 0.1)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    assert np.max(np.abs(cupy.asnumpy(d) - ref_d)) <= 1e-7
    assert float(hits) == (logits.argmax(axis=1) == labels).sum()
    gpu_standins.reset()
    softmax_cross_entropy_with_hits(z.astype(np.float64), y, 0.1)
    assert not [o for o in gpu_standins.OPS if o.kind == "kernel"]


def test_each_kernel_is_compiled_and_fetched_once_per_device(monkeypatch):
    """_launch looks a kernel up by name only on its first launch on the current device
    (stand-in cupy.RawModule and cudaGetDevice)."""
    compiled_files, fetched, ran = [], [], []
    current = types.SimpleNamespace(device=0)

    class RawModule:
        def __init__(self, code, options, backend):
            assert options == cuda_ops.NVRTC_OPTIONS and backend == "nvrtc"
            compiled_files.append(code)

        def get_function(self, name):
            fetched.append(name)
            return lambda grid, block, args: ran.append((name, grid, block, args))

    runtime = types.SimpleNamespace(getDevice=lambda: current.device)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=RawModule,
                                                                   cuda=types.SimpleNamespace(runtime=runtime)))
    monkeypatch.setattr(cuda_ops, "_modules", {})
    monkeypatch.setattr(cuda_ops, "_functions", {})
    for step in range(3):
        cuda_ops._launch("fp16_pack.cu", "pack_fp16", (2,), (256,), (step,))
        cuda_ops._launch("fp16_pack.cu", "unpack_fp16", (1,), (256,), (step,))
    assert len(compiled_files) == 1 and fetched == ["pack_fp16", "unpack_fp16"]
    assert ran[-2:] == [("pack_fp16", (2,), (256,), (2,)), ("unpack_fp16", (1,), (256,), (2,))] and len(ran) == 6
    for current.device in (1, 0, 1):
        cuda_ops._launch("fp16_pack.cu", "pack_fp16", (2,), (256,), (current.device,))
    assert fetched == ["pack_fp16", "unpack_fp16", "pack_fp16"] and len(ran) == 9


# ---- FTZ: the device flushes float32 subnormals; the host twin does not ------------------

TINY = float(np.finfo(np.float32).tiny)     # 2**-126: under -ftz=true, anything smaller reads as 0


def ftz(x):
    return np.where(np.abs(x) < TINY, 0.0, x)


def device_hybrid_step(w, d, m, g, eta, a_sgd, a_rms, mu1, mu2, eps, wd, gscale):
    """rm_hybrid_step as the -ftz=true kernel runs it, in float64: subnormal inputs and every
    intermediate a float32 instruction would leave subnormal read as 0. Returns w, d, m and,
    for each, the magnitude of the terms it sums (float32 rounding is relative to those:
    the gradient and weight-decay terms of g can cancel)."""
    w, d, m, g = (ftz(np.asarray(a, np.float64)) for a in (w, d, m, g))
    g, g_terms = ftz(ftz(g * gscale) + ftz(wd * w)), np.abs(g * gscale) + np.abs(wd * w)
    m_terms = mu2 * m + (1 - mu2) * g_terms ** 2
    m = ftz(ftz(mu2 * m) + ftz(ftz((1 - mu2) * g) * g))
    step = a_sgd + a_rms / (np.sqrt(m) + eps)
    d_terms = np.abs(mu1 * d) + step * g_terms
    d = ftz(ftz(mu1 * d) - ftz(step * g))
    return (ftz(w + ftz(eta * d)), np.abs(w) + eta * d_terms), (d, d_terms), (m, m_terms)


def test_host_twin_agrees_with_the_flushing_device_within_the_stated_bound():
    """The FTZ bound of docs/kernels.md: per step, w, d and m of the IEEE host build differ from the flushing
    kernel by float32 rounding plus at most a few 2**-126 (m), (a_sgd + a_rms/eps) * 2**-126 (d)
    and eta times that (w), for tiny second moments and subnormal gradients alike."""
    from engine import hostmath
    rng = np.random.default_rng()
    n = 4096
    scale = rng.choice([1e-3, 1e-20, 1e-40, 0.0], n)            # normal, g*g underflows, subnormal, zero
    g = (rng.standard_normal(n) * scale).astype(np.float32)
    w = (rng.standard_normal(n) * np.where(scale < 1e-10, 1e-35, 0.1)).astype(np.float32)   # wd*w subnormal too
    m = (rng.random(n) * rng.choice([1e-6, 1e-37, 1e-40, 0.0], n)).astype(np.float32)
    d = (rng.standard_normal(n) * rng.choice([1e-3, 1e-41], n)).astype(np.float32)
    hp = dict(eta=0.1, a_sgd=0.5, a_rms=0.01, mu1=0.9, mu2=0.99, eps=1e-8, wd=1e-4, gscale=0.25)
    # The kernel's coefficients are float32 (0.99f is not 0.99): the reference takes the same.
    (w_dev, w_terms), (d_dev, d_terms), (m_dev, m_terms) = device_hybrid_step(
        w, d, m, g, **{k: float(np.float32(v)) for k, v in hp.items()})
    hostmath.hybrid_update(w, d, m, g, None, **hp)

    assert np.count_nonzero((m_dev == 0) & (m != 0)) > n // 8, "the inputs must make the device flush m"
    assert np.count_nonzero((d_dev == 0) & (d != 0)) > 0
    flush_d = (hp["a_sgd"] + hp["a_rms"] / hp["eps"]) * 4 * TINY
    rtol = 8 * float(np.finfo(np.float32).eps)     # float32 rounding of the 4-6 operations of each value
    for name, host, dev, terms, atol in (("m", m, m_dev, m_terms, 4 * TINY), ("d", d, d_dev, d_terms, flush_d),
                                         ("w", w, w_dev, w_terms, hp["eta"] * flush_d + 4 * TINY)):
        excess = np.abs(host.astype(np.float64) - dev) - (rtol * terms + atol)
        assert excess.max() <= 0, (name, int(excess.argmax()), host[excess.argmax()], dev[excess.argmax()])


@pytest.mark.parametrize("sub,name", [("cuda_nvrtc/lib", "libnvrtc.so.12"), ("cu13/lib", "libnvrtc.so.13")])
def test_nvrtc_is_found_in_the_cuda12_and_the_cuda13_wheel_layouts(monkeypatch, tmp_path, sub, name):
    from types import SimpleNamespace
    (tmp_path / sub).mkdir(parents=True)
    (tmp_path / sub / name).touch()
    (tmp_path / sub / "libnvrtc-builtins.so.99").touch()     # not NVRTC itself
    monkeypatch.setattr(kc.importlib.util, "find_spec",
                        lambda mod: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    assert kc._find_nvrtc() == str(tmp_path / sub / name)
