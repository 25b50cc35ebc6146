"""ResNet-50 against PyTorch's CPU build on the same weights and inputs.

Errors are norm-wise per tensor: |ours - ref| / |ref| (Frobenius norms). In float64 every
logit and gradient matches torch's to 1e-9. In float32 every logit and every parameter
gradient matches torch's float32 ones to 1e-4, on problems where the two forwards take the
same branch at every ReLU and max pool (see the float32 test). The reference network is
plain torch.nn (tests/torch_reference.py; torchvision is not a dependency).
"""
import numpy as np
import pytest
import torch        # a test dependency (pyproject's test extra), never skipped for lack of it

from engine.backend import get_backend
from engine.loss import softmax_cross_entropy
from engine.model import build_model
from torch_reference import TorchResNet, torch_twin
from engine.torchvision_io import _to_torchvision, load_checkpoint
from numerics import norm_rel_err

nn, F = torch.nn, torch.nn.functional

TOL = 1e-4


def _randomized_resnet50(seed, classes, dtype=np.float32, last_scale=(0.5, 1.5)):
    """Our ResNet-50 with every BN scale and shift drawn at random (not 1 and 0); the
    last BN of each residual branch draws its scale from `last_scale`."""
    model = build_model("resnet50", classes, get_backend("cpu"), seed=seed, dtype=dtype)
    last_bns = {block.last_bn.name for block in model.blocks}
    rng = np.random.default_rng(seed + 1)
    for name, view in model.named_parameters().items():
        layer, _, what = name.rpartition(".")
        if ".bn" in name or "downsample.1" in name or name.startswith("bn1"):
            scale = last_scale if layer in last_bns else (0.5, 1.5)
            view[...] = rng.uniform(*scale, view.shape) if what == "weight" else rng.uniform(-0.2, 0.2, view.shape)
    return model


def _ours(model, x, labels):
    logits = model.forward(x, train=True).copy()
    return logits, _ours_backward(model, logits, labels)


def _ours_backward(model, logits, labels):
    loss, dlogits = softmax_cross_entropy(logits, labels, label_smoothing=0.1)
    model.backward(dlogits)
    return loss, {k: _to_torchvision(k, v).copy() for k, v in model.named_gradients().items()}


def _torch(net, x, labels):
    net.train()
    logits = net(torch.from_numpy(x).permute(0, 3, 1, 2))
    return logits.detach().numpy(), _torch_backward(net, logits, labels)


def _torch_backward(net, logits, labels):
    loss = F.cross_entropy(logits, torch.from_numpy(labels), label_smoothing=0.1)
    loss.backward()
    return loss.item(), {k: p.grad.numpy() for k, p in net.named_parameters()}


def _problem(n=4, size=64):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    classes = 10
    x = rng.standard_normal((n, size, size, 3))
    return seed, classes, x, rng.integers(0, classes, n)


def test_resnet50_float64_logits_and_every_gradient_match_torch():
    """The same math as PyTorch tensor by tensor, in training and evaluation mode: in
    float64 nothing hides behind rounding."""
    seed, classes, x64, labels = _problem()
    model64 = _randomized_resnet50(seed, classes, np.float64)
    logits, (loss, grads) = _ours(model64, x64, labels)
    t_logits, (t_loss, truth) = _torch(torch_twin(model64, torch.float64), x64, labels)
    assert norm_rel_err(logits, t_logits) < 1e-10
    assert abs(loss - t_loss) < 1e-10 * abs(t_loss)
    assert set(grads) == set(truth)
    errors = {k: norm_rel_err(grads[k], truth[k]) for k in grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-9, (worst, errors[worst])
    # Evaluation mode: torch normalizes with running stats, which our export fills with
    # the statistics the last training batch left in eval_mean/eval_var.
    net = torch_twin(model64, torch.float64).eval()
    with torch.no_grad():
        t_eval = net(torch.from_numpy(x64).permute(0, 3, 1, 2)).numpy()
    assert norm_rel_err(model64.forward(x64, train=False), t_eval) < 1e-10


def _pool_winners(y):
    """Index in its 3x3/2 window (padding 1) of each max-pool output's maximum, -1 where the
    window is all zero (after the ReLU, the routing of those gradients does not matter)."""
    n, h, w, c = y.shape
    padded = np.full((n, h + 2, w + 2, c), -np.inf, y.dtype)
    padded[:, 1:-1, 1:-1] = y
    win = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))[:, ::2, ::2]
    win = win.reshape(*win.shape[:4], 9)
    return np.where(win.max(-1) > 0, win.argmax(-1), -1)


def _our_branches(model):
    """After a training forward: the sign of every ReLU input (NHWC order, flattened) by
    layer name, and the max-pool winners."""
    last = {b.last_bn for b in model.blocks}       # their ReLU acts on the block's sum
    signs = {bn.name: bn._y.ravel() > 0 for bn in model.batchnorms if bn.relu and bn not in last}
    signs.update({b.last_bn.name.rpartition(".")[0]: b._y.ravel() > 0 for b in model.blocks})
    stem = model.bn1._y.reshape(model.maxpool._x.shape)
    return signs, _pool_winners(stem)


def _torch_branches(net):
    """Forward hooks that record the same as _our_branches for a TorchResNet."""
    signs, pool = {}, {}
    nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
    # a BN followed by a ReLU (bn3 feeds the residual sum), and each block's output
    watched = {name for name, _ in net.named_modules()
               if name == "bn1" or (".bn" in name and not name.endswith(".bn3"))
               or (name.count(".") == 1 and name.startswith("layer"))}
    for name, module in net.named_modules():
        if name in watched:
            module.register_forward_hook(lambda m, i, o, name=name: signs.__setitem__(name, nhwc(o).ravel() > 0))
    net.bn1.register_forward_hook(lambda m, i, o: pool.__setitem__("winners", _pool_winners(np.maximum(nhwc(o), 0))))
    return signs, pool


def test_resnet50_float32_logits_and_every_gradient_match_torch():
    """float32: every logit and every parameter gradient within 1e-4 of torch's.

    The gradient of a ReLU network jumps where a ReLU input crosses zero (or a max-pool
    window changes its winner). Two float32 forwards differ by rounding, so on a random
    problem an input that lies within rounding distance of zero takes one branch in ours
    and the other in torch; a single such element moves every gradient below it by about
    1% (measured: torch's own float32 gradients are then 1-3% from its float64 ones, and
    6e-6 when no branch differs). The comparison is therefore made on a problem where
    both forwards took the same branch at every ReLU and every pool window: problems are
    drawn until one is. The last BN scale of each block is drawn from (0.1, 0.3), as in
    trained ResNets: with scales near 1 the forward's rounding error grows ~1.3x per block
    (1e-4 at the logits) and nearly every draw has a differing branch. At 48 px, batch 4,
    about 30% of the draws have none (16 draws; 6% at 64 px), so 40 draws all failing
    has odds below 1e-6."""
    for _ in range(40):
        seed, classes, x64, labels = _problem(size=48)
        x = x64.astype(np.float32)
        model = _randomized_resnet50(seed, classes, last_scale=(0.1, 0.3))
        net = torch_twin(model).train()
        t_signs, t_pool = _torch_branches(net)
        logits = model.forward(x, train=True).copy()
        t_logits = net(torch.from_numpy(x).permute(0, 3, 1, 2))
        signs, winners = _our_branches(model)
        assert set(signs) == set(t_signs) and len(signs) == 1 + 16 * 2 + 16
        differing = sum(int((signs[k] != t_signs[k]).sum()) for k in signs)
        differing += int((winners != t_pool["winners"]).sum())
        print(f"seed {seed}: {differing} ReLU inputs or pool windows took different branches")
        if differing == 0:
            break
    else:
        pytest.fail("40 draws in a row had a ReLU or pool branch that differs from torch's")
    assert norm_rel_err(logits, t_logits.detach().numpy()) < TOL
    loss, grads = _ours_backward(model, logits, labels)
    t_loss, t_grads = _torch_backward(net, t_logits, labels)
    assert abs(loss - t_loss) < TOL * abs(t_loss)
    assert set(grads) == set(t_grads)
    errors = {k: norm_rel_err(grads[k], t_grads[k]) for k in grads}
    worst = max(errors, key=errors.get)
    print(f"float32 gradients against torch: worst {errors[worst]:.2e} ({worst}), "
          f"median {np.median(list(errors.values())):.2e}")
    assert errors[worst] < TOL, (worst, errors[worst])


def test_checkpoint_from_torch_file_loads_and_round_trips(tmp_path):
    classes = 7
    net = TorchResNet("resnet50", classes)
    for m in net.modules():            # non-trivial BN statistics, as in a trained checkpoint
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)
    model = build_model("resnet50", classes, get_backend("cpu"), seed=3)
    model.load_state_dict(load_checkpoint(path))
    exported = model.state_dict()
    for name, tensor in net.state_dict().items():
        np.testing.assert_array_equal(exported[name], tensor.numpy(), err_msg=name)

    x = np.random.default_rng().standard_normal((2, 35, 41, 3)).astype(np.float32)  # odd sizes
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert norm_rel_err(model.forward(x, train=False), ref) < TOL
