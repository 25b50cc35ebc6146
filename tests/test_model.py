"""The whole network: ResNet-18 end to end against finite differences (float64), the flat
layout and grad_ready contract, batch-norm statistics, state_dict, input checks."""
import numpy as np
import pytest

from engine.backend import get_backend
from engine.loss import softmax_cross_entropy
from engine.model import build_model
from engine.torchvision_io import load_checkpoint, save_npz

CPU = get_backend("cpu")


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print("seed", seed)
    return np.random.default_rng(seed)


def _step(model, x, labels, grad_ready=None):
    logits = model.forward(x, train=True)
    loss, dlogits = softmax_cross_entropy(logits, labels, label_smoothing=0.1)
    model.backward(dlogits, grad_ready=grad_ready)
    return loss


@pytest.mark.slow
def test_resnet18_gradient_matches_finite_differences(rng):
    """Central differences in float64 of the whole network (ResNet-18, 32 px, batch 2):
    along one random direction inside each parameter tensor (every coordinate of every
    tensor takes part) and along single random coordinates; the analytic directional
    derivatives match norm-wise to 1e-5 (the floor set by kinks and rounding, see below)."""
    model = build_model("resnet18", 5, CPU, seed=int(rng.integers(1 << 30)), dtype=np.float64)
    # Random BN scales and shifts, so no gradient is trivially 0 or 1.
    for name, view in model.named_parameters().items():
        if view.ndim == 1 and not name.startswith("fc"):
            view[...] = rng.uniform(0.5, 1.5, view.shape) if name.endswith("weight") else rng.uniform(-0.3, 0.3, view.shape)
    x = rng.standard_normal((2, 32, 32, 3))
    labels = rng.integers(0, 5, 2)
    _step(model, x, labels)
    grads = model.grads.copy()

    directions = []
    for s in model.layout.slots:
        v = np.zeros(model.layout.total)
        v[s.offset:s.stop] = rng.standard_normal(s.size)
        directions.append(v / np.linalg.norm(v))
    for i in rng.integers(0, model.layout.total, 10):
        v = np.zeros(model.layout.total)
        v[i] = 1.0
        directions.append(v)
    # The loss is not smooth: along a direction, ReLU inputs and max-pool winners cross
    # their kinks, and the quotient's error grows with the kinks inside the step (with h);
    # the float64 forward's own rounding, amplified by batch norm over 2 images, grows as 1/h.
    # Measured norm-wise: h = 1e-7 gave 2.5e-7 to 3.7e-5 (the tail on directions through the
    # early layers, which move thousands of units), h = 1e-9 gave 4e-6 to 1e-5, h = 1e-8
    # gave 3.4e-7 to 8.1e-7 over five runs. Hence h = 1e-8 and a bound of 1e-5; every layer
    # alone is held to 1e-6 in test_layers.py, and a 1% error injected into one conv's
    # gradient (layer2.0.conv1) measured 9.6e-5 here.
    base, h = model.params.copy(), 1e-8
    loss = lambda p: (model.params.__setitem__(Ellipsis, p),
                      softmax_cross_entropy(model.forward(x, train=True), labels, 0.1)[0])[1]
    num = np.array([(loss(base + h * v) - loss(base - h * v)) / (2 * h) for v in directions])
    ana = np.array([grads @ v for v in directions])
    err = np.linalg.norm(ana - num) / np.linalg.norm(num)
    print("relative error", err)
    assert err < 1e-5, err


def test_grad_ready_tiles_the_flat_buffer_in_order(rng):
    model = build_model("resnet18", 3, CPU)
    calls = []
    _step(model, rng.standard_normal((2, 40, 36, 3)).astype(np.float32), [0, 2], lambda a, b: calls.append((a, b)))
    assert calls[0][0] == 0 and calls[-1][1] == model.layout.total
    assert all(prev[1] == cur[0] for prev, cur in zip(calls, calls[1:]))
    assert all(a < b for a, b in calls)
    # one call per layer with parameters: 21 BN, 20 conv, fc
    assert len(calls) == 20 + 20 + 1


def test_grad_ready_reports_only_final_gradients(rng):
    """When grad_ready(start, stop) fires, grads[start:stop] already hold their final
    values: nothing later in backward writes there again."""
    model = build_model("resnet18", 4, CPU)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    snapshots = []
    _step(model, x, [1, 3], lambda a, b: snapshots.append((a, b, model.grads[a:b].copy())))
    for a, b, snap in snapshots:
        np.testing.assert_array_equal(model.grads[a:b], snap)


def test_a_reported_range_is_done_with_its_parameters_by_the_next_report(rng):
    """What the reducer's early_update relies on: a range may be updated from the next
    grad_ready call on. Poisoning, at each call, the range of the PREVIOUS call (and the
    last one after backward) with NaN leaves every gradient, float64, bit for bit as a plain
    backward computes it; poisoning the range of the current call does not (a layer reports
    before its input gradient, which reads its weights: the earlier launch is the point)."""
    model = build_model("resnet18", 4, CPU, seed=int(rng.integers(1 << 30)), dtype=np.float64)
    x = rng.standard_normal((2, 32, 32, 3))
    labels = rng.integers(0, 4, 2)
    _step(model, x, labels)
    plain = model.grads.copy()

    def poisoning(lag):
        reported = []

        def grad_ready(a, b):
            reported.append((a, b))
            if len(reported) > lag:
                pa, pb = reported[-1 - lag]
                model.params[pa:pb] = np.nan
        return grad_ready
    _step(model, x, labels, poisoning(lag=1))
    assert np.isfinite(model.grads).all()
    np.testing.assert_array_equal(model.grads, plain)
    model = build_model("resnet18", 4, CPU, seed=int(rng.integers(1 << 30)), dtype=np.float64)
    with np.errstate(invalid="ignore"):
        _step(model, x, labels, poisoning(lag=0))
    assert np.isnan(model.grads).any()


class _InstantComm:
    """One rank whose collectives are complete when they return (a sum over one rank is
    the buffer itself), so the reducer may update a bucket inside the grad_ready call that
    launched it."""

    rank, size = 0, 1

    class _Work:
        def wait(self):
            pass

        def done(self):
            return True

    def allreduce_async(self, buf, op="sum"):
        return self._Work()


def _reducer_step(seed, x, labels, optimizer, coef, mode):
    """One ResNet-18 step through a Reducer with one bucket per layer, updating per bucket
    after backward (mode "normal"), inside backward ("early") or once after it ("once");
    returns the parameters after it and, per update, its range and how many layers backward
    had reported by then."""
    from engine.optimizer import make_optimizer
    from engine.reducer import Reducer
    model = build_model("resnet18", 4, CPU, seed=seed)
    opt = make_optimizer(optimizer, model.params, model.layout, CPU)
    reducer = Reducer(model.layout, model.grads, _InstantComm(), bucket_mb=0, early_update=mode == "early",
                      update_once=mode == "once")
    reported, updated_after = [], []

    def grad_ready(a, b):
        reported.append((a, b))
        reducer.grad_ready(a, b)

    def update(a, b):
        updated_after.append((a, b, len(reported)))
        opt.update(reducer.reduced, a, b, coef=coef)
    reducer.prepare(update)
    _step(model, x, labels, grad_ready)
    reducer.finish()
    return model.params.copy(), updated_after


def _reducer_inputs(rng, optimizer):
    """mode, eta -> _reducer_step's result for one random batch, model seed and optimizer."""
    from engine.schedule import Coefficients
    seed = int(rng.integers(1 << 30))
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 2)
    return lambda mode, eta=0.5: _reducer_step(seed, x, labels, optimizer, Coefficients(eta=eta, a_sgd=0.5, a_rms=0.01),
                                               mode)


@pytest.mark.parametrize("optimizer", ["sgd", "hybrid"])
def test_early_update_step_equals_a_normal_step(rng, optimizer):
    """ResNet-18, one bucket per layer, works that complete at once: the parameters after
    a step whose updates run inside backward equal, bit for bit, those after a step that
    updates once backward is over (float32: the reducer reduces float32 gradients). Each
    bucket is updated at the first report after the one that launched it."""
    step = _reducer_inputs(rng, optimizer)
    normal, _ = step("normal")
    early, updated_after = step("early")
    layers = 20 + 20 + 1
    # fc at the 2nd report, conv1 in finish
    assert [n for _, _, n in updated_after] == list(range(2, layers + 1)) + [layers]
    assert np.isfinite(early).all()
    np.testing.assert_array_equal(early, normal)


@pytest.mark.parametrize("optimizer", ["sgd", "hybrid"])
def test_update_once_step_equals_per_bucket_updates(rng, optimizer):
    """The GPU job's update_once: ONE update over the whole flat buffer after backward
    (not one per bucket) gives, bit for bit, the parameters of per-bucket updates (the
    update is elementwise: no range split changes a bit)."""
    step = _reducer_inputs(rng, optimizer)
    per_bucket, updates = step("normal")
    once, updated = step("once")
    total = updates[-1][1]
    assert len(updates) == 20 + 20 + 1 and updated == [(0, total, 20 + 20 + 1)]
    assert np.isfinite(once).all() and not np.array_equal(once, step("once", eta=0.0)[0])
    np.testing.assert_array_equal(once, per_bucket)


def test_update_once_excludes_early_update():
    from engine.reducer import Reducer
    model = build_model("resnet18", 4, CPU)
    with pytest.raises(ValueError, match="exclude each other"):
        Reducer(model.layout, model.grads, _InstantComm(), early_update=True, update_once=True)


def test_layout_order_decay_and_views():
    model = build_model("resnet50", 1000, CPU)
    names = [s.name for s in model.layout.slots]
    assert names[:2] == ["fc.weight", "fc.bias"]
    assert names[2:6] == ["layer4.2.bn3.weight", "layer4.2.bn3.bias", "layer4.2.conv3.weight", "layer4.2.bn2.weight"]
    assert names.index("layer1.0.downsample.1.weight") < names.index("layer1.0.bn3.weight")
    assert names[-3:] == ["bn1.weight", "bn1.bias", "conv1.weight"]
    for s in model.layout.slots:
        assert s.decay == (s.name.endswith("weight") and len(s.shape) in (2, 4)), s.name
    params, grads = model.named_parameters(), model.named_gradients()
    assert params["layer2.0.conv2.weight"].shape == (128, 3, 3, 128)      # OHWI
    assert np.shares_memory(params["fc.weight"], model.params)
    assert np.shares_memory(grads["conv1.weight"], model.grads)
    assert model.params.dtype == np.float32 and model.params.size == model.layout.total


@pytest.mark.parametrize("arch,count", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                        ("resnet50", 25_557_032), ("resnet101", 44_549_160)])
def test_parameter_counts_match_torchvision(arch, count):
    model = build_model(arch, 1000, CPU)
    assert sum(s.size for s in model.layout.slots) == count


def test_backward_overwrites_gradients(rng):
    model = build_model("resnet18", 3, CPU)
    x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)   # layer4 maps 2x2: every tap used
    _step(model, x, [0, 1])
    first = model.grads.copy()
    _step(model, x, [0, 1])
    np.testing.assert_array_equal(model.grads, first)
    assert np.count_nonzero(first) > 0.8 * sum(s.size for s in model.layout.slots)


def test_batchnorm_statistics_and_eval_mode(rng):
    model = build_model("resnet18", 3, CPU, dtype=np.float64)
    x = rng.standard_normal((3, 32, 32, 3))
    model.forward(x, train=True)
    stem = model.batchnorms[0]
    assert stem.name == "bn1" and stem.batch_count == 3 * 16 * 16
    conv_out = stem._saved[0]
    assert np.allclose(stem.batch_mean, conv_out.mean(0), rtol=1e-12, atol=1e-12)
    assert np.allclose(stem.batch_var, conv_out.var(0), rtol=1e-12, atol=1e-12)
    for bn in model.batchnorms:
        np.testing.assert_array_equal(bn.eval_mean, bn.batch_mean)
        np.testing.assert_array_equal(bn.eval_var, bn.batch_var)
    # eval with the batch's own statistics reproduces train-mode logits
    train_logits = model.forward(x, train=True).copy()
    eval_logits = model.forward(x, train=False)
    assert np.allclose(eval_logits, train_logits, rtol=1e-9, atol=1e-9)
    # changing the eval statistics changes eval, not training
    for bn in model.batchnorms:
        bn.eval_var *= 4
    assert not np.allclose(model.forward(x, train=False), train_logits, rtol=1e-2, atol=1e-2)
    assert np.allclose(model.forward(x, train=True), train_logits, rtol=1e-12, atol=1e-12)


def _block_inputs_and_outputs(model, x):
    """(input, output) of each residual block in one training forward."""
    seen = []
    for block in model.blocks:
        def recorded(h, train, _forward=block.forward):
            y = _forward(h.copy(), train)
            seen.append((h.copy(), y.copy()))
            return y
        block.forward = recorded
    model.forward(x, train=True)
    return seen


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual_makes_every_block_start_as_identity(rng, zero_init):
    """With zero_init_residual, every block without a downsample passes its input through
    unchanged (relu(0 + x) with x >= 0); without it, none does."""
    model = build_model("resnet50", 4, CPU, zero_init_residual=zero_init)
    params = model.named_parameters()
    assert all(np.any(params[f"{block.last_bn.name}.weight"]) != zero_init for block in model.blocks)
    assert np.all(params["layer1.0.bn2.weight"] != 0)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    plain = [not block.downsample for block in model.blocks]
    identity = [np.array_equal(h, y) for h, y in _block_inputs_and_outputs(model, x)]
    assert sum(plain) > 0
    assert [same for same, p in zip(identity, plain) if p] == [zero_init] * sum(plain)


def test_state_dict_round_trip_through_npz(tmp_path, rng):
    src = build_model("resnet18", 6, CPU, seed=1)
    x = rng.standard_normal((2, 33, 45, 3)).astype(np.float32)
    src.forward(x, train=True)                # sets eval statistics
    expected = src.forward(x, train=False).copy()
    state = src.state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["fc.weight"].shape == (6, 512)
    assert state["layer2.0.downsample.1.running_var"].shape == (128,)
    path = tmp_path / "r18.npz"
    save_npz(src, path)
    dst = build_model("resnet18", 6, CPU, seed=2)
    dst.load_state_dict(load_checkpoint(path))
    np.testing.assert_array_equal(dst.params, src.params)
    np.testing.assert_array_equal(dst.forward(x, train=False), expected)


def test_bad_state_dict_and_inputs_are_refused(rng):
    model = build_model("resnet18", 6, CPU)
    state = model.state_dict()
    with pytest.raises(KeyError, match="missing"):
        model.load_state_dict({k: v for k, v in state.items() if k != "fc.bias"})
    with pytest.raises(ValueError, match="fc.weight"):
        build_model("resnet18", 7, CPU).load_state_dict(state)
    with pytest.raises(ValueError, match="at least 32 px"):
        model.forward(np.zeros((1, 31, 40, 3), np.float32), train=True)
    with pytest.raises(ValueError, match="3 channels"):
        model.forward(np.zeros((1, 32, 32, 1), np.float32), train=True)
    with pytest.raises(TypeError, match="float64"):
        model.forward(np.zeros((1, 32, 32, 3)), train=True)
    with pytest.raises(RuntimeError, match="forward"):
        build_model("resnet18", 2, CPU).backward(np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("resnet42", 2, CPU)
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        load_checkpoint("nowhere.npz")


@pytest.mark.gpu
def test_gpu_step_equals_cpu_step(rng):
    """The same source on CuPy: logits and every gradient equal NumPy's (float64, so
    cuBLAS and OpenBLAS summation orders are the only difference)."""
    gpu = get_backend("gpu")
    x = rng.standard_normal((2, 64, 64, 3))
    labels = np.array([1, 4])
    results = []
    for be in (CPU, gpu):
        model = build_model("resnet50", 5, be, seed=7, dtype=np.float64)
        calls = []
        loss = _step(model, be.asarray(x), be.asarray(labels), lambda a, b: calls.append((a, b)))
        results.append((loss, be.asnumpy(model.grads), calls))
    (loss_c, grads_c, calls_c), (loss_g, grads_g, calls_g) = results
    assert abs(loss_c - loss_g) < 1e-10 * abs(loss_c)
    assert calls_c == calls_g
    assert np.linalg.norm(grads_g - grads_c) < 1e-9 * np.linalg.norm(grads_c)


def test_conv_weights_are_ohwi_and_torchvision_io_round_trips(tmp_path):
    """Every conv slot is (Cout, KH, KW, Cin) (cuDNN's KRSC for NHWC); state_dict() gives
    torchvision's OIHW, element by element, and loading it back restores every parameter."""
    from engine.layers import Conv2d
    src = build_model("resnet18", 6, CPU, seed=1)
    convs = [src.conv1] + [l for b in src.blocks for l in b.main + b.downsample if isinstance(l, Conv2d)]
    assert len(convs) == 20
    params = src.named_parameters()
    for c in convs:
        shape = (c.cout, c.k, c.k, c.cin)
        assert src.layout.by_name[f"{c.name}.weight"].shape == shape == c.weight.shape, c.name
        assert c.dweight.shape == shape and c.gemm_weight.shape == shape
    assert params["layer2.0.downsample.0.weight"].shape == (128, 1, 1, 64)
    state = src.state_dict()
    w, t = params["conv1.weight"], state["conv1.weight"]
    assert w.shape == (64, 7, 7, 3) and t.shape == (64, 3, 7, 7)
    for o, i, kh, kw in [(0, 0, 0, 0), (5, 2, 6, 1), (63, 1, 3, 4)]:
        assert t[o, i, kh, kw] == w[o, kh, kw, i]
    for c in convs:
        np.testing.assert_array_equal(state[f"{c.name}.weight"], params[f"{c.name}.weight"].transpose(0, 3, 1, 2))
    dst = build_model("resnet18", 6, CPU, seed=2)
    dst.load_state_dict(state)
    np.testing.assert_array_equal(dst.params, src.params)
    back = dst.state_dict()
    assert list(back) == list(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
