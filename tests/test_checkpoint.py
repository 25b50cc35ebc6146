"""Atomic checkpoint files: round trip, truncation, corruption, mismatch, pruning."""
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


def test_truncated_checkpoint_is_refused_and_the_previous_one_named(tmp_path):
    rng = np.random.default_rng()
    good, newest = ck.path_for(str(tmp_path), 10), ck.path_for(str(tmp_path), 20)
    ck.save(good, _arrays(rng), {"step": 10})
    ck.save(newest, _arrays(rng), {"step": 20})
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ck.CheckpointError, match="truncated") as e:
        ck.load_for_resume(str(tmp_path))
    assert newest in str(e.value) and f"--resume {good}" in str(e.value)
    _, meta = ck.load(good)
    assert meta["step"] == 10


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


def test_prune_keeps_the_newest(tmp_path):
    for s in (3, 1, 2, 4):
        ck.save(ck.path_for(str(tmp_path), s), {"a": np.arange(s)}, {"step": s})
    ck.prune(str(tmp_path), keep=2)
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path))] == ["ckpt-00000003.npz", "ckpt-00000004.npz"]
    assert ck.resolve(str(tmp_path)).endswith("ckpt-00000004.npz")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ck.CheckpointError, match="without checkpoints"):
        ck.resolve(str(tmp_path / "empty"))
