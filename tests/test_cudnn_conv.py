"""engine.cudnn_conv (issue 17, phase 2) against tests/cudnn_stub.c, the stand-in libcudnn.so.9
that convolves host memory and logs every call: every conv of ResNet-18 and ResNet-50 in
all three directions against float64 NumPy, with each call's descriptors (read back from
the library), pointers, algorithm, workspace, alpha and beta checked; the algorithm cache;
the workspace cap and the single allocation; accumulation into dx; the self-check's
fallback. engine.cudnn opens its library once per process, so each case runs in its own
interpreter with ENGINE_CUDNN_LIBRARY set to the stub (the `case_*` functions below)."""
import ctypes
import os

import numpy as np
import pytest

from cudnn_helpers import conv_reference, resnet_convs, run_case, stub  # noqa: F401  (stub: the fixture)
from engine import cudnn_conv
from engine.cudnn_conv import ConvShape, error_bound
from numerics import norm_rel_err

BATCH, SIZE, CAP = 2, 32, 3500


# ---- in the subprocess ------------------------------------------------------------------

class Recorder:
    """engine.cudnn with every GPU-only call recorded: its name, its arguments, the read-back
    of each descriptor among them (at call time) and the stub's log of it. `corrupt`:
    {(call, ConvShape): f(out_array)} applied to the output after the real call; `fail`:
    {(call, ConvShape)} raise a CudnnError instead; `sizes`: f(direction, shape, algo) that
    replaces the workspace sizes."""

    GPU_CALLS = ("find_forward_algorithms", "find_backward_data_algorithms", "find_backward_filter_algorithms",
                 "get_forward_algorithms", "get_backward_data_algorithms", "get_backward_filter_algorithms",
                 "forward_workspace_size", "backward_data_workspace_size", "backward_filter_workspace_size",
                 "convolution_forward", "convolution_backward_data", "convolution_backward_filter")

    def __init__(self, corrupt=None, fail=(), sizes=None):
        from engine import cudnn
        self.api = cudnn
        self.stub = ctypes.CDLL(os.environ["ENGINE_CUDNN_LIBRARY"])
        self.stub.stub_log.restype = ctypes.c_char_p
        self.calls = []
        self.corrupt, self.fail, self.sizes = corrupt or {}, set(fail), sizes

    def __getattr__(self, name):
        attr = getattr(self.api, name)
        if name not in self.GPU_CALLS:
            return attr

        def call(*args):
            descs = [a for a in args if isinstance(a, (self.api.TensorDesc, self.api.FilterDesc, self.api.ConvDesc))]
            shape = _shape_of_descs(name, descs)
            rec = {"name": name, "args": args, "shape": shape, "descs": [d.read_back() for d in descs]}
            self.stub.stub_clear()
            if (name, shape) in self.fail:
                raise self.api.CudnnError(3000, "injected failure", name)
            out = attr(*args)
            if self.sizes is not None and name.endswith("workspace_size"):
                out = self.sizes(name.split("_workspace")[0], shape, args[-1])
            rec["log"] = self.stub.stub_log().decode()
            self.stub.stub_clear()
            self.calls.append(rec)
            fix = self.corrupt.get((name, shape))
            if fix is not None:
                d = descs[-1]
                fix(np.ctypeslib.as_array(ctypes.cast(args[8], ctypes.POINTER(ctypes.c_float)), shape=d.shape))
            return out
        return call

    def named(self, prefix):
        return [c for c in self.calls if c["name"].startswith(prefix)]


def _shape_of_descs(name, descs):
    """The ConvShape of a call, from its descriptors: x is the first tensor descriptor, but
    the last (dx) in the backward-data calls, which name dy first."""
    from engine import cudnn
    ts = [d for d in descs if isinstance(d, cudnn.TensorDesc)]
    w = next(d for d in descs if isinstance(d, cudnn.FilterDesc))
    c = next(d for d in descs if isinstance(d, cudnn.ConvDesc))
    x = ts[-1] if "backward_data" in name else ts[0]
    return ConvShape(x.n, x.h, x.w, x.c, w.cout, w.kh, c.stride[0], c.pad[0])


def ptr(a):
    return a.ctypes.data


class Allocs(list):
    """The injected allocator: host buffers, each request recorded."""

    def __call__(self, nbytes):
        self.append(int(nbytes))
        buf = np.zeros(int(nbytes), np.uint8)
        self.buffers = getattr(self, "buffers", []) + [buf]
        return buf


def make(precision="fp32", cap=CAP, search="find", api=None, allocs=None):
    from engine import cudnn
    api = api or Recorder()
    allocs = Allocs() if allocs is None else allocs
    convs = cudnn_conv.CudnnConvolutions(lambda: cudnn.Handle(0x5150), precision, cap, search=search, alloc=allocs,
                                         pointer=ptr, xp=np, api=api)
    return convs, api, allocs


def model_shapes(arch):
    return [ConvShape(BATCH, h, w, cin, cout, k, s, p) for _, h, w, cin, cout, k, s, p in resnet_convs(arch, SIZE)]


def step(convs, shapes, rng):
    """Every conv once in each direction on random data (in the precision's storage type),
    checked against float64 NumPy of the same stored values within the precision's bound."""
    dt = cudnn_conv._np_dtype(convs.dtype)
    for shape in shapes:
        x = rng.standard_normal(shape.x, dtype=np.float32).astype(dt)
        w = rng.standard_normal(shape.weight, dtype=np.float32).astype(dt)
        dy = rng.standard_normal(shape.out, dtype=np.float32).astype(dt)
        y, dx, dw = np.full(shape.out, 9, dt), np.full(shape.x, 9, dt), np.zeros(shape.weight, dt)
        convs.forward(x, w, y, shape.stride, shape.pad)
        convs.backward_data(dy, w, dx, shape.stride, shape.pad)
        convs.backward_filter(x, dy, dw, shape.stride, shape.pad)
        y_ref, dx_ref, dw_ref = conv_reference(x, w, dy, shape.stride, shape.pad)
        for d, ours, ref in (("forward", y, y_ref), ("backward_data", dx, dx_ref), ("backward_filter", dw, dw_ref)):
            assert norm_rel_err(ours, ref) <= error_bound(d, shape, convs.precision), (shape, d, norm_rel_err(ours, ref))
        yield shape, (x, w, dy, y, dx, dw)


def check_calls(api, shape, arrays, precision, algos, ws_ptr):
    """The three convolution calls of one shape: descriptors, pointers, algorithm, workspace,
    alpha/beta as passed and as the stub logged them."""
    from engine import cudnn
    x, w, dy, y, dx, dw = arrays
    dtype, compute, math = cudnn.PRECISIONS[precision]
    n, ho, wo, cout = shape.out
    nhwc = lambda s: {"dtype": dtype, "shape": s, "strides": (s[1] * s[2] * s[3], s[2] * s[3], s[3], 1)}
    xdesc, ydesc = nhwc(shape.x), nhwc(shape.out)
    wdesc = {"dtype": dtype, "format": "nhwc", "shape": shape.weight}
    cdesc = {"pad": (shape.pad,) * 2, "stride": (shape.stride,) * 2, "dilation": (1, 1), "mode": "cross_correlation",
             "compute": compute, "math": math}
    fwd, bwd_d, bwd_f = api.calls[-3:]
    assert fwd["name"] == "convolution_forward" and fwd["descs"] == [xdesc, wdesc, cdesc, ydesc]
    assert bwd_d["name"] == "convolution_backward_data" and bwd_d["descs"] == [wdesc, ydesc, cdesc, xdesc]
    assert bwd_f["name"] == "convolution_backward_filter" and bwd_f["descs"] == [xdesc, ydesc, cdesc, wdesc]
    for rec, direction, parts in (
            (fwd, "forward", [f"x={hex(ptr(x))}", f"w={hex(ptr(w))}", f"y={hex(ptr(y))}",
                              f"math={cudnn.MATH_TYPES[math]}"]),
            (bwd_d, "backward_data", [f"w={hex(ptr(w))}", f"dy={hex(ptr(dy))}", f"dx={hex(ptr(dx))}"]),
            (bwd_f, "backward_filter", [f"x={hex(ptr(x))}", f"dy={hex(ptr(dy))}", f"dw={hex(ptr(dw))}"])):
        a = algos[direction]
        parts += [f"algo={a.algo} ", f"ws={hex(ws_ptr)} ", f"wsb={a.workspace} ", "alpha=1 ", "beta=0",
                  f"handle={hex(rec['args'][0].ptr)}"]
        line = rec["log"]
        assert line.count("\n") == 1, line
        for part in parts:
            assert part in line, (shape, direction, part, line)
        assert rec["args"][0].stream == 0x5150


def case_every_resnet_conv(arch, precision):
    rng = np.random.default_rng(0)
    convs, api, allocs = make(precision)
    shapes = model_shapes(arch)
    distinct = list(dict.fromkeys(shapes))
    convs.prepare(shapes)
    # Find on every distinct shape, in each direction, with the one cap-sized search buffer
    finds = api.named("find_")
    assert len(finds) == 3 * len(distinct) and convs.searches == len(distinct)
    search_ptr = ptr(allocs.buffers[0])
    for rec in finds:
        assert f"ws={hex(search_ptr)} wsb={CAP}" in rec["log"], rec["log"]
    # the stub's algorithm a needs 1000*a bytes (+ the direction, 0/1/2, by GetWorkspaceSize) and
    # runs in 0.5*(count - a) ms: algorithm 3 is the fastest that fits 3500 bytes
    algos = convs.algorithms(shapes[0])
    assert {d: (a.algo, a.workspace) for d, a in algos.items()} == \
        {"forward": (3, 3000), "backward_data": (3, 3001), "backward_filter": (3, 3002)}
    assert allocs == [CAP, 3002]           # the search buffer, then the workspace once
    ws_ptr = ptr(allocs.buffers[1])
    for shape, arrays in step(convs, shapes, rng):
        check_calls(api, shape, arrays, precision, convs.algorithms(shape), ws_ptr)
    assert len(api.named("convolution_")) == 3 * len(shapes)
    assert allocs == [CAP, 3002] and len(api.named("find_")) == 3 * len(distinct)
    print("ok", arch, precision, len(shapes), len(distinct))


def case_cache_is_hit_after_the_first_step():
    rng = np.random.default_rng(1)
    convs, api, allocs = make()
    shapes = model_shapes("resnet18")
    distinct = list(dict.fromkeys(shapes))
    for _ in step(convs, shapes, rng):          # first step: searched lazily, shape by shape
        pass
    first = {s: convs.algorithms(s) for s in distinct}
    assert len(api.named("find_")) == 3 * len(distinct) and convs.searches == len(distinct)
    assert allocs.count(3002) == 1              # the workspace: allocated once (all need the same)
    api.calls.clear()
    n_allocs = len(allocs)
    for _ in step(convs, shapes, rng):          # second step: no search, the same algorithms
        pass
    assert api.named("find_") == [] and api.named("get_") == [] and api.named("forward_workspace") == []
    assert [c["name"] for c in api.calls] == ["convolution_forward", "convolution_backward_data",
                                              "convolution_backward_filter"] * len(shapes)
    assert {s: convs.algorithms(s) for s in distinct} == first
    assert len(allocs) == n_allocs and convs.searches == len(distinct)
    # a new dtype/math is a new key: the tf32 object searches again
    tf32, api32, _ = make("tf32")
    tf32.prepare(distinct[:1])
    assert len(api32.named("find_")) == 3
    assert convs.key(distinct[0]) != tf32.key(distinct[0])
    print("ok")


def case_workspace_cap_and_single_allocation():
    from engine.cudnn_conv import CudnnConvError
    shapes = list(dict.fromkeys(model_shapes("resnet18")))
    # cap 3001: Find reports algorithm 3 of backward filter as fitting (1000*3 bytes) but its
    # workspace size is 3002, over the cap: skipped for algorithm 2
    convs, api, allocs = make(cap=3001)
    convs.prepare(shapes)
    a = convs.algorithms(shapes[0])
    assert {d: (x.algo, x.workspace) for d, x in a.items()} == \
        {"forward": (3, 3000), "backward_data": (3, 3001), "backward_filter": (2, 2002)}
    assert allocs == [3001, 3001]
    # the heuristic: no Find, no search buffer; first fitting in the heuristic's order
    convs, api, allocs = make(search="heuristic")
    convs.prepare(shapes)
    assert api.named("find_") == [] and len(api.named("get_")) == 3 * len(shapes)
    assert {d: x.algo for d, x in convs.algorithms(shapes[0]).items()} == dict.fromkeys(cudnn_conv.DIRECTIONS, 3)
    assert allocs == [3002]
    # per-shape needs (Cin bytes more per algorithm): one allocation at the largest need over
    # all shapes; later shapes grow it only when they need more, and never above the cap
    sizes = lambda direction, shape, algo: 1000 * algo + 4 * shape.cin
    big_cap = 3000 + 4 * 512
    convs, api, allocs = make(cap=big_cap, search="heuristic", api=Recorder(sizes=sizes))
    convs.prepare(shapes)
    chosen = {s: convs.algorithms(s) for s in shapes}
    needs = [x.workspace for a in chosen.values() for x in a.values()]
    assert all(n <= big_cap for n in needs) and len(set(needs)) > 1
    assert all(a.algo < 7 for a in convs.algorithms(shapes[0]).values())    # 7 needs 7000+: skipped
    assert allocs == [max(needs)] and convs.workspace_bytes == max(needs)
    convs, api, allocs = make(cap=big_cap, search="heuristic", api=Recorder(sizes=sizes))
    by_cin = sorted(shapes, key=lambda s: s.cin)
    small, large = by_cin[0], by_cin[-1]
    convs.prepare([small])
    convs.prepare([large])
    convs.prepare([small._replace(n=3)])        # a new key that needs no more: no allocation
    assert len(allocs) == 2 and allocs[0] < allocs[1] <= big_cap
    # nothing fits: the error names the shape and the direction
    convs, api, allocs = make(cap=0)
    try:
        convs.prepare(shapes[:1])
    except CudnnConvError as e:
        assert str(e).startswith(f"{shapes[0]}, backward_data: no algorithm within the workspace cap of 0 bytes")
        assert e.direction == "backward_data" and e.shape == shapes[0]
    else:
        raise AssertionError("no CudnnConvError")
    print("ok")


def case_accumulate_adds_into_dx_and_bad_arrays_are_named():
    from engine.cudnn_conv import CudnnConvError
    rng = np.random.default_rng(2)
    convs, api, _ = make()
    shape = ConvShape(2, 9, 9, 8, 16, 3, 2, 1)
    w = rng.standard_normal(shape.weight, dtype=np.float32)
    dy = rng.standard_normal(shape.out, dtype=np.float32)
    ref = conv_reference(np.zeros(shape.x), w, dy, 2, 1)[1]
    dx = rng.standard_normal(shape.x, dtype=np.float32)
    before = dx.copy()
    convs.backward_data(dy, w, dx, 2, 1, accumulate=True)
    np.testing.assert_allclose(dx, before + ref, rtol=1e-5, atol=1e-5)
    assert "alpha=1 beta=1" in api.calls[-1]["log"] and api.calls[-1]["args"][-1] == 1.0
    convs.backward_data(dy, w, dx, 2, 1)
    np.testing.assert_allclose(dx, ref, rtol=1e-5, atol=1e-5)
    assert "alpha=1 beta=0" in api.calls[-1]["log"]
    for call, text in (
            (lambda: convs.forward(np.zeros(shape.x, np.float32), w, np.zeros((2, 4, 4, 16), np.float32), 2, 1),
             f"{shape}, forward: y has shape (2, 4, 4, 16), expected (2, 5, 5, 16)"),
            (lambda: convs.backward_filter(np.zeros(shape.x, np.float64), dy, np.zeros(shape.weight, np.float32), 2, 1),
             f"{shape}, backward_filter: x is float64, expected float32")):
        try:
            call()
        except CudnnConvError as e:
            assert str(e) == text, str(e)
        else:
            raise AssertionError("accepted")
    print("ok")


def _im2col_stand_in(shape, x, w, dy):
    """What the engine's im2col path returns, here the float64 reference rounded to float32."""
    return [r.astype(np.float32) for r in conv_reference(x, w, dy, shape.stride, shape.pad)]


def case_self_check_falls_back_for_a_wrong_and_a_failing_shape():
    shapes = model_shapes("resnet18")
    distinct = list(dict.fromkeys(shapes))
    wrong, failing = distinct[3], distinct[5]
    scale = lambda out: out.__imul__(1.01)            # 1% off: far above the fp32 bound
    api = Recorder(corrupt={("convolution_forward", wrong): scale},
                   fail={("convolution_backward_filter", failing)})
    convs, api, allocs = make(api=api)
    result = convs.self_check(shapes, _im2col_stand_in)
    assert result.cudnn == frozenset(distinct) - {wrong, failing}
    assert set(result.fallback) == {wrong, failing}
    assert "forward relative error 0.01 > bound" in result.fallback[wrong]
    assert "injected failure" in result.fallback[failing] and "backward_filter" in result.fallback[failing]
    line = result.warning
    assert "\n" not in line and str(wrong) in line and str(failing) in line and "2 of" in line
    assert not convs.uses_cudnn(wrong) and not convs.uses_cudnn(failing) and convs.uses_cudnn(distinct[0])
    try:                               # and cuDNN refuses to run them from now on
        convs.forward(np.zeros(wrong.x, np.float32), np.zeros(wrong.weight, np.float32),
                      np.zeros(wrong.out, np.float32), wrong.stride, wrong.pad)
    except cudnn_conv.CudnnConvError as e:
        assert str(e).startswith(f"{wrong}, forward: failed the self-check (forward relative error"), str(e)
    else:
        raise AssertionError("a shape that failed the self-check ran through cuDNN")
    for s in result.cudnn:
        for d, err in result.errors[s].items():
            assert err <= error_bound(d, s, "fp32") and err < 1e-6, (s, d, err)
    assert allocs == [CAP, 3002]       # one search buffer and one workspace for the whole check
    # all good: no warning
    convs, _, _ = make()
    assert convs.self_check(distinct[:4], _im2col_stand_in).warning is None
    print(line)


def case_self_check_bf16_refused_by_the_library_falls_back():
    """A library without bfloat16 convolutions (the stub set to float32 only): every bf16
    shape's search fails in cuDNN itself, and each falls back with cuDNN's status name; the
    reference is never needed."""
    ctypes.CDLL(os.environ["ENGINE_CUDNN_LIBRARY"]).stub_float32_only(1)
    shapes = list(dict.fromkeys(model_shapes("resnet18")))[:3]
    convs, api, _ = make("bf16")
    result = convs.self_check(shapes, lambda *a: pytest.fail("im2col called"))
    assert result.cudnn == frozenset() and set(result.fallback) == set(shapes)
    for s in shapes:
        assert result.fallback[s].startswith("forward: algorithm search failed: CudnnError: ")
        assert "CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE" in result.fallback[s] and f"{s}: forward" in result.warning
    assert result.warning.count("CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE") == 3 and "\n" not in result.warning
    print("ok")


# ---- in pytest ------------------------------------------------------------------------

def _case(stub, call):
    return run_case("test_cudnn_conv", call, stub)


@pytest.mark.parametrize("arch,precision", [("resnet18", "fp32"), ("resnet50", "fp32"), ("resnet50", "tf32"),
                                            ("resnet18", "bf16")])
def test_every_resnet_conv_in_all_directions_against_float64(stub, arch, precision):
    out = _case(stub, f"case_every_resnet_conv({arch!r}, {precision!r})")
    assert out.startswith(f"ok {arch} {precision} ")


def test_algorithm_cache_is_hit_after_the_first_step(stub):
    assert _case(stub, "case_cache_is_hit_after_the_first_step()").strip() == "ok"


def test_workspace_cap_is_respected_and_allocated_once_at_the_largest_need(stub):
    assert _case(stub, "case_workspace_cap_and_single_allocation()").strip() == "ok"


def test_accumulate_adds_into_dx_and_bad_arrays_are_named(stub):
    assert _case(stub, "case_accumulate_adds_into_dx_and_bad_arrays_are_named()").strip() == "ok"


def test_self_check_falls_back_for_a_wrong_and_a_failing_shape_with_one_warning(stub):
    line = _case(stub, "case_self_check_falls_back_for_a_wrong_and_a_failing_shape()").strip()
    assert line.startswith("cuDNN self-check (fp32): 2 of ") and line.count("\n") == 0


def test_self_check_falls_back_where_the_library_refuses(stub):
    assert _case(stub, "case_self_check_bf16_refused_by_the_library_falls_back()").strip() == "ok"


def test_the_bound_per_direction_and_precision():
    s = ConvShape(32, 56, 56, 64, 128, 3, 1, 1)
    assert error_bound("forward", s, "fp32") == 2 * 9 * 64 * 2.0 ** -24
    assert error_bound("backward_data", s, "tf32") == 2 * (9 * 128 * 2.0 ** -24 + 2 * 2.0 ** -11)
    assert error_bound("forward", s, "bf16") == 2 * (9 * 64 * 2.0 ** -24 + 2.0 ** -8)
    assert error_bound("backward_filter", s, "fp32") == 2 * 32 * 56 * 56 * 2.0 ** -24
    assert error_bound("backward_filter", s._replace(n=256), "fp32") == cudnn_conv.BOUND_CAP   # 0.096: capped
    small = s._replace(n=2, h=8, w=8)
    assert error_bound("backward_filter", small, "fp32") == 2 * 2 * 8 * 8 * 2.0 ** -24
    # every bound separates a correct result (~2^-11 for tf32, ~2^-9 for bf16) from a wrong one (O(1))
    for p in ("fp32", "tf32", "bf16"):
        for d in cudnn_conv.DIRECTIONS:
            assert error_bound(d, s, p) <= 2.0 ** -5


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_gpu_every_resnet50_conv_passes_the_self_check(precision):
    """On a GPU, the real cuDNN: every distinct conv of ResNet-50 (224 px, batch 8) through
    Find, the workspace from CuPy's pool, against the float64 reference of the same inputs,
    within the stated bound, in each precision. (Not run where there is no GPU.)"""
    import cupy as cp
    shapes = [ConvShape(8, h, w, cin, cout, k, s, p) for _, h, w, cin, cout, k, s, p in resnet_convs("resnet50", 224)]

    def reference(shape, x, w, dy):
        host = [a.get().astype(np.float64) for a in (x, w, dy)]
        return [cp.asarray(r.astype(np.float32)) for r in conv_reference(*host, shape.stride, shape.pad)]

    convs = cudnn_conv.CudnnConvolutions(cudnn_conv.gpu_handle_factory(), precision, 64 << 20)
    try:
        result = convs.self_check(shapes, reference)
        cp.cuda.get_current_stream().synchronize()
    finally:
        convs.close()
    assert result.warning is None, result.warning
    assert len(result.cudnn) == 23 and 0 < convs.workspace_bytes <= 64 << 20
