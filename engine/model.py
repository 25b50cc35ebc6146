"""ResNet-18/34/50/101/152 (v1.5: the stride sits on the 3x3 conv, as in torchvision),
with a hand-written backward and its parameters and gradients in two flat buffers.

    model = build_model("resnet50", 1000, get_backend("cpu"))
    logits = model.forward(x_nhwc, train=True)
    loss, dlogits = softmax_cross_entropy(logits, labels)
    model.backward(dlogits, grad_ready=reducer.grad_ready)

Flat layout = the order in which backward finishes gradients: fc first, then the blocks
from last to first (in each block: the downsample branch, then bn3, conv3, ..., conv1),
then the stem. After each layer's backward, `grad_ready(start, stop)` reports the flat
range that just became final; the ranges tile [0, layout.total) front to back, padding
included, so a reducer can launch each bucket as soon as its last range arrives. A layer
reports before it computes its input gradient, which still reads its parameters: a caller
may update params[start:stop] from the next call on (or after backward), not inside the call.

Names are torchvision's ("layer3.2.conv2.weight"); shapes are ours (conv OHWI = (Cout, KH,
KW, Cin), fc (in, out)); engine.torchvision_io converts for state_dict()/load_state_dict().

Precision (`precision=`, engine.gemm): fp32 and tf32 keep everything float32; bf16 takes
bfloat16 images (`model.input_dtype`), keeps bfloat16 activations and a bfloat16 working copy
of the parameters (`model.params_lp`, same layout) that the convolutions multiply with,
while the parameters, the gradients, the BN statistics, the pooled features and the logits
stay float32. The optimizer rewrites the working copy as it updates (weight_copy=); whoever
else writes model.params (initialization, loading, the start-up broadcast) calls
`refresh_weight_copy()`.
"""
from __future__ import annotations

import numpy as np

from engine.flat import FlatLayout
from engine.gemm import activation_dtype
from engine.layers import BatchNorm, Conv2d, GlobalAvgPool, Linear, MaxPool
from engine.parallel import SERIAL, Team, blas_threads
from engine.workspace import Workspace

# arch -> (block kind, blocks per stage)
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
MIN_SIZE = 32          # five stride-2 stages: 32 px leaves a 1x1 map before the pool


class ResidualBlock:
    """Basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 x4) block.

    Forward: y = relu(main(x) + shortcut(x)), the sum and the ReLU in the last BN's pass.
    Backward: the downsample branch first, then the main branch from its last layer; the
    first of the two BNs to see dy leaves the block's ReLU gradient in dy (the gradient of
    the shortcut) in its own pass; the input gradient is the sum of both branches, added by
    the first conv into the shortcut's gradient (in its GEMM, for a bottleneck's 1x1 conv).
    """

    def __init__(self, name, ws, kind, cin, planes, stride):
        if kind == "basic":
            cout = planes
            convs = [(cin, planes, 3, stride, 1), (planes, planes, 3, 1, 1)]
        else:
            cout = planes * 4
            convs = [(cin, planes, 1, 1, 0), (planes, planes, 3, stride, 1), (planes, cout, 1, 1, 0)]
        self.main = []
        for i, (ci, co, k, s, p) in enumerate(convs, start=1):
            self.main.append(Conv2d(f"{name}.conv{i}", ws, ci, co, k, s, p))
            self.main.append(BatchNorm(f"{name}.bn{i}", ws, co, relu=True))    # the last: after the sum
        self.downsample = []
        if stride != 1 or cin != cout:
            self.downsample = [Conv2d(f"{name}.downsample.0", ws, cin, cout, 1, stride, 0),
                               BatchNorm(f"{name}.downsample.1", ws, cout, relu=False)]
        self.last_bn = self.main[-1]
        self.ws = ws
        self.cout = cout
        self._y = None

    def forward(self, x, train):
        shortcut = x
        for layer in self.downsample:
            shortcut = layer.forward(shortcut, train)
        h = x
        for layer in self.main[:-1]:
            h = layer.forward(h, train)
        self._y = self.last_bn.forward(h, train, residual=shortcut)
        return self._y

    def param_layers(self):
        """Layers with parameters, in the order backward finishes them."""
        return self.downsample[::-1] + self.main[::-1]

    def backward(self, dy):
        if self.downsample:
            conv, bn = self.downsample
            d_short = conv.backward(bn.backward(dy, consume=False, gate_by=self._y))
            g = self.last_bn.backward(dy, pre_gated=True)
        else:
            g = self.last_bn.backward(dy, consume=False, gate_by=self._y)
            d_short = dy
        first = self.main[0]
        for layer in reversed(self.main[:-1]):
            if layer is first:          # the input gradient: the main branch's added to d_short
                g = layer.backward(g, add_to=d_short)
            else:
                g = layer.backward(g)
        self._y = None
        return g


class ResNet:
    def __init__(self, arch, num_classes, backend, dtype=np.float32, threads=None, precision="fp32"):
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        act = activation_dtype(precision)
        if np.dtype(dtype) != np.float32 and precision != "fp32":
            raise ValueError(f"precision {precision!r} needs float32 parameters, got {np.dtype(dtype)}")
        kind, counts = ARCHS[arch]
        self.arch, self.num_classes, self.backend = arch, num_classes, backend
        self.xp, self.dtype, self.precision = backend.xp, np.dtype(dtype), precision
        self.input_dtype = self.dtype if precision == "fp32" else act
        self.ws = ws = Workspace(self.xp, _team(backend, threads), precision)
        self.conv1 = Conv2d("conv1", ws, 3, 64, 7, 2, 3)
        self.bn1 = BatchNorm("bn1", ws, 64, relu=True)
        self.maxpool = MaxPool("maxpool", ws)
        self.blocks, cin = [], 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), counts), start=1):
            for i in range(count):
                stride = 2 if stage > 1 and i == 0 else 1
                block = ResidualBlock(f"layer{stage}.{i}", ws, kind, cin, planes, stride)
                self.blocks.append(block)
                cin = block.cout
        self.avgpool = GlobalAvgPool("avgpool", ws)
        self.fc = Linear("fc", ws, cin, num_classes)

        order = [self.fc] + [l for b in reversed(self.blocks) for l in b.param_layers()] + [self.bn1, self.conv1]
        self.layout = FlatLayout(spec for layer in order for spec in layer.specs())
        self.params = self.layout.alloc(self.xp, self.dtype)
        self.grads = self.layout.alloc(self.xp, self.dtype)
        self.params_lp = self.layout.alloc(self.xp, act) if precision == "bf16" else None
        starts = [self.layout.by_name[layer.specs()[0][0]].offset for layer in order]
        for layer, start, stop in zip(order, starts, starts[1:] + [self.layout.total]):
            layer.bind(self.layout, self.params, self.grads, self._layer_done, self.params_lp)
            layer.grad_range = (start, stop)
        self.batchnorms = [l for l in reversed(order) if isinstance(l, BatchNorm)]
        self.convs = [l for l in reversed(order) if isinstance(l, Conv2d)]
        self._grad_ready = None
        self._done = None
        self._trained = False

    # ---- forward / backward ------------------------------------------------------------

    def forward(self, x, train: bool):
        """Logits (N, classes) of a normalized float NHWC batch `x` (N, H, W, 3).
        With train=True, BN uses (and records) this batch's statistics and the layers keep
        what backward needs; `x` must then stay unchanged until backward."""
        self._check_input(x)
        h = self.maxpool.forward(self.bn1.forward(self.conv1.forward(x, train), train), train)
        for block in self.blocks:
            h = block.forward(h, train)
        logits = self.fc.forward(self.avgpool.forward(h, train), train)
        self._trained = train
        return logits

    def backward(self, dlogits, grad_ready=None):
        """Overwrite model.grads with the gradient of the loss whose gradient with respect
        to the logits of the last forward(train=True) is `dlogits`. Calls
        grad_ready(start, stop) as each layer's flat range becomes final."""
        if not self._trained:
            raise RuntimeError("backward needs a preceding forward(x, train=True)")
        n = self.fc._x.shape[0] if self.fc._x is not None else -1
        if tuple(dlogits.shape) != (n, self.num_classes):
            raise ValueError(f"dlogits must have shape {(n, self.num_classes)}, got {tuple(dlogits.shape)}")
        self._grad_ready, self._done = grad_ready, 0
        g = self.ws.take(dlogits.shape, self.dtype)
        g[...] = dlogits
        g = self.avgpool.backward(self.fc.backward(g))
        for block in reversed(self.blocks):
            g = block.backward(g)
        self.conv1.backward(self.bn1.backward(self.maxpool.backward(g)), need_dx=False)
        if self._done != self.layout.total:
            raise RuntimeError(f"backward finished {self._done} of {self.layout.total} gradient elements")
        self._trained = False
        self._grad_ready = None

    def _layer_done(self, layer):
        start, stop = layer.grad_range
        if start != self._done:
            raise RuntimeError(f"{layer.name}: gradients finished out of layout order")
        self._done = stop
        if self._grad_ready is not None:
            self._grad_ready(start, stop)

    def refresh_weight_copy(self) -> None:
        """Round model.params into the bf16 working copy (a no-op without one)."""
        if self.params_lp is not None:
            self.params_lp[...] = self.params.astype(self.params_lp.dtype)

    def _check_input(self, x):
        xp = self.xp
        if not isinstance(x, xp.ndarray):
            raise TypeError(f"input must be a {xp.__name__} array on this backend, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[3] != 3:
            raise ValueError(f"input must be NHWC with 3 channels, got shape {tuple(x.shape)}")
        if min(x.shape[1], x.shape[2]) < MIN_SIZE:
            raise ValueError(f"input images must be at least {MIN_SIZE} px, got {x.shape[1]}x{x.shape[2]}")
        if x.dtype != self.input_dtype:
            raise TypeError(f"input dtype {x.dtype} is not this model's input dtype {self.input_dtype} "
                            f"(precision {self.precision})")

    # ---- parameters ----------------------------------------------------------------------

    def named_parameters(self) -> dict:
        return self.layout.views(self.params)

    def named_gradients(self) -> dict:
        return self.layout.views(self.grads)

    def state_dict(self) -> dict:
        from engine.torchvision_io import to_torchvision
        return to_torchvision(self)

    def load_state_dict(self, state, strict=True):
        from engine.torchvision_io import from_torchvision
        from_torchvision(self, state, strict=strict)
        self.refresh_weight_copy()

    def _init_params(self, seed, zero_init_residual):
        """torchvision's initialization: conv kaiming-normal (fan_out, ReLU gain), BN (1, 0),
        fc uniform(+-1/sqrt(in)); drawn on the host, so every backend gets the same values."""
        rng = np.random.default_rng(seed)
        host = np.zeros(self.layout.total, dtype=self.dtype)
        last_bns = {b.last_bn.name for b in self.blocks} if zero_init_residual else set()
        for s in self.layout.slots:
            view = host[s.offset:s.stop].reshape(s.shape)
            layer, _, what = s.name.rpartition(".")
            if s.name == "fc.weight" or s.name == "fc.bias":
                bound = 1.0 / np.sqrt(self.fc.fin)
                view[...] = rng.uniform(-bound, bound, s.shape)
            elif len(s.shape) == 4:     # conv, OHWI; fan_out = KH*KW*Cout
                cout, kh, kw, cin = s.shape
                # Drawn in the (KH, KW, Cin, Cout) order of the former HWIO layout, so a
                # seed gives the same network as before the layout change.
                draw = rng.standard_normal((kh, kw, cin, cout)) * np.sqrt(2.0 / (kh * kw * cout))
                view[...] = draw.transpose(3, 0, 1, 2)
            elif what == "weight":
                view[...] = 0.0 if layer in last_bns else 1.0
        self.params[...] = self.xp.asarray(host)
        self.refresh_weight_copy()


def _team(backend, threads):
    """The CPU's Team: `threads` threads, by default as many as the BLAS uses. On the GPU
    the work is queued on a stream, and splitting it would only add launches."""
    if backend.name != "cpu":
        return SERIAL
    return Team(threads if threads is not None else blas_threads())


def build_model(arch, num_classes, backend, *, zero_init_residual=False, seed=0, dtype=np.float32,
                threads=None, precision="fp32"):
    """A ResNet by name (resnet18/34/50/101/152) with `num_classes` outputs on `backend`.
    `zero_init_residual` starts the last BN scale of each block at 0 (each block begins as
    the identity). `dtype` float64 exists for the finite-difference tests. `threads`: how
    many threads split the CPU's non-GEMM work (default: the BLAS's thread count).
    `precision`: fp32, tf32 or bf16 (engine.gemm; the module docstring above)."""
    model = ResNet(arch, num_classes, backend, dtype=dtype, threads=threads, precision=precision)
    model._init_params(seed, zero_init_residual)
    return model
