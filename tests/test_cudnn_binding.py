"""The Cython cuDNN binding (issue 17, phase 1): builds and imports without cuDNN, says what it
tried when the library is missing, loads the real libcudnn.so.9 of the nvidia-cudnn-cu12 wheel
(test extra) and, without a GPU, creates, reads back and destroys tensor, filter and
convolution descriptors, agrees with engine.conv.out_size on every conv of ResNet-50 and turns
bad descriptors into CudnnError. Handles and the convolutions themselves need a GPU."""
import importlib.metadata
import importlib.util
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import cudnn
from engine.backend import gpu_count
from engine.conv import out_size
from engine.gemm import PRECISIONS

from cudnn_helpers import compile_stub, conv_reference, resnet_convs


# These run in their own processes, with a library of their choosing.
OWN_LIBRARY = {"test_missing_library_is_reported_with_what_was_tried", "test_a_library_that_is_not_cudnn_is_refused",
               "test_gpu_only_wrappers_pass_every_argument_to_the_right_place"}


@pytest.fixture(autouse=True)
def library(request):
    if request.function.__name__ in OWN_LIBRARY:
        return None
    if not cudnn.is_available():
        pytest.fail("libcudnn.so.9 does not load: install the test extra (nvidia-cudnn-cu12)")
    return cudnn.library_path()


def _run(code, **env):
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


# ---- loading ---------------------------------------------------------------------------

def test_missing_library_is_reported_with_what_was_tried():
    code = ("from engine import cudnn\n"
            "assert not cudnn.is_available()\n"
            "for call in (cudnn.version, lambda: cudnn.TensorDesc(1, 1, 1, 1)):\n"
            "    try:\n        call()\n    except cudnn.CudnnMissing as e:\n        print(e)\n"
            "    else:\n        raise SystemExit('no CudnnMissing')\n")
    out = _run(code, ENGINE_CUDNN_LIBRARY="/nonexistent/dir/libcudnn.so.9")
    assert out.count("cuDNN is not available") == 2        # the same error on every call
    assert "/nonexistent/dir/libcudnn.so.9" in out
    assert "pip install nvidia-cudnn-cu12" in out and "ENGINE_CUDNN_LIBRARY" in out


def test_a_library_that_is_not_cudnn_is_refused():
    """Any loadable .so that lacks cuDNN's functions: the error names the first missing one."""
    code = ("from engine import cudnn\n"
            "try:\n    cudnn.version()\nexcept cudnn.CudnnMissing as e:\n    print(e)\n")
    out = _run(code, ENGINE_CUDNN_LIBRARY="libm.so.6")
    assert "has no symbol cudnnGetVersion" in out


def test_candidates_are_the_env_var_then_both_wheel_layouts_then_the_system(tmp_path):
    explicit = "/somewhere/libcudnn.so.9"
    os.environ["ENGINE_CUDNN_LIBRARY"] = explicit
    try:
        assert cudnn._candidates() == [explicit]
    finally:
        del os.environ["ENGINE_CUDNN_LIBRARY"]
    # A second `nvidia` portion with the CUDA 13 layout (nvidia/cu13/lib): listed after the
    # cudnn/lib ones, before the bare soname.
    fake = tmp_path / "nvidia" / "cu13" / "lib"
    fake.mkdir(parents=True)
    (fake / "libcudnn.so.9").write_bytes(b"")
    code = "from engine import cudnn; print('\\n'.join(cudnn._candidates()))"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("ENGINE_CUDNN_LIBRARY", None)
    paths = _run(code, **env).split()
    assert paths[-1] == "libcudnn.so.9"
    assert str(fake / "libcudnn.so.9") in paths
    assert paths.index(str(fake / "libcudnn.so.9")) > paths.index(cudnn.library_path())


def test_loads_from_the_wheel_and_reports_version_9(library):
    assert library.endswith("libcudnn.so.9")
    major, minor, patch = cudnn.version_tuple()
    assert major == 9 and cudnn.version() == major * 10000 + minor * 100 + patch
    if "site-packages" in library:
        wheels = [d.version for d in importlib.metadata.distributions()
                  if d.metadata["Name"] in ("nvidia-cudnn-cu12", "nvidia-cudnn-cu13")]
        assert any(v.startswith(f"{major}.{minor}.{patch}") for v in wheels), wheels
    assert cudnn.missing_symbols() == []          # the whole legacy convolution API is there
    rt = cudnn.cudart_version()
    assert rt is None or rt >= 12000


# ---- values: ours against the library and its headers ------------------------------------

def test_every_status_name_is_the_librarys():
    for code, name in cudnn._STATUS_NAMES.items():
        assert cudnn.status_string(code) == name, code
    assert cudnn.status_name(2042) == "CUDNN_STATUS_BAD_PARAM(2042)"
    assert cudnn.status_name(77) == "cudnnStatus(77)"


def _header_values(include, header, names):
    text = (include / header).read_text()
    found = {}
    for name in names:
        m = re.search(rf"\b{name}\s*=\s*(\d+)", text)
        assert m, f"{name} not in {header}"
        found[name] = int(m.group(1))
    return found


def test_enum_values_match_the_wheels_headers():
    """The values in csrc/cudnn_decls.h were copied from these headers; the nvidia-cudnn-cu12
    wheel ships them (nvidia/cudnn/include), so compare where they are installed."""
    spec = importlib.util.find_spec("nvidia.cudnn")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    include = next((r / "include" for r in roots if (r / "include" / "cudnn_graph.h").exists()), None)
    if include is None:
        pytest.skip("no cuDNN headers installed next to the library")
    dtypes = {"float32": "CUDNN_DATA_FLOAT", "float16": "CUDNN_DATA_HALF", "bfloat16": "CUDNN_DATA_BFLOAT16"}
    h = _header_values(include, "cudnn_graph.h", dtypes.values())
    assert {k: h[v] for k, v in dtypes.items()} == cudnn.DTYPES
    maths = {"default": "CUDNN_DEFAULT_MATH", "tensor_op": "CUDNN_TENSOR_OP_MATH",
             "tensor_op_allow_conversion": "CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION", "fma": "CUDNN_FMA_MATH"}
    h = _header_values(include, "cudnn_graph.h", maths.values())
    assert {k: h[v] for k, v in maths.items()} == cudnn.MATH_TYPES
    h = _header_values(include, "cudnn_graph.h", ["CUDNN_TENSOR_NCHW", "CUDNN_TENSOR_NHWC"])
    assert cudnn.FORMATS == {"nchw": h["CUDNN_TENSOR_NCHW"], "nhwc": h["CUDNN_TENSOR_NHWC"]}
    h = _header_values(include, "cudnn_graph.h", ["CUDNN_CONVOLUTION", "CUDNN_CROSS_CORRELATION"])
    assert cudnn.MODES == {"convolution": h["CUDNN_CONVOLUTION"], "cross_correlation": h["CUDNN_CROSS_CORRELATION"]}
    for prefix, table in (("CUDNN_CONVOLUTION_FWD_ALGO_", cudnn.FWD_ALGOS),
                          ("CUDNN_CONVOLUTION_BWD_DATA_ALGO_", cudnn.BWD_DATA_ALGOS),
                          ("CUDNN_CONVOLUTION_BWD_FILTER_ALGO_", cudnn.BWD_FILTER_ALGOS)):
        h = _header_values(include, "cudnn_ops.h", [prefix + n for n in table.values()] + [prefix + "COUNT"])
        assert {v: name for name, v in ((n, h[prefix + n]) for n in table.values())} == table
        assert h[prefix + "COUNT"] == len(table)
    text = (include / "cudnn_graph.h").read_text()
    for code, name in cudnn._STATUS_NAMES.items():
        assert re.search(rf"\b{name}\b[^=,]*=\s*{code}\b", text), name
    # the perf struct's field order (engine_cudnnAlgoPerf_t in cudnn_decls.h)
    cnn = (include / "cudnn_cnn.h").read_text()
    m = re.search(r"typedef struct cudnnConvolutionFwdAlgoPerfStruct \{(.*?)\}", cnn, re.S)
    fields = re.findall(r"^\s*(\w+)\s+(\w+)(\[\d+\])?;", m.group(1), re.M)
    assert [(t, n) for t, n, _ in fields] == [("cudnnConvolutionFwdAlgo_t", "algo"), ("cudnnStatus_t", "status"),
                                             ("float", "time"), ("size_t", "memory"),
                                             ("cudnnDeterminism_t", "determinism"), ("cudnnMathType_t", "mathType"),
                                             ("int", "reserved")]


def test_every_engine_precision_has_descriptor_settings():
    assert set(cudnn.PRECISIONS) == set(PRECISIONS)
    for data, compute, math in cudnn.PRECISIONS.values():
        assert data in cudnn.DTYPES and compute == "float32" and math in cudnn.MATH_TYPES
    assert cudnn.PRECISIONS["fp32"][2] == "fma"        # no TF32 behind an fp32 run's back


# ---- descriptors, without a GPU ---------------------------------------------------------

@pytest.mark.parametrize("dtype", sorted(cudnn.DTYPES))
def test_tensor_descriptor_reads_back_nhwc_packed(dtype):
    d = cudnn.TensorDesc(32, 56, 48, 64, dtype)
    assert d.shape == (32, 56, 48, 64) and d.dtype == dtype and d.alive and d.ptr
    assert d.read_back() == {"dtype": dtype, "shape": (32, 56, 48, 64),
                             "strides": (56 * 48 * 64, 48 * 64, 64, 1)}
    d.destroy()
    d.destroy()
    assert not d.alive
    with pytest.raises(ValueError, match="destroyed"):
        d.read_back()


@pytest.mark.parametrize("dtype", sorted(cudnn.DTYPES))
def test_filter_descriptor_reads_back_krsc(dtype):
    f = cudnn.FilterDesc(256, 3, 1, 128, dtype)          # KH != KW: the order is checked
    assert f.shape == (256, 3, 1, 128)
    assert f.read_back() == {"dtype": dtype, "format": "nhwc", "shape": (256, 3, 1, 128)}
    f.destroy()
    assert not f.alive
    with pytest.raises(ValueError, match="destroyed"):
        f.read_back()


@pytest.mark.parametrize("math", sorted(cudnn.MATH_TYPES))
@pytest.mark.parametrize("pad,stride,dilation", [(0, 1, 1), (3, 2, 1), ((1, 2), (2, 1), (1, 3))])
def test_conv_descriptor_reads_back(pad, stride, dilation, math):
    c = cudnn.ConvDesc(pad, stride, dilation, compute="float32", math=math)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    expected = {"pad": pair(pad), "stride": pair(stride), "dilation": pair(dilation),
                "mode": "cross_correlation", "compute": "float32", "math": math}
    assert c.read_back() == expected
    assert (c.pad, c.stride, c.dilation, c.math) == (pair(pad), pair(stride), pair(dilation), math)
    c.destroy()
    with pytest.raises(ValueError, match="destroyed"):
        c.read_back()


@pytest.mark.parametrize("precision", sorted(cudnn.PRECISIONS))
def test_each_precisions_descriptors(precision):
    data, compute, math = cudnn.PRECISIONS[precision]
    x, w = cudnn.TensorDesc(8, 14, 14, 256, data), cudnn.FilterDesc(256, 3, 3, 256, data)
    conv = cudnn.ConvDesc(1, 1, compute=compute, math=math)
    assert conv.read_back()["math"] == math and x.read_back()["dtype"] == data
    assert cudnn.forward_output_dim(conv, x, w) == (8, 14, 14, 256)


def test_forward_output_dim_equals_ours_for_every_resnet50_conv():
    batch = 32
    convs = resnet_convs("resnet50", 224)
    assert len(convs) == 53
    distinct = sorted(set(c[1:] for c in convs))
    assert len(distinct) == 23
    for h, w, cin, cout, k, s, p in distinct:
        for dtype in ("float32", "bfloat16"):
            x = cudnn.TensorDesc(batch, h, w, cin, dtype)
            f = cudnn.FilterDesc(cout, k, k, cin, dtype)
            conv = cudnn.ConvDesc(p, s, math="tensor_op")
            assert cudnn.forward_output_dim(conv, x, f) == (batch, out_size(h, k, s, p), out_size(w, k, s, p), cout)


# ---- bad descriptors --------------------------------------------------------------------

@pytest.mark.parametrize("make,call,text", [
    (lambda: cudnn.ConvDesc(-1, 1), "cudnnSetConvolution2dDescriptor", "negative"),
    (lambda: cudnn.ConvDesc(1, 0), "cudnnSetConvolution2dDescriptor", "stride"),
    (lambda: cudnn.ConvDesc(1, 1, dilation=0), "cudnnSetConvolution2dDescriptor", "dilation"),
    (lambda: cudnn.TensorDesc(32, 56, 56, 0), "cudnnSetTensor4dDescriptor", "c <= 0"),
    (lambda: cudnn.TensorDesc(-1, 56, 56, 64), "cudnnSetTensor4dDescriptor", "n <= 0"),
    (lambda: cudnn.FilterDesc(0, 3, 3, 64), "cudnnSetFilter4dDescriptor", "invalid size 0"),
])
def test_a_bad_descriptor_raises_cudnn_error_with_the_status_name(make, call, text):
    with pytest.raises(cudnn.CudnnError) as info:
        make()
    err = info.value
    assert (err.status, err.name, err.call) == (2000, "CUDNN_STATUS_BAD_PARAM", call)
    assert text in err.message.lower() or text in err.message
    assert str(err).startswith(f"{call}: CUDNN_STATUS_BAD_PARAM: ")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cudnn.CudnnError
    assert (back.status, back.name, back.message, back.call, str(back)) == \
        (err.status, err.name, err.message, err.call, str(err))


def test_mismatched_descriptors_are_refused_and_messages_do_not_go_stale():
    conv = cudnn.ConvDesc(1, 1)
    with pytest.raises(cudnn.CudnnError, match="groupCount") as info:       # Cin 64 vs 32
        cudnn.forward_output_dim(conv, cudnn.TensorDesc(8, 14, 14, 64), cudnn.FilterDesc(64, 3, 3, 32))
    assert info.value.name == "CUDNN_STATUS_BAD_PARAM"
    with pytest.raises(cudnn.CudnnError) as info:       # a 31x31 kernel over a padded 16x16 input
        cudnn.forward_output_dim(conv, cudnn.TensorDesc(8, 14, 14, 64), cudnn.FilterDesc(64, 31, 31, 64))
    assert info.value.name == "CUDNN_STATUS_BAD_PARAM"
    assert "groupCount" not in info.value.message       # the previous failure's text was consumed


def test_bad_names_are_refused_before_cudnn():
    with pytest.raises(TypeError, match="dtype"):
        cudnn.TensorDesc(1, 1, 1, 1, "float64")
    with pytest.raises(TypeError, match="dtype"):
        cudnn.FilterDesc(1, 1, 1, 1, np.float32)
    with pytest.raises(ValueError, match="math type"):
        cudnn.ConvDesc(0, 1, math="tf32")
    with pytest.raises(TypeError, match="pair"):
        cudnn.ConvDesc((1, 2, 3), 1)
    with pytest.raises(TypeError):
        cudnn.forward_output_dim(None, cudnn.TensorDesc(1, 1, 1, 1), cudnn.FilterDesc(1, 1, 1, 1))


@pytest.mark.skipif(gpu_count() > 0, reason="checks the failure that only a machine without a GPU gives")
def test_handle_without_a_gpu_raises_not_initialized():
    with pytest.raises(cudnn.CudnnError) as info:
        cudnn.Handle()
    assert (info.value.name, info.value.call) == ("CUDNN_STATUS_NOT_INITIALIZED", "cudnnCreate")
    assert "cudaGetDeviceCount" in info.value.message


def test_gpu_calls_need_a_handle():
    x, f, conv = cudnn.TensorDesc(1, 4, 4, 8), cudnn.FilterDesc(8, 3, 3, 8), cudnn.ConvDesc(1, 1)
    with pytest.raises(TypeError):
        cudnn.convolution_forward(None, x, 1, f, 1, conv, 0, x, 1)
    with pytest.raises(TypeError):
        cudnn.forward_workspace_size(None, x, f, conv, x, 0)


# ---- on a device ------------------------------------------------------------------------

@pytest.mark.gpu
def test_handle_on_a_stream_and_destroy_twice():
    import cupy as cp
    stream = cp.cuda.Stream(non_blocking=True)
    h = cudnn.Handle(stream)
    assert h.alive and h.stream == stream.ptr
    h.set_stream(None)
    assert h.stream == 0
    h.destroy()
    h.destroy()
    with pytest.raises(ValueError, match="destroyed"):
        h.set_stream(stream)


@pytest.mark.gpu
@pytest.mark.parametrize("math", ["fma", "tensor_op"])
def test_one_forward_and_both_backward_convolutions_against_numpy(math):
    """A 3x3, stride 2, pad 1 conv through cuDNN (algorithms by Find, workspace from CuPy):
    forward against NumPy, then dx and dw against the same reference's adjoints (checked via
    <conv(x, w), dy> = <x, dx> = <w, dw>)."""
    import cupy as cp
    rng = np.random.default_rng(0)
    n, h, c, cout, k, s, p = 4, 15, 16, 32, 3, 2, 1
    ho = out_size(h, k, s, p)
    x = rng.standard_normal((n, h, h, c)).astype(np.float32)
    w = rng.standard_normal((cout, k, k, c)).astype(np.float32)
    dy = rng.standard_normal((n, ho, ho, cout)).astype(np.float32)
    xd, wd, yd = cudnn.TensorDesc(n, h, h, c), cudnn.FilterDesc(cout, k, k, c), cudnn.TensorDesc(n, ho, ho, cout)
    conv = cudnn.ConvDesc(p, s, math=math)
    assert cudnn.forward_output_dim(conv, xd, wd) == (n, ho, ho, cout)
    gx, gw, gdy = cp.asarray(x), cp.asarray(w), cp.asarray(dy)
    gy, gdx, gdw = cp.empty((n, ho, ho, cout), cp.float32), cp.empty_like(gx), cp.empty_like(gw)
    ws = cp.empty(64 << 20, cp.uint8)
    handle = cudnn.Handle(cp.cuda.get_current_stream())
    try:
        fwd = [a for a in cudnn.find_forward_algorithms(handle, xd, gx.data.ptr, wd, gw.data.ptr, conv, yd,
                                                        gy.data.ptr, ws.data.ptr, ws.nbytes) if a.status == 0]
        bwd_d = [a for a in cudnn.find_backward_data_algorithms(handle, wd, gw.data.ptr, yd, gdy.data.ptr, conv, xd,
                                                                gdx.data.ptr, ws.data.ptr, ws.nbytes) if a.status == 0]
        bwd_f = [a for a in cudnn.find_backward_filter_algorithms(handle, xd, gx.data.ptr, yd, gdy.data.ptr, conv, wd,
                                                                  gdw.data.ptr, ws.data.ptr, ws.nbytes) if a.status == 0]
        assert fwd and bwd_d and bwd_f
        assert cudnn.get_forward_algorithms(handle, xd, wd, conv, yd)
        a = fwd[0]
        assert cudnn.forward_workspace_size(handle, xd, wd, conv, yd, a.algo) <= ws.nbytes
        cudnn.convolution_forward(handle, xd, gx.data.ptr, wd, gw.data.ptr, conv, a.algo, yd, gy.data.ptr,
                                  ws.data.ptr, ws.nbytes)
        cudnn.convolution_backward_data(handle, wd, gw.data.ptr, yd, gdy.data.ptr, conv, bwd_d[0].algo, xd,
                                        gdx.data.ptr, ws.data.ptr, ws.nbytes)
        gdw.fill(1)                       # beta=1 accumulates: dw = 1 + grad
        cudnn.convolution_backward_filter(handle, xd, gx.data.ptr, yd, gdy.data.ptr, conv, bwd_f[0].algo, wd,
                                          gdw.data.ptr, ws.data.ptr, ws.nbytes, beta=1.0)
        cp.cuda.get_current_stream().synchronize()
    finally:
        handle.destroy()
    y_ref = conv_reference(x, w, None, s, p)[0]
    tol = 1e-4 if math == "fma" else 3e-2       # TF32 on the tensor cores
    np.testing.assert_allclose(cp.asnumpy(gy), y_ref, rtol=tol, atol=tol * np.abs(y_ref).max())
    # adjoints: <y(x, w), dy> is bilinear, so <x, dx> and <w, dw> both equal it
    ref = float(np.sum(y_ref * dy))
    assert abs(float(np.sum(x.astype(np.float64) * cp.asnumpy(gdx))) - ref) <= tol * 10 * abs(ref) + 1e-3
    assert abs(float(np.sum(w.astype(np.float64) * (cp.asnumpy(gdw) - 1))) - ref) <= tol * 10 * abs(ref) + 1e-3


# ---- the GPU-only wrappers, on a stand-in library ------------------------------------------

STUB_SCRIPT = r'''
import ctypes, os, threading, time
import numpy as np
from engine import cudnn

stub = ctypes.CDLL(os.environ["ENGINE_CUDNN_LIBRARY"])
stub.stub_log.restype = ctypes.c_char_p
def log():
    text = stub.stub_log().decode()
    stub.stub_clear()
    return text
ptr = lambda a: a.ctypes.data

assert cudnn.library_path() == os.environ["ENGINE_CUDNN_LIBRARY"]
assert cudnn.version() == 90100 and cudnn.missing_symbols() == [] and cudnn.cudart_version() == 12040
handle = cudnn.Handle(0x1234)
assert handle.stream == 0x1234 and f"cudnnSetStream {hex(handle.ptr)} 0x1234" in log()

# h != w, kh != kw, pad and stride differ per axis: any swap of h and w shows
rng = np.random.default_rng(1)
n, h, w, c, cout, kh, kw, pad, stride = 2, 9, 7, 3, 5, 3, 2, (1, 0), (2, 1)
ho, wo = (h + 2 * pad[0] - kh) // stride[0] + 1, (w + 2 * pad[1] - kw) // stride[1] + 1
x = rng.standard_normal((n, h, w, c)).astype(np.float32)
wt = rng.standard_normal((cout, kh, kw, c)).astype(np.float32)
dy = rng.standard_normal((n, ho, wo, cout)).astype(np.float32)
xd, wd, yd = cudnn.TensorDesc(n, h, w, c), cudnn.FilterDesc(cout, kh, kw, c), cudnn.TensorDesc(n, ho, wo, cout)
conv = cudnn.ConvDesc(pad, stride, math="tensor_op")
assert cudnn.forward_output_dim(conv, xd, wd) == (n, ho, wo, cout)

# NumPy references: the taps of the zero-padded input
xp = np.pad(x.astype(np.float64), ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
y_ref, dxp, dw_ref = np.zeros((n, ho, wo, cout)), np.zeros_like(xp), np.zeros(wt.shape)
for r in range(kh):
    for s in range(kw):
        win = (slice(None), slice(r, r + stride[0] * ho, stride[0]), slice(s, s + stride[1] * wo, stride[1]))
        y_ref += np.einsum("nhwc,oc->nhwo", xp[win], wt[:, r, s, :])
        dxp[win] += np.einsum("nhwo,oc->nhwc", dy, wt[:, r, s, :])
        dw_ref[:, r, s, :] = np.einsum("nhwc,nhwo->oc", xp[win], dy)
dx_ref = dxp[:, pad[0]:pad[0] + h, pad[1]:pad[1] + w, :]

ws = np.zeros(4096, np.uint8)
y = np.ones((n, ho, wo, cout), np.float32)
cudnn.convolution_forward(handle, xd, ptr(x), wd, ptr(wt), conv, 3, yd, ptr(y), ptr(ws), 4096, alpha=2.0, beta=0.5)
np.testing.assert_allclose(y, 2 * y_ref + 0.5, rtol=1e-5, atol=1e-5)
line = log()
for part in (f"handle={hex(handle.ptr)}", f"x={hex(ptr(x))}", f"w={hex(ptr(wt))}", f"y={hex(ptr(y))}", "algo=3",
             f"ws={hex(ptr(ws))}", "wsb=4096", "alpha=2", "beta=0.5", "math=1"):
    assert part in line, (part, line)

dx = np.full(x.shape, 7, np.float32)
cudnn.convolution_backward_data(handle, wd, ptr(wt), yd, ptr(dy), conv, 1, xd, ptr(dx))
np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)            # beta=0: the 7s are gone
line = log()
for part in (f"w={hex(ptr(wt))}", f"dy={hex(ptr(dy))}", f"dx={hex(ptr(dx))}", "algo=1", "ws=(nil)", "wsb=0",
             "alpha=1", "beta=0"):
    assert part in line, (part, line)
dw = np.ones(wt.shape, np.float32)
cudnn.convolution_backward_filter(handle, xd, ptr(x), yd, ptr(dy), conv, 0, wd, ptr(dw), beta=1.0)
np.testing.assert_allclose(dw, dw_ref + 1, rtol=1e-5, atol=1e-5)       # beta=1 accumulates
line = log()
for part in (f"x={hex(ptr(x))}", f"dy={hex(ptr(dy))}", f"dw={hex(ptr(dw))}", "algo=0", "beta=1"):
    assert part in line, (part, line)

# searches: results in the stub's order, statuses by workspace, names by direction
found = cudnn.find_forward_algorithms(handle, xd, ptr(x), wd, ptr(wt), conv, yd, ptr(y), ptr(ws), 3500)
assert [a.algo for a in found] == list(range(7, -1, -1))
assert [a.status == 0 for a in found] == [a.algo <= 3 for a in found]
a = found[-1]
assert (a.name, a.status_name, a.workspace, a.math, a.deterministic) == ("IMPLICIT_GEMM", "CUDNN_STATUS_SUCCESS", 0, "tensor_op", False)
assert found[0].status_name == "CUDNN_STATUS_NOT_SUPPORTED" and found[0].time_ms == 0.5
line = log()
assert f"x={hex(ptr(x))} w={hex(ptr(wt))} y={hex(ptr(y))}" in line and "requested=8" in line and "wsb=3500" in line
found = cudnn.find_backward_data_algorithms(handle, wd, ptr(wt), yd, ptr(dy), conv, xd, ptr(dx), count=2)
assert [(a.algo, a.name) for a in found] == [(1, "1"), (0, "0")]
assert f"w={hex(ptr(wt))} dy={hex(ptr(dy))} dx={hex(ptr(dx))}" in log()
found = cudnn.find_backward_filter_algorithms(handle, xd, ptr(x), yd, ptr(dy), conv, wd, ptr(dw))
assert [a.name for a in found] == ["FFT_TILING", "WINOGRAD_NONFUSED", "WINOGRAD", "3", "FFT", "1", "0"]
assert f"x={hex(ptr(x))} dy={hex(ptr(dy))} dw={hex(ptr(dw))}" in log()
assert len(cudnn.get_forward_algorithms(handle, xd, wd, conv, yd)) == 8
assert len(cudnn.get_backward_data_algorithms(handle, wd, yd, conv, xd)) == 6
assert len(cudnn.get_backward_filter_algorithms(handle, xd, yd, conv, wd, count=3)) == 3
try:
    cudnn.get_forward_algorithms(handle, xd, wd, conv, yd, count=9)
except ValueError as e:
    assert "1..8" in str(e)
else:
    raise AssertionError("count 9 accepted")

assert cudnn.forward_workspace_size(handle, xd, wd, conv, yd, 5) == 5000
assert cudnn.backward_data_workspace_size(handle, wd, yd, conv, xd, 5) == 5001
assert cudnn.backward_filter_workspace_size(handle, xd, yd, conv, wd, 5) == 5002

# errors: cuDNN's status and message; NULL pointers and dead descriptors never reach it
bd = cudnn.TensorDesc(n, h, w, c, "bfloat16")
try:
    cudnn.convolution_forward(handle, bd, ptr(x), wd, ptr(wt), conv, 0, yd, ptr(y))
except cudnn.CudnnError as e:
    assert (e.name, e.call, e.message) == ("CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE", "cudnnConvolutionForward",
                                           "stub: mixed data types"), (e.name, e.call, e.message)
else:
    raise AssertionError("no CudnnError")
log()
for call in (lambda: cudnn.convolution_forward(handle, xd, 0, wd, ptr(wt), conv, 0, yd, ptr(y)),
             lambda: cudnn.convolution_backward_filter(handle, xd, ptr(x), yd, ptr(dy), conv, 0, wd, 0)):
    try:
        call()
    except ValueError as e:
        assert "NULL" in str(e)
    else:
        raise AssertionError("NULL accepted")
bd.destroy()
try:
    cudnn.forward_workspace_size(handle, bd, wd, conv, yd, 0)
except ValueError as e:
    assert "destroyed" in str(e)
else:
    raise AssertionError("dead descriptor accepted")
assert log() == ""

# the GIL is released: algo 99 sleeps 300 ms inside the stub while this thread keeps running
t = threading.Thread(target=cudnn.convolution_forward, args=(handle, xd, ptr(x), wd, ptr(wt), conv, 99, yd, ptr(y)))
last, gap = time.perf_counter(), 0.0
t.start()
while t.is_alive():
    now = time.perf_counter()
    gap, last = max(gap, now - last), now
t.join()
assert gap < 0.15, f"the main thread stalled {gap:.3f} s: the GIL was held"

hp = handle.ptr
handle.destroy()
handle.destroy()
assert log().count("cudnnDestroy") == 1 and not handle.alive
print("stub ok")
'''


def test_gpu_only_wrappers_pass_every_argument_to_the_right_place(tmp_path):
    """engine.cudnn against tests/cudnn_stub.c, a stand-in libcudnn.so.9 that convolves host
    memory: forward, backward data and backward filter equal NumPy's (so pointers, descriptors,
    alpha and beta went where they belong), the searches' results are read field by field,
    the workspace sizes come from the right direction, errors carry the stub's status and
    message, and a slow call leaves the GIL free."""
    lib = compile_stub(tmp_path)
    if lib is None:
        pytest.skip("no C compiler")
    assert _run(STUB_SCRIPT, ENGINE_CUDNN_LIBRARY=str(lib)).strip().endswith("stub ok")
