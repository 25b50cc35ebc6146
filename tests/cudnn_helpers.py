"""Shared by tests/test_cudnn_binding.py and tests/test_cudnn_conv.py: the stand-in libcudnn
(tests/cudnn_stub.c) built with the system C compiler, a subprocess that loads a library of
its choosing (engine.cudnn opens libcudnn once per process), the conv shapes of the
engine's ResNets, and a float64 NumPy reference of the three convolution directions."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.backend import get_backend
from engine.conv import out_size

TESTS = Path(__file__).resolve().parent


def compile_stub(directory):
    """Build tests/cudnn_stub.c as directory/libcudnn.so.9; None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    lib = Path(directory) / "libcudnn.so.9"
    res = subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(lib), str(TESTS / "cudnn_stub.c")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return lib


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    """The stand-in libcudnn, built once per test module (a test module imports this fixture)."""
    lib = compile_stub(tmp_path_factory.mktemp("cudnn_stub"))
    if lib is None:
        pytest.skip("no C compiler")
    return lib


def run_case(module, call, stub):
    """`module.call` (a case function's call, as text) in a fresh interpreter on the stub."""
    return run_python(f"import {module} as t\nt.{call}\n", ENGINE_CUDNN_LIBRARY=str(stub))


def run_python(code, timeout=300, **env):
    """Run `code` in a fresh interpreter (tests/ on its path) with `env` added; its stdout."""
    env = dict(os.environ, **env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def resnet_convs(arch="resnet50", size=224):
    """Every conv of the engine's model with the input size it sees at `size` px:
    [(name, h, w, cin, cout, k, stride, pad)]. Sizes follow the layers: conv1, the 3x3/2
    max pool, then each block (main branch from the block input, downsample likewise)."""
    from engine.model import ResNet
    model = ResNet(arch, 10, get_backend("cpu"))
    out = []

    def add(conv, h):
        out.append((conv.name, h, h, conv.cin, conv.cout, conv.k, conv.stride, conv.pad))
        return out_size(h, conv.k, conv.stride, conv.pad)

    h = add(model.conv1, size)
    h = out_size(h, 3, 2, 1)
    for block in model.blocks:
        hin, hm = h, h
        for layer in block.main[::2]:
            hm = add(layer, hm)
        if block.downsample:
            assert add(block.downsample[0], hin) == hm
        h = hm
    assert h == size // 32
    return out


def conv_reference(x, w, dy, stride, pad):
    """float64 NHWC cross-correlation with an OHWI = KRSC weight (Cout, KH, KW, Cin), and its
    two adjoints: (y, dx, dw) for the output gradient dy. stride and pad: ints or (h, w)."""
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    ph, pw = (pad, pad) if np.isscalar(pad) else pad
    n, h, wd, c = x.shape
    cout, kh, kw, _ = w.shape
    ho, wo = out_size(h, kh, sh, ph), out_size(wd, kw, sw, pw)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    dy64 = None if dy is None else np.asarray(dy, np.float64)
    xp = np.pad(x64, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    y, dxp, dw = np.zeros((n, ho, wo, cout)), np.zeros_like(xp), np.zeros(w.shape)
    for r in range(kh):
        for s in range(kw):
            win = (slice(None), slice(r, r + sh * ho, sh), slice(s, s + sw * wo, sw))
            y += np.einsum("nhwc,oc->nhwo", xp[win], w64[:, r, s, :], optimize=True)
            if dy64 is not None:
                dxp[win] += np.einsum("nhwo,oc->nhwc", dy64, w64[:, r, s, :], optimize=True)
                dw[:, r, s, :] = np.einsum("nhwc,nhwo->oc", xp[win], dy64, optimize=True)
    return y, dxp[:, ph:ph + h, pw:pw + wd, :], dw
