"""Atomic checkpoint files: round trip, truncation, corruption and fallback, mismatch,
pruning by run identity, stale temporary files."""
import os

import numpy as np
import pytest

from engine import checkpoint as ck


def _arrays(rng):
    return {"params": rng.standard_normal(1000).astype(np.float32),
            "opt.momentum": rng.standard_normal(1000).astype(np.float32),
            "opt.step": np.asarray(17, np.int64)}


def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng()
    arrays = _arrays(rng)
    path = ck.path_for(str(tmp_path), 12)
    ck.save(path, arrays, {"arch": "resnet18", "epoch": 1, "step": 3})
    got, meta = ck.load(path)
    assert set(got) == set(arrays)
    for k in arrays:
        assert got[k].dtype == arrays[k].dtype and np.array_equal(got[k], arrays[k])
    assert meta["arch"] == "resnet18" and meta["step"] == 3
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    rng = np.random.default_rng()
    paths = {s: ck.path_for(str(tmp_path), s) for s in (10, 20, 30)}
    for s, p in paths.items():
        ck.save(p, _arrays(rng), {"step": s})
    _truncate(paths[30])
    _truncate(paths[20])            # the one before the newest is damaged too
    path, arrays, meta, skipped = ck.newest_intact(str(tmp_path))
    assert path == paths[10] and meta["step"] == 10 and set(arrays) == set(_arrays(rng))
    assert [paths[30] in str(e) and "truncated" in str(e) for e in skipped] == [True, False]
    assert paths[20] in str(skipped[1])
    _truncate(paths[10])
    with pytest.raises(ck.CheckpointError, match="no checkpoint there verifies") as e:
        ck.newest_intact(str(tmp_path))
    assert all(p in str(e.value) for p in paths.values())
    with pytest.raises(ck.CheckpointError, match="truncated"):     # a named file: no fallback
        ck.newest_intact(paths[30])


def test_flipped_bytes_are_detected(tmp_path):
    rng = np.random.default_rng()
    path = ck.path_for(str(tmp_path), 1)
    arrays = {"params": rng.standard_normal(4096).astype(np.float32)}
    ck.save(path, arrays, {})
    raw = bytearray(open(path, "rb").read())
    payload = arrays["params"].tobytes()
    at = bytes(raw).find(payload[:64]) + 1000     # inside the params array's data
    raw[at] ^= 0x40
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ck.CheckpointError, match=f"{path}.*corrupt"):
        ck.load(path)


def test_a_foreign_npz_is_not_a_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt-00000001.npz")
    np.savez(path, x=np.arange(3))
    with pytest.raises(ck.CheckpointError, match="not a checkpoint"):
        ck.load(path)


def test_mismatched_run_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ck.CheckpointError, match=r"arch='resnet50'.*arch='resnet18'"):
        ck.check_compatible("f.npz", {"arch": "resnet50", "global_batch": 64},
                            {"global_batch": 64, "arch": "resnet18"})
    ck.check_compatible("f.npz", {"arch": "resnet18"}, {"arch": "resnet18"})


def test_failed_write_keeps_previous_and_leaves_no_temp(tmp_path):
    rng = np.random.default_rng()
    good = ck.path_for(str(tmp_path), 1)
    ck.save(good, _arrays(rng), {"step": 1})

    class Unsaveable:
        def __array__(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ck.save(ck.path_for(str(tmp_path), 2), {"params": Unsaveable()}, {"step": 2})
    assert os.listdir(tmp_path) == [os.path.basename(good)]
    assert ck.load(good)[1]["step"] == 1


def test_prune_keeps_the_newest_of_this_run_only(tmp_path):
    mine, other = {"arch": "resnet18", "seed": 0}, {"arch": "resnet18", "seed": 1}
    for s in (3, 1, 2, 4):
        ck.save(ck.path_for(str(tmp_path), s), {"a": np.arange(s)}, dict(mine, step=s))
    for s in (40, 50):              # another run's newer checkpoints in the same folder
        ck.save(ck.path_for(str(tmp_path), s), {"a": np.arange(s)}, dict(other, step=s))
    (tmp_path / "ckpt-00000060.npz").write_bytes(b"not a checkpoint")
    ck.prune(str(tmp_path), keep=2, identity=mine)
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path))] == [
        "ckpt-00000003.npz", "ckpt-00000004.npz", "ckpt-00000040.npz", "ckpt-00000050.npz", "ckpt-00000060.npz"]
    assert ck.read_meta(ck.path_for(str(tmp_path), 40))["seed"] == 1
    assert ck.read_meta(str(tmp_path / "ckpt-00000060.npz")) is None
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ck.CheckpointError, match="without checkpoints"):
        ck.newest_intact(str(tmp_path / "empty"))


def test_stale_temporary_files_are_removed(tmp_path):
    ck.save(ck.path_for(str(tmp_path), 1), {"a": np.arange(3)}, {})
    (tmp_path / ".tmp-abc.npz").write_bytes(b"half a checkpoint")
    assert ck.remove_stale_temps(str(tmp_path)) == [str(tmp_path / ".tmp-abc.npz")]
    assert os.listdir(tmp_path) == ["ckpt-00000001.npz"]
    assert ck.remove_stale_temps(str(tmp_path / "missing")) == []


# ---- conv weights HWIO -> OHWI (issue 17) ------------------------------------------------------

def _trained_like(seed):
    """A ResNet-18 and a hybrid optimizer whose d and m hold arbitrary values."""
    from engine.backend import get_backend
    from engine.model import build_model
    from engine.optimizer import make_optimizer
    model = build_model("resnet18", 10, get_backend("cpu"), seed=seed)
    opt = make_optimizer("hybrid", model.params, model.layout)
    rng = np.random.default_rng(seed)
    for buf in opt.state.values():
        buf[...] = rng.standard_normal(buf.shape)
    for bn in model.batchnorms:
        bn.eval_mean[...] = rng.standard_normal(bn.channels)
        bn.eval_var[...] = rng.uniform(0.5, 2, bn.channels)
    return model, opt


def _write_hwio_checkpoint(path, model, opt, identity):
    """A checkpoint as the engine wrote it while conv weights were HWIO: each conv weight
    (torchvision OIHW) transposed to (KH, KW, Cin, Cout) in every flat array, the layout
    signature of that time, and no conv_weights entry in the header."""
    import hashlib
    import json
    state = model.state_dict()
    convs = {s.name for s in model.layout.slots if len(s.shape) == 4}

    def hwio(flat, oihw_of):
        out = flat.copy()
        for s in model.layout.slots:
            if s.name in convs:
                out[s.offset:s.stop] = oihw_of(s).transpose(2, 3, 1, 0).ravel()
        return out

    arrays = {"params": hwio(model.params, lambda s: state[s.name])}
    for name, buf in opt.state.items():     # d, m: as torchvision would lay out a weight
        arrays[f"optimizer.{name}"] = hwio(buf, lambda s: buf[s.offset:s.stop].reshape(s.shape).transpose(0, 3, 1, 2))
    for bn in model.batchnorms:
        arrays[f"bn.{bn.name}.eval_mean"] = bn.eval_mean.copy()
        arrays[f"bn.{bn.name}.eval_var"] = bn.eval_var.copy()
    old_shape = {s.name: (tuple(state[s.name].shape[2:]) + tuple(state[s.name].shape[1::-1])) if s.name in convs
                 else s.shape for s in model.layout.slots}
    old_sig = hashlib.sha256(";".join(f"{s.name}:{old_shape[s.name]}:{s.offset}"
                                      for s in model.layout.slots).encode()).hexdigest()
    opt_state = {k: v for k, v in opt.state_dict().items() if not hasattr(v, "dtype")}
    meta = dict(identity, layout=old_sig, global_step=3, epoch=0, step=3,
                optimizer_state=dict(opt_state, layout=old_sig), format=ck.FORMAT)
    np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    return old_sig


def test_an_hwio_checkpoint_is_converted_on_load(tmp_path):
    src, src_opt = _trained_like(1)
    identity = {"arch": "resnet18", "layout": src.layout.signature(), "seed": 0}
    path = ck.path_for(str(tmp_path), 3)
    old_sig = _write_hwio_checkpoint(path, src, src_opt, identity)
    assert old_sig == src.layout.hwio_signature() != src.layout.signature()

    # What engine.train does: choose and check, then load.
    found, _, meta, _ = ck.newest_intact(str(tmp_path))
    assert found == path
    with pytest.raises(ck.CheckpointError, match=r"HWIO \(KH, KW, Cin, Cout\) to OHWI \(Cout, KH, KW, Cin\)"):
        ck.check_compatible(path, meta, identity)                   # a caller that cannot convert
    ck.check_compatible(path, meta, identity, layout=src.layout)
    dst, dst_opt = _trained_like(2)
    arrays, meta = ck.load(path)
    said = []
    arrays, meta = ck.upgrade_conv_layout(path, arrays, meta, dst.layout, said.append)
    assert len(said) == 1 and "HWIO" in said[0] and "OHWI" in said[0] and path in said[0]
    assert meta["layout"] == dst.layout.signature() and meta["conv_weights"] == "OHWI"
    dst.params[...] = arrays["params"]
    opt = dict(meta["optimizer_state"])
    opt.update({k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")})
    dst_opt.load_state_dict(opt)
    np.testing.assert_array_equal(dst.params, src.params)
    for name in src_opt.state:
        np.testing.assert_array_equal(dst_opt.state[name], src_opt.state[name])
    for bn in src.batchnorms:
        np.testing.assert_array_equal(arrays[f"bn.{bn.name}.eval_mean"], bn.eval_mean)

    # Saved again, it is a checkpoint of the new layout: nothing more to convert.
    again = ck.path_for(str(tmp_path), 4)
    ck.save(again, arrays, {k: v for k, v in meta.items() if k != "format"})
    arrays2, meta2 = ck.load(again)
    assert meta2["conv_weights"] == "OHWI"
    ck.check_compatible(again, meta2, identity)
    said.clear()
    same = ck.upgrade_conv_layout(again, arrays2, meta2, dst.layout, said.append)
    assert same[0] is arrays2 and same[1] is meta2 and not said


def test_an_hwio_checkpoint_of_another_model_is_refused(tmp_path):
    from engine.backend import get_backend
    from engine.model import build_model
    src, src_opt = _trained_like(1)
    identity = {"arch": "resnet18", "layout": src.layout.signature()}
    path = ck.path_for(str(tmp_path), 3)
    _write_hwio_checkpoint(path, src, src_opt, identity)
    arrays, meta = ck.load(path)
    other = build_model("resnet18", 11, get_backend("cpu")).layout    # another fc: another layout
    want = dict(identity, layout=other.signature())
    with pytest.raises(ck.CheckpointError, match="HWIO.*not for this model"):
        ck.check_compatible(path, meta, want, layout=other)
    with pytest.raises(ck.CheckpointError, match="cannot convert"):
        ck.upgrade_conv_layout(path, arrays, meta, other)
