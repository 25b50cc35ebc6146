"""Sharding, worker processes, corrupt files, resumable positions."""
import numpy as np
import pytest
from PIL import Image

from engine import data, loader, transforms
from test_data import make_imagefolder, smooth_image


@pytest.mark.parametrize("n, world, batch", [(1437, 2, 32), (1000, 3, 7), (64, 4, 16)])
def test_shards_are_disjoint_with_equal_step_counts(n, world, batch):
    seed = int(np.random.default_rng().integers(1 << 30))
    samplers = [loader.ShardSampler(n, r, world, batch, seed) for r in range(world)]
    steps = {s.steps_per_epoch for s in samplers}
    assert steps == {n // (world * batch)}
    for epoch in (0, 1):
        seen = np.concatenate([s.indices(epoch, k) for k in range(samplers[0].steps_per_epoch) for s in samplers])
        assert len(seen) == len(np.unique(seen)) == samplers[0].steps_per_epoch * world * batch
        assert seen.min() >= 0 and seen.max() < n
    # A new epoch is a new order; the same seed is the same order.
    assert not np.array_equal(samplers[0].indices(0, 0), samplers[0].indices(1, 0))
    again = loader.ShardSampler(n, 0, world, batch, seed)
    assert np.array_equal(again.indices(1, 0), samplers[0].indices(1, 0))


def test_global_batch_larger_than_dataset_is_refused():
    with pytest.raises(data.DataError, match="batch-per-rank"):
        loader.ShardSampler(10, 0, 2, 8, 0)


@pytest.mark.parametrize("n, world", [(360, 2), (361, 2), (7, 3), (2, 4)])
def test_eval_shards_count_every_image_once(n, world):
    shards = [loader.eval_shard(n, r, world) for r in range(world)]
    allidx = np.concatenate(shards)
    assert np.array_equal(np.sort(allidx), np.arange(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _digits_loader(workers, seed=5):
    train, _ = data.digits(16)
    tf = transforms.TrainTransform(16, train.crop_scale, train.flip)
    return train, loader.Loader(train, tf, transforms.ValTransform(16), seed=seed, workers=workers)


def test_worker_batches_equal_in_process_batches_and_resume_midway():
    train, inproc = _digits_loader(0)
    _, pooled = _digits_loader(2)
    sampler = loader.ShardSampler(len(train), 1, 2, 20, seed=11)
    with inproc, pooled:
        a = list(inproc.train_batches(sampler, epoch=3))
        b = list(pooled.train_batches(sampler, epoch=3))
        resumed = list(pooled.train_batches(sampler, epoch=3, start_step=10))
        assert pooled.wait_s > 0
    assert len(a) == len(b) == sampler.steps_per_epoch
    for (sa, ba), (sb, bb) in zip(a, b):
        assert sa == sb and np.array_equal(ba.images, bb.images) and np.array_equal(ba.labels, bb.labels)
        assert ba.images.shape == (20, 16, 16, 3)
    assert [s for s, _ in resumed] == list(range(10, sampler.steps_per_epoch))
    for (s, br) in resumed:
        assert np.array_equal(br.images, a[s][1].images)
    # Labels are those of the sampled indices.
    assert np.array_equal(a[0][1].labels, train.labels[sampler.indices(3, 0)])


def test_corrupt_image_is_reported_by_name_and_skipped(tmp_path):
    rng = np.random.default_rng()
    make_imagefolder(tmp_path, rng, per_class=3)
    bad = tmp_path / "train" / "dog" / "dog_1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    unreadable = tmp_path / "val" / "eel" / "eel_0.JPEG"
    unreadable.write_bytes(b"")
    train, val = data.imagefolder(str(tmp_path))
    warnings = []
    for workers in (0, 1):
        warnings.clear()
        ld = loader.Loader(train, transforms.TrainTransform(12), transforms.ValTransform(12), seed=0,
                           workers=workers, warn=warnings.append)
        with ld:
            sampler = loader.ShardSampler(len(train), 0, 1, 9, seed=1)
            batches = [b for _, b in ld.train_batches(sampler, 0)]
            batches += [b for _, b in ld.train_batches(sampler, 1)]
            assert all(b.images.shape == (9, 12, 12, 3) for b in batches)
            assert len(warnings) == 1 and str(bad) in warnings[0]
            # Evaluation leaves the unreadable file out of the count instead of filling.
            ev = list(loader.Loader(val, None, transforms.ValTransform(12), seed=0,
                                    warn=warnings.append).eval_batches(np.arange(len(val)), 4))
            assert sum(len(b.labels) for b in ev) == len(val) - 1
            assert str(unreadable) in warnings[-1]


def test_workers_run_without_the_launchers_mpi_environment(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_FD", "9")
    train, ld = _digits_loader(1)
    with ld:
        pid = ld.workers[0].proc.pid
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert not any(v.startswith(b"PMI_") for v in env)
        sampler = loader.ShardSampler(len(train), 0, 1, 8, seed=0)
        step, batch = next(iter(ld.train_batches(sampler, 0)))
        assert batch.images.shape == (8, 16, 16, 3)


def test_every_unreadable_batch_is_an_error(tmp_path):
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    for k in range(2):
        (d / f"{k}.JPEG").write_bytes(b"junk")
    ds = data.FolderDataset([str(p) for p in sorted(d.iterdir())], np.zeros(2, np.int64), ["a"], name="x")
    with pytest.raises(data.DataError, match="unreadable"):
        loader.load_batch(ds, transforms.TrainTransform(8), [0, 1], 0, 0, fill=True)


# ---- one shared worker pool, batches through shared memory ---------------------------------

def _photo_folder(root, rng, per_class=4):
    """JPEGs large enough (240x180) that 24 px crops are decoded at a reduced DCT scale."""
    for split in ("train", "val"):
        for c in ("ant", "bee", "cow"):
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(smooth_image(rng, 180, 240, noise=8.0)).save(d / f"{k}.JPEG", quality=90)
    return data.imagefolder(str(root))


def _passes(ld, train, val):
    """Two training epochs with an evaluation in the middle of the first (training batches in
    flight meanwhile), and a final evaluation in chunks of another size."""
    sampler = loader.ShardSampler(len(train), 0, 1, 5, seed=3)
    out = []
    for epoch in (0, 1):
        for step, b in ld.train_batches(sampler, epoch):
            out.append(b)
            if epoch == 0 and step == 0:
                out += list(ld.eval_batches(np.arange(len(val)), 7))
    return out + list(ld.eval_batches(np.arange(len(val)), 4))


def test_batches_do_not_depend_on_the_worker_count_and_one_pool_serves_both_splits(tmp_path):
    train, val = _photo_folder(tmp_path, np.random.default_rng())
    results = {}
    for workers in (0, 1, 2):
        ld = loader.Loader(train, transforms.TrainTransform(24), transforms.ValTransform(24), seed=9,
                           workers=workers, val_dataset=val)
        with ld:
            assert len(ld.workers) == workers
            results[workers] = _passes(ld, train, val)
    for workers in (1, 2):
        assert len(results[workers]) == len(results[0])
        for a, b in zip(results[0], results[workers]):
            assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    # Evaluation read the validation files (their labels, in order), not the training set's.
    val_labels = np.concatenate([b.labels for b in results[0][1:3]])
    assert np.array_equal(val_labels, val.labels)


def test_pixels_travel_through_shared_memory_not_the_pipe(tmp_path):
    train, val = _photo_folder(tmp_path, np.random.default_rng(), per_class=2)
    answers = []
    with loader.Loader(train, transforms.TrainTransform(24), transforms.ValTransform(24), seed=0,
                       workers=1, val_dataset=val) as ld:
        worker = ld.workers[0]
        receive = worker.receive

        def spy():
            answers.append(receive())
            return answers[-1]
        worker.receive = spy
        batches = _passes(ld, train, val)
    assert len(answers) == len(batches)
    for _, status, (count, labels, failures) in answers:
        assert status == "ok" and labels.ndim == 1 and failures == []
    assert sum(len(b.labels) for b in batches) == sum(a[2][0] for a in answers)


def test_a_dead_worker_is_named_not_a_broken_pipe(tmp_path):
    train, ld = _digits_loader(2)
    sampler = loader.ShardSampler(len(train), 0, 1, 8, seed=0)
    with ld:
        next(iter(ld.train_batches(sampler, 0)))
        from test_faults import _crash
        _crash(ld.workers[1])           # a killed one is replaced (tests/test_faults.py)
        with pytest.raises(RuntimeError, match="data loader worker 1 died"):
            list(ld.train_batches(sampler, 0))


def test_loader_bench_reports_each_case_against_its_bound(capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "loader.py"
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--images", "8", "--sources", "96x64", "--size", "16", "--batch", "4",
                       "--workers", "1", "--passes", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    bounds = [ln for ln in lines if " bound: " in ln]
    assert [ln.split()[:2] for ln in bounds] == [["96x64", "train"], ["96x64", "val"]]
    assert sum("1 worker(s)" in ln and "% of the bound" in ln for ln in lines) == 2
