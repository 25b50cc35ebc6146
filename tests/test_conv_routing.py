"""--conv cudnn through the real Trainer: the stand-in CuPy of tests/gpu_standins.py (its
arrays are host memory at real addresses, the fused kernels emulated) and the stand-in
libcudnn of tests/cudnn_stub.c, which convolves on host memory. Each case runs in a fresh
interpreter, since engine.cudnn opens its library once per process."""
import pytest

from cudnn_helpers import run_case, stub  # noqa: F401  (stub: the fixture)

# 8 images: at 32 px ResNet-18's last stage is 1x1, and its batch norm over 2 rows would
# turn the 1e-7 differences of two float32 summation orders into 1e-3.
ARGV = ["--arch", "resnet18", "--image-size", "32", "--batch-per-rank", "8"]


def _train(argv, steps=2, broken=None):
    """(trainer, losses) of `steps` steps on the stand-ins; `broken`: a conv shape whose
    cuDNN forward is made wrong by 1%, as a bad descriptor would make it."""
    import gpu_standins
    from engine import cudnn, cudnn_conv
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cudnn_conv, "gpu_handle_factory", lambda stream=None: lambda: cudnn.Handle(0x5150))
        if broken is not None:
            forward = cudnn_conv.CudnnConvolutions.forward

            def wrong(self, x, w, y, stride, pad):
                out = forward(self, x, w, y, stride, pad)
                if tuple(x.shape) + (w.shape[0],) == broken:
                    y *= 1.01
                return out
            mp.setattr(cudnn_conv.CudnnConvolutions, "forward", wrong)
        trainer = gpu_standins.trainer_on_standins(mp, ARGV + argv, gpu_standins.emulated_launch)
        try:
            losses = [loss for _, _, loss in gpu_standins.run_steps(trainer, steps, read_loss=True)]
        finally:
            trainer.close()
    return trainer, losses


def _checked_convs(routed, arch="resnet18", size=32):
    """The one CudnnConvolutions of a routed run, after checking that every distinct shape
    was self-checked once and searched once, and none fell back."""
    from cudnn_helpers import resnet_convs
    convs = routed.model.convs[0].cudnn[0]
    assert convs.search == "heuristic" and all(conv.cudnn[0] is convs for conv in routed.model.convs)
    distinct = {shape[1:] for shape in resnet_convs(arch, size)}      # (h, w, cin, cout, k, s, p)
    assert len(convs._admitted) == convs.searches == len(distinct) and not convs.fallback
    return convs


def case_cudnn_trains_as_im2col():
    """fp32: one step through cuDNN equals the im2col step within float32 roundoff of two
    summation orders."""
    import numpy as np
    import gpu_standins
    # One step: the hybrid update's RMSprop term divides by each gradient's running size,
    # so the next step's gradients would compare the update's amplification, not the convs.
    eager, ref = _train([], steps=1)
    routed, got = _train(["--conv", "cudnn", "--cudnn-search", "heuristic"], steps=1)
    convs = _checked_convs(routed)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    g, h = gpu_standins._np(routed.model.grads), gpu_standins._np(eager.model.grads)
    assert np.linalg.norm(g - h) <= 1e-3 * np.linalg.norm(h), np.linalg.norm(g - h) / np.linalg.norm(h)
    print("ok", convs.searches)


def case_cudnn_bf16_is_as_close_to_fp32_as_im2col_bf16():
    """bf16: each rounding of an activation moves a batch norm over 8 rows by ~2^-9 of its
    spread, so one bf16 step's gradients differ from the fp32 step's by tens of percent
    (measured 0.44 norm-wise at these shapes) whichever way the convs run; cuDNN must be no
    further from fp32 than im2col is, per weight tensor (a wrong or unwidened dW errs by
    1 or more), with its dW rounded to bf16 once more."""
    import numpy as np
    import gpu_standins
    fp32, _ = _train([], steps=1)
    eager, _ = _train(["--precision", "bf16"], steps=1)
    routed, _ = _train(["--precision", "bf16", "--conv", "cudnn", "--cudnn-search", "heuristic"], steps=1)
    convs = _checked_convs(routed)
    grads = [gpu_standins._np(t.model.grads) for t in (fp32, eager, routed)]
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    worst = 0.0
    for slot in fp32.model.layout.slots:
        ref, im2col, cudnn = (g[slot.offset:slot.stop] for g in grads)
        ratio = rel(cudnn, ref) / rel(im2col, ref)
        assert ratio < 1.5, (slot.name, rel(cudnn, ref), rel(im2col, ref))
        worst = max(worst, ratio)
    print("ok", convs.searches, f"worst ratio {worst:.2f}")


def case_a_wrong_shape_falls_back_with_one_warning():
    import io
    import contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        routed, _ = _train(["--conv", "cudnn"], steps=1, broken=(8, 8, 8, 64, 64))
    convs = routed.model.convs[0].cudnn[0]
    assert list(convs.fallback) and all(s[:5] == (8, 8, 8, 64, 64) for s in convs.fallback), convs.fallback
    warnings = [line for line in err.getvalue().splitlines() if "cuDNN self-check" in line]
    assert len(warnings) == 1 and "8x8x8x64" in warnings[0].replace(" ", ""), warnings
    print("ok")


def _case(stub, call):
    return run_case("test_conv_routing", call, stub)


@pytest.mark.slow
def test_a_cudnn_run_trains_as_the_im2col_run(stub):
    assert _case(stub, "case_cudnn_trains_as_im2col()").startswith("ok")


@pytest.mark.slow
def test_a_bf16_cudnn_run_is_as_close_to_fp32_as_the_im2col_run(stub):
    assert _case(stub, "case_cudnn_bf16_is_as_close_to_fp32_as_im2col_bf16()").startswith("ok")


@pytest.mark.slow
def test_a_conv_shape_that_fails_the_self_check_falls_back_with_one_warning(stub):
    assert _case(stub, "case_a_wrong_shape_falls_back_with_one_warning()").startswith("ok")


def test_conv_options_are_refused_where_they_cannot_run(capsys):
    from engine.train import parse_args
    for argv, says in ((["--device", "cpu", "--conv", "cudnn"], "--conv cudnn needs a GPU"),
                       (["--cudnn-workspace-mb", "-1"], "--cudnn-workspace-mb must be >= 0")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert says in capsys.readouterr().err


def test_conv_cudnn_on_a_job_that_found_no_gpu_is_an_error(tmp_path):
    """--device auto fell back to the CPU: --conv cudnn is refused, not quietly im2col."""
    from engine.backend import DeviceError
    from engine.train import Trainer, parse_args
    argv = ["--conv", "cudnn", "--runs-dir", str(tmp_path), "--no-checkpoint", "--watchdog", "0"]
    with pytest.raises(DeviceError, match="--conv cudnn needs a GPU"):
        Trainer(parse_args(argv))


def test_conv_notes_are_said_once_per_job_with_the_ranks_that_had_them(capsys):
    """Each rank self-checks its own convolutions; what falls back is gathered and said by
    rank 0 alone, one line per distinct note, naming its ranks (not a line per rank)."""
    import types
    from engine import train
    notes = {0: ["shape A fell back"], 1: ["shape A fell back", "shape B fell back"], 2: [], 3: ["shape A fell back"]}
    comm = types.SimpleNamespace(world=types.SimpleNamespace(allgather=lambda mine: [notes[r] for r in range(4)]))
    for rank in (0, 1):
        job = types.SimpleNamespace(args=types.SimpleNamespace(conv="cudnn"), rank=rank, world=4, comm=comm,
                                    _conv_notes=list(notes[rank]))
        train.Trainer._say_conv_notes(job)
        assert job._conv_notes == []
        err = capsys.readouterr().err.splitlines()
        if rank == 0:
            assert err == ["engine.train: shape A fell back (ranks 0,1,3)", "engine.train: shape B fell back (rank 1)"]
        else:
            assert err == []
    every = types.SimpleNamespace(world=types.SimpleNamespace(allgather=lambda mine: [["cuDNN did not load"]] * 4))
    train.Trainer._say_conv_notes(types.SimpleNamespace(args=types.SimpleNamespace(conv="auto"), rank=0, world=4,
                                                        comm=every, _conv_notes=["cuDNN did not load"]))
    assert capsys.readouterr().err == "engine.train: cuDNN did not load (every rank)\n"
