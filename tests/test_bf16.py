"""--precision bf16 on the CPU twin (ml_dtypes.bfloat16): a training step against float64.

The bound is derived, not guessed: bf16 rounds with a relative error of at most
u16 = 2^-9, float32 with u32 = 2^-24, and both runs take their roundings at the same places
of the same network. So the float32 step's error against float64, divided by u32, measures
this network's amplification of rounding errors, and the bf16 step may err by that
amplification times u16, times 4 for the bf16 path's extra roundings in forward (the
activation after every conv, BN and residual sum), times 8 for a gradient (backward also
rounds every activation gradient). The bf16 error must also be far ABOVE the float32 one,
or the rounding never happened.

The amplification is only meaningful where float32 and float64 take the same branches: a
pre-activation within float32's rounding of zero makes ReLU's mask differ, and one such flip
moves the gradients by 1e-3 or more (about one draw in four here). Such a draw does not
measure rounding, so the float32/float64 pair is redrawn until no flip shows (float32 error
below 1e-4, against ~3e-6 without a flip); eight draws all flipping would be a real fault.
"""
import ml_dtypes
import numpy as np

from engine.backend import get_backend
from engine.loss import softmax_cross_entropy
from engine.model import build_model
from engine.optimizer import make_optimizer
from engine.schedule import Coefficients
from numerics import norm_rel_err

BF16 = np.dtype(ml_dtypes.bfloat16)
U16, U32 = 2.0 ** -9, 2.0 ** -24


def _step(x, labels, precision, dtype=np.float32):
    model = build_model("resnet18", 10, get_backend("cpu"), seed=5, dtype=dtype, precision=precision)
    logits = model.forward(x.astype(model.input_dtype), train=True)
    _, dlogits = softmax_cross_entropy(logits, labels)
    model.backward(dlogits)
    return model, logits


def _draw_without_branch_flips(rng, draws=8):
    """Input, labels and the float64 and float32 steps on it, for a draw where both took
    the same ReLU branches (see the module's docstring)."""
    errors = []
    for _ in range(draws):
        # Images exact in bf16, so all three runs see the same input.
        x = rng.standard_normal((8, 64, 64, 3)).astype(BF16).astype(np.float64)
        labels = rng.integers(0, 10, 8)
        ref, ref_logits = _step(x, labels, "fp32", np.float64)
        f32, f32_logits = _step(x, labels, "fp32")
        errors.append(norm_rel_err(f32.grads, ref.grads))
        if errors[-1] < 1e-4:
            return x, labels, (ref, ref_logits), (f32, f32_logits)
    raise AssertionError(f"float32 gradients off float64 by {errors} in all {draws} draws")


def test_bf16_step_against_float64_within_the_derived_bound():
    x, labels, (ref, ref_logits), (f32, f32_logits) = _draw_without_branch_flips(np.random.default_rng())
    b16, b16_logits = _step(x, labels, "bf16")

    # The bf16 path really ran in bf16: activations, the GEMMs' weight copy; float32 elsewhere.
    assert b16.conv1._out.dtype == BF16 and b16.blocks[-1]._y.dtype == BF16 if b16.blocks[-1]._y is not None \
        else b16.conv1._out.dtype == BF16
    assert b16_logits.dtype == np.float32 and b16.grads.dtype == np.float32 and b16.params.dtype == np.float32
    np.testing.assert_array_equal(b16.params_lp.view(np.uint16), b16.params.astype(BF16).view(np.uint16))
    assert f32.params_lp is None

    for name, factor, got32, got16, want in [
        ("logits", 4, f32_logits, b16_logits, ref_logits),
        ("fc.weight", 8, f32.named_gradients()["fc.weight"], b16.named_gradients()["fc.weight"],
         ref.named_gradients()["fc.weight"]),
        ("all gradients", 8, f32.grads, b16.grads, ref.grads),
    ]:
        e32, e16 = norm_rel_err(got32, want), norm_rel_err(got16, want)
        amplification = e32 / U32
        assert e32 < 1e-4, (name, e32)
        assert e16 <= factor * amplification * U16, (name, e16, amplification)
        assert e16 > 30 * e32, (name, e16, e32)       # bf16 rounding happened


def test_bf16_optimizer_keeps_the_working_copy_rounded():
    """After an update the convs multiply with bf16(params), rounded to nearest even."""
    rng = np.random.default_rng()
    be = get_backend("cpu")
    model = build_model("resnet18", 10, be, precision="bf16")
    opt = make_optimizer("hybrid", model.params, model.layout, be, weight_copy=model.params_lp)
    x = rng.standard_normal((2, 32, 32, 3)).astype(BF16)
    _, dlogits = softmax_cross_entropy(model.forward(x, train=True), rng.integers(0, 10, 2))
    model.backward(dlogits)
    before = model.params.copy()
    opt.step(model.grads, coef=Coefficients(eta=0.1, a_sgd=0.5, a_rms=1e-3))
    assert not np.array_equal(before, model.params)
    np.testing.assert_array_equal(model.params_lp.view(np.uint16), model.params.astype(BF16).view(np.uint16))
    np.testing.assert_array_equal(model.conv1.gemm_weight, model.params_lp[model.layout.by_name["conv1.weight"].offset:
                                  model.layout.by_name["conv1.weight"].stop].reshape(model.conv1.gemm_weight.shape))
