"""Layers with an explicit forward and backward, on NHWC activations, generic in xp.

Layouts (ours; engine/torchvision_io.py converts to and from torchvision's):
  * activations: NHWC, C-contiguous; float32 (fp32, tf32), bfloat16 (bf16) or float64 (the
    finite-difference tests); in every mode the pooled features, the logits and their
    gradients are float32 or float64, as are parameters, gradients and BN statistics;
  * conv weight: OHWI (Cout, KH, KW, Cin), the filter layout cuDNN wants for NHWC
    activations (its KRSC; see engine.cudnn); W.reshape(Cout, -1) is a view whose rows
    list a filter in im2col's (kh, kw, cin) order, so y = cols @ W.reshape(Cout, -1).T,
    dW = dy^T @ cols and dcols = dy @ W.reshape(Cout, -1), all without a copy;
  * fc weight: (in, out), so logits = x @ W + b.

Parameters and gradients are views into the model's two flat buffers (`bind`). Every
backward OVERWRITES its weight gradients and calls `ready(self)` as soon as they are final,
before it computes dx, so the model can tell the reducer which flat range is final and its
all-reduce starts one input-gradient GEMM earlier. Until its backward returns, the layer
still reads its weights (for dx): a reported range may be updated only from the next report
on (engine.reducer's early_update waits for it).

Memory discipline. Each layer writes its forward output into a buffer it owns and reuses
every step; backward needs only tensors that forward produced anyway (a conv keeps a
reference to its input, which is the previous layer's output), so each activation is
stored once. Gradient buffers come from the workspace's free list: `backward(dy)` consumes
dy (gives it back, or overwrites it in place) and returns dx, which the caller now owns.
"""
from __future__ import annotations

import numpy as np

from engine import batchnorm, gemm
from engine.backend import array_module, fused_kernels, host_math
from engine.conv import clipped, col2im, im2col, out_size, padded
from engine.parallel import SERIAL


class Layer:
    """Common parts: parameter specs, views into the flat buffers, the owned output."""

    # (suffix, decay) of each parameter, in torchvision's order; shapes from param_shapes()
    param_names: tuple = ()

    def __init__(self, name: str, ws):
        self.name = name
        self.ws = ws
        self.xp = ws.xp
        self.ready = None

    def param_shapes(self) -> dict:
        return {}

    def specs(self):
        shapes = self.param_shapes()
        return [(f"{self.name}.{p}", shapes[p], decay) for p, decay in self.param_names]

    def bind(self, layout, params, grads, ready, gemm_params=None):
        """Point the parameters (self.<p>) and gradients (self.d<p>) at their flat slots.
        `gemm_params`: the flat buffer a conv's GEMMs read its weight from (the bf16 working
        copy of the parameters in bf16 mode; None: the parameters themselves)."""
        for p, _ in self.param_names:
            setattr(self, p, layout.view(params, f"{self.name}.{p}"))
            setattr(self, "d" + p, layout.view(grads, f"{self.name}.{p}"))
        self.ready = ready

    def _output(self, shape, dtype):
        """This layer's own output buffer, reallocated only when the shape changes."""
        out = getattr(self, "_out", None)
        if out is None or out.shape != tuple(shape) or out.dtype != dtype:
            out = self._out = self.xp.empty(shape, dtype=dtype)
        return out


class Conv2d(Layer):
    """KxK convolution, any stride and padding, no bias (every conv feeds a batch norm)."""

    param_names = (("weight", True),)

    def __init__(self, name, ws, cin, cout, k, stride=1, pad=0):
        super().__init__(name, ws)
        self.cin, self.cout, self.k, self.stride, self.pad = cin, cout, k, stride, pad
        self.is_pointwise = k == 1 and stride == 1 and pad == 0
        # A stride-1 KxK conv's input gradient is itself a stride-1 conv: of dy padded by
        # K-1-pad with the kernel flipped and Cin/Cout swapped. That costs one gather and
        # a GEMM instead of col2im's K*K strided accumulations, plus a flipped copy of the
        # weight; it wins where the activation is large against the weight, which backward
        # takes as N*Ho*Wo >= 4*Cout (ResNet-50's 3x3 convs at batch 8, dy @ W^T + col2im
        # against this: 56x56x64 -45%, 28x28x128 -16%, 14x14x256 -5%, 7x7x512 +45%).
        self.dx_as_conv = stride == 1 and k > 1 and pad <= k - 1
        self._x = None
        # (engine.cudnn_conv.CudnnConvolutions, warn) when the job runs its convs through
        # cuDNN (--conv); each shape is self-checked against this layer's im2col path first.
        self.cudnn = None

    def param_shapes(self):
        return {"weight": (self.cout, self.k, self.k, self.cin)}      # OHWI

    def bind(self, layout, params, grads, ready, gemm_params=None):
        super().bind(layout, params, grads, ready)
        self.gemm_weight = self.weight if gemm_params is None else layout.view(gemm_params, f"{self.name}.weight")

    def _cols(self, x):
        """x as the (N*Ho*Wo, K*K*Cin) GEMM operand: a view for a 1x1/1 conv, else im2col."""
        if self.is_pointwise:
            return x.reshape(-1, self.cin), None
        col = im2col(self.ws, x, self.k, self.stride, self.pad)
        return col.reshape(-1, self.k * self.k * self.cin), col

    def _dnn(self, x):
        """The cuDNN convolutions when this conv's shape at x runs through them, else None."""
        if self.cudnn is None:
            return None
        convs, warn = self.cudnn
        n, h, w, _ = x.shape
        shape = (n, h, w, self.cin, self.cout, self.k, self.stride, self.pad)
        return convs if convs.admit(shape, self._im2col_directions, warn) else None

    def _im2col_directions(self, shape, x, w, dy):
        """(y, dx, dW) of this conv's im2col path for weight w, on a workspace of its own:
        the reference of the cuDNN self-check."""
        from engine.workspace import Workspace
        ref = Conv2d(self.name, Workspace(self.xp, SERIAL, self.ws.precision), self.cin, self.cout, self.k,
                     self.stride, self.pad)
        ref.weight = ref.gemm_weight = w
        ref.dweight = self.xp.empty(w.shape, w.dtype)
        ref.ready = lambda layer: None
        y = ref.forward(x, train=True).copy()
        dx = ref.backward(dy.copy())
        return y, dx, ref.dweight

    def forward(self, x, train):
        n, h, w, c = x.shape
        if c != self.cin:
            raise ValueError(f"{self.name}: expected {self.cin} input channels, got {c}")
        ho, wo = out_size(h, self.k, self.stride, self.pad), out_size(w, self.k, self.stride, self.pad)
        y = self._output((n, ho, wo, self.cout), x.dtype)
        if (dnn := self._dnn(x)) is not None:
            dnn.forward(x, self.gemm_weight, y, self.stride, self.pad)
        else:
            cols, _ = self._cols(x)
            gemm.matmul(cols, self.gemm_weight.reshape(self.cout, -1).T, y.reshape(-1, self.cout),
                        self.ws.precision)
        self._x = x if train else None
        return y

    def backward(self, dy, need_dx=True, add_to=None):
        """dW = dy^T cols; dx = col2im(dy W), W as (Cout, K*K*Cin). The gather is redone
        here rather than kept from forward: storing it would cost K*K times the input's
        memory. `add_to`: a gradient of x from another branch, which dx is added to (in
        the GEMM itself for a 1x1/1 conv); returns that buffer then."""
        x, prec = self._x, self.ws.precision
        if x is None:
            raise RuntimeError(f"{self.name}: backward without a forward(train=True)")
        if (dnn := self._dnn(x)) is not None:
            return self._backward_by_cudnn(dnn, x, dy, need_dx, add_to)
        dy2d = dy.reshape(-1, self.cout)
        w2d = self.gemm_weight.reshape(self.cout, -1)
        cols, col = self._cols(x)
        gemm.matmul(dy2d.T, cols, self.dweight.reshape(self.cout, -1), prec)     # float32 in every mode
        self.ready(self)            # dW is final; the weight is still read for dx below
        dx = None
        if need_dx and add_to is not None and self.is_pointwise:
            dx = gemm.matmul(dy2d, w2d, add_to.reshape(-1, self.cin), prec, accumulate=True).reshape(x.shape)
        elif need_dx:
            dx = self.ws.take(x.shape, x.dtype)
            if self.is_pointwise:
                gemm.matmul(dy2d, w2d, dx.reshape(-1, self.cin), prec)
            elif self.dx_as_conv and dy2d.shape[0] >= 4 * self.cout:
                self._dx_by_conv(dy, dx)
            else:
                gemm.matmul(dy2d, w2d, cols, prec)      # the patch gradients reuse the gather buffer
                col2im(self.ws, col, dx, self.stride, self.pad)
            if add_to is not None:
                add_to += dx
                self.ws.give(dx)
                dx = add_to
        self.ws.give(dy)
        self._x = None
        return dx

    def _backward_by_cudnn(self, dnn, x, dy, need_dx, add_to):
        """backward() through cuDNN: dW, the report, then dx (added into add_to by beta = 1).
        cuDNN writes dW in the activations' type: with bfloat16 ones (--precision bf16) into
        the arena, then widened into the float32 gradient (one rounding of each dW to
        bfloat16, as PyTorch's autocast convolutions give theirs)."""
        if self.dweight.dtype == x.dtype:
            dnn.backward_filter(x, dy, self.dweight, self.stride, self.pad)
        else:
            dw = self.ws.arena(self.dweight.shape, x.dtype)
            dnn.backward_filter(x, dy, dw, self.stride, self.pad)
            self.dweight[...] = dw
        self.ready(self)
        dx = None
        if need_dx:
            dx = add_to if add_to is not None else self.ws.take(x.shape, x.dtype)
            dnn.backward_data(dy, self.gemm_weight, dx, self.stride, self.pad, accumulate=add_to is not None)
        self.ws.give(dy)
        self._x = None
        return dx

    def _dx_by_conv(self, dy, dx):
        """dx = dy (padded by K-1-pad) convolved with the flipped, transposed kernel:
        wflip[kh, kw, co, ci] = W[co, K-1-kh, K-1-kw, ci], laid out (KH, KW, Cout, Cin) so
        that wflip.reshape(-1, Cin) is the GEMM operand of dy's im2col columns."""
        xp, k = self.xp, self.k
        wflip = self.ws.scratch("conv-dx-weight", (k, k, self.cout, self.cin), dy.dtype)
        xp.copyto(wflip, self.gemm_weight[:, ::-1, ::-1, :].transpose(1, 2, 0, 3))
        col = im2col(self.ws, dy, k, 1, k - 1 - self.pad)
        gemm.matmul(col.reshape(-1, k * k * self.cout), wflip.reshape(-1, self.cin),
                    dx.reshape(-1, self.cin), self.ws.precision)


class BatchNorm(Layer):
    """Batch norm over N*H*W per channel, optionally fused with the ReLU that follows.

    Keeps no moving averages (the recipe's choice): the kernels write the last training
    batch's statistics straight into batch_mean/batch_var (and batch_count), and the saved
    inverse deviation for backward into inv_std; the gradients of gamma and beta go straight
    into their views of the flat gradient buffer. eval_mean/eval_var, which
    forward(train=False) normalizes with, are the same two buffers: engine.bn_sync
    overwrites them in place with the statistics of all ranks' last batches (a second sync
    gives the same values), and the next training step overwrites them again.
    """

    param_names = (("weight", False), ("bias", False))

    def __init__(self, name, ws, channels, relu, eps=1e-5):
        super().__init__(name, ws)
        self.channels, self.relu, self.eps = channels, relu, eps
        self.batch_count = 0
        self._saved = None
        self._y = None

    def param_shapes(self):
        return {"weight": (self.channels,), "bias": (self.channels,)}

    def bind(self, layout, params, grads, ready, gemm_params=None):
        super().bind(layout, params, grads, ready)
        xp, dt = self.xp, params.dtype
        self.batch_mean = xp.zeros(self.channels, dt)
        self.batch_var = xp.ones(self.channels, dt)
        self.inv_std = xp.ones(self.channels, dt)
        self.eval_mean, self.eval_var = self.batch_mean, self.batch_var

    def forward(self, x, train, residual=None):
        """relu(bn(x)) (without the ReLU unless self.relu); with `residual` (the BN that ends
        a residual block): relu(bn(x) + residual), the block's sum in the same pass."""
        x2d = x.reshape(-1, self.channels)
        r2d = None if residual is None else residual.reshape(x2d.shape)
        # The last output is offered as this one's buffer: reused when the implementation
        # writes into `out`, simply dropped when it allocates its own.
        out = self._y if self._y is not None and self._y.shape == x2d.shape and self._y.dtype == x.dtype else None
        if not train:
            y = batchnorm.bn_infer_forward(x2d, self.weight, self.bias, self.eval_mean, self.eval_var,
                                           self.eps, self.relu, out=out, residual=r2d, team=self.ws.team)
            self._saved, self._y = None, y
            return y.reshape(x.shape)
        stats = (self.batch_mean, self.batch_var, self.inv_std)
        y, mean, _, inv_std = batchnorm.bn_train_forward(x2d, self.weight, self.bias, self.eps, self.relu,
                                                         out=out, stats_out=stats, residual=r2d,
                                                         team=self.ws.team)
        self._y = y
        self.batch_count = x2d.shape[0]
        self._saved = (x2d, y, mean, inv_std)
        return y.reshape(x.shape)

    def backward(self, dy, consume=True, gate_by=None, pre_gated=False):
        """dx, in place over dy when `consume`, else in a new buffer (dy left intact).

        The two BNs that see a residual block's output gradient (the last and the
        shortcut's): the first to run takes `gate_by`, the block's output, and leaves the
        block's ReLU gradient dy * (gate_by > 0) in dy (what the shortcut receives) while
        using it; a later one takes `pre_gated`: dy is that gradient already, no mask."""
        if self._saved is None:
            raise RuntimeError(f"{self.name}: backward without a forward(train=True)")
        x2d, y2d, mean, inv_std = self._saved
        dy2d = dy.reshape(-1, self.channels)
        gate = gate_by is not None
        if gate and consume:
            raise ValueError(f"{self.name}: gate_by leaves the gated gradient in dy; it cannot also be consumed")
        out = dy2d if consume else self.ws.take(dy2d.shape, dy.dtype)
        mask = gate_by.reshape(dy2d.shape) if gate else y2d
        relu = self.relu and not gate and not pre_gated
        dx, _, _ = batchnorm.bn_backward(dy2d, x2d, mask, self.weight, mean, inv_std, relu, out=out,
                                         grads_out=(self.dweight, self.dbias), gate=gate, team=self.ws.team)
        self.ready(self)
        if dx is not out:       # an implementation that ignored `out`: out (dy itself when
            self.ws.give(out)   # consumed) goes back to the free list
        self._saved = None
        return dx.reshape(dy.shape)


class MaxPool(Layer):
    """Max pool with padding that never wins (torchvision's 3x3, stride 2, padding 1).
    Ties go to the first position in (kh, kw) order, as in PyTorch.

    float32 NumPy arrays go through engine.hostmath's C loops: one pass over the input each
    way, the argmax found again in backward from the kept input (at 112x112x64, batch 8:
    forward 15.7 -> 2.6 ms, backward 43.6 -> 6.6 ms). float32 and bfloat16 CuPy arrays take
    one fused kernel launch each way (kernels/maxpool.cu, same rules; backward a
    gather summing in float32). Elsewhere (float64, bfloat16 NumPy) it works on the K*K
    shifted strided views of the -inf-padded input, one elementwise pass each, rather than
    on an im2col patch array: that would be K*K times the input's size, written and read
    again, for a reduction that needs no GEMM."""

    def __init__(self, name, ws, k=3, stride=2, pad=1):
        super().__init__(name, ws)
        self.k, self.stride, self.pad = k, stride, pad
        self._x = None

    def _windows(self, x):
        """(kh, kw, view of the padded input under that kernel position) for every position."""
        n, h, w, c = x.shape
        k, s = self.k, self.stride
        ho, wo = out_size(h, k, s, self.pad), out_size(w, k, s, self.pad)
        xpad = padded(self.ws, x, self.pad, pad_value=-np.inf)
        return ((kh, kw, xpad[:, kh:kh + s * (ho - 1) + 1:s, kw:kw + s * (wo - 1) + 1:s, :])
                for kh in range(k) for kw in range(k))

    def forward(self, x, train):
        self._x = x if train else None
        n, h, w, c = x.shape
        k, s, p = self.k, self.stride, self.pad
        y = self._output((n, out_size(h, k, s, p), out_size(w, k, s, p), c), x.dtype)
        if (host := host_math(x, y)) is not None:     # one C pass, not K*K
            return host.maxpool_forward(x, y, k, s, p, self.ws.team.map)
        if (fused := fused_kernels(x, y)) is not None:     # one kernel launch
            return fused.maxpool_forward(x, y, k, s, p)
        windows = list(self._windows(x))

        def pool(lo, hi):
            self.xp.copyto(y[lo:hi], windows[0][2][lo:hi])
            for _, _, win in windows[1:]:
                self.xp.maximum(y[lo:hi], win[lo:hi], out=y[lo:hi])
        self.ws.team.map(pool, y.shape[0], size=x.size)
        return y

    def backward(self, dy):
        """Routes each output gradient to the first position of its window that holds the
        maximum, found again from the kept input (nothing stored in forward): one pass per
        window position, each claiming the windows not claimed yet."""
        xp, x, ws = self.xp, self._x, self.ws
        dx = ws.take(x.shape, x.dtype)
        host, fused = host_math(x, dy), fused_kernels(x, dy, dx)
        if host is not None or fused is not None:    # C loops, or one kernel launch (a gather)
            if host is not None:
                host.maxpool_backward(x, dy, dx, self.k, self.stride, self.pad, ws.team.map)
            else:
                fused.maxpool_backward(x, dy, dx, self.k, self.stride, self.pad)
            ws.give(dy)
            self._x = None
            return dx
        y = self._out
        hit = ws.scratch("maxpool-hit", y.shape, bool)
        unclaimed = ws.scratch("maxpool-unclaimed", y.shape, bool)
        routed = ws.scratch("maxpool-routed", y.shape, dy.dtype)
        windows = list(self._windows(x))
        _, h, w, _ = x.shape
        s, p = self.stride, self.pad

        def route(lo, hi):
            unclaimed[lo:hi].fill(True)
            dx[lo:hi].fill(0)
            for kh, kw, win in windows:
                xp.equal(win[lo:hi], y[lo:hi], out=hit[lo:hi])
                hit[lo:hi] &= unclaimed[lo:hi]
                xp.greater(unclaimed[lo:hi], hit[lo:hi], out=unclaimed[lo:hi])    # unclaimed and not hit
                xp.multiply(dy[lo:hi], hit[lo:hi], out=routed[lo:hi])
                oh0, nh, ih0 = clipped(kh, s, p, h, y.shape[1])
                ow0, nw, iw0 = clipped(kw, s, p, w, y.shape[2])
                if nh and nw:              # an offset that sees only padding holds no max
                    dx[lo:hi, ih0:ih0 + s * (nh - 1) + 1:s, iw0:iw0 + s * (nw - 1) + 1:s, :] += \
                        routed[lo:hi, oh0:oh0 + nh, ow0:ow0 + nw, :]
        ws.team.map(route, x.shape[0], size=x.size)
        ws.give(dy)
        self._x = None
        return dx


class GlobalAvgPool(Layer):
    """Mean over H and W. The features it hands the fc are float32 in every precision mode
    (bfloat16 activations are summed in float32), and its input gradient has the dtype of
    its input."""

    def forward(self, x, train):
        self._shape, self._dtype = x.shape, x.dtype
        return x.mean(axis=(1, 2), dtype=np.float64 if x.dtype == np.float64 else np.float32)

    def backward(self, dy):
        n, h, w, c = self._shape
        dx = self.ws.take(self._shape, self._dtype)
        dx[...] = (dy / (h * w))[:, None, None, :]
        self.ws.give(dy)
        return dx


class Linear(Layer):
    """The fc: float32 (float64) features, weights and logits in every precision mode; its
    GEMMs are 0.1% of ResNet-50's FLOPs, and the loss wants float32 logits. In bf16 mode it
    multiplies on TF32 tensor cores."""

    param_names = (("weight", True), ("bias", False))
    GEMM_PRECISION = {"fp32": "fp32", "tf32": "tf32", "bf16": "tf32"}

    def __init__(self, name, ws, fin, fout):
        super().__init__(name, ws)
        self.fin, self.fout = fin, fout
        self._x = None

    def param_shapes(self):
        return {"weight": (self.fin, self.fout), "bias": (self.fout,)}

    def forward(self, x, train):
        y = self.xp.empty((x.shape[0], self.fout), x.dtype)
        gemm.matmul(x, self.weight, y, self.GEMM_PRECISION[self.ws.precision])
        y += self.bias
        self._x = x if train else None
        return y

    def backward(self, dy):
        xp, x = self.xp, self._x
        if x is None:
            raise RuntimeError(f"{self.name}: backward without a forward(train=True)")
        prec = self.GEMM_PRECISION[self.ws.precision]
        gemm.matmul(x.T, dy, self.dweight, prec)
        xp.sum(dy, axis=0, out=self.dbias)
        self.ready(self)            # dW is final; the weight is still read for dx below
        dx = self.ws.take(x.shape, x.dtype)
        gemm.matmul(dy, self.weight.T, dx, prec)
        self._x = None
        return dx
