"""Data sets and transforms: the digits split, ImageNet-layout folders, crops, decoding."""
import os

import numpy as np
import pytest
from PIL import Image

from engine import data, transforms


def test_digits_split_is_deterministic_stratified_and_disjoint():
    train, val = data.digits(16)
    from sklearn.datasets import load_digits
    assert len(train) + len(val) == len(load_digits().images)
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    again_train, again_val = data.digits(16)
    assert np.array_equal(val.labels, again_val.labels) and np.array_equal(val.images, again_val.images)
    # Every class is represented in validation at about 20%.
    counts_val = np.bincount(val.labels, minlength=10)
    counts_all = counts_val + np.bincount(train.labels, minlength=10)
    assert np.all(np.abs(counts_val / counts_all - 0.2) < 0.01)
    # No image is in both splits (digits images are distinct enough to compare bytes).
    train_keys = {img.tobytes() for img in train.images}
    overlap = sum(img.tobytes() in train_keys for img in val.images)
    assert overlap <= 2   # sklearn's set has a handful of exact duplicates across writers
    assert not train.flip


def _bilinear_upscale(glyph, size):
    """PIL's bilinear upscale in NumPy: each output pixel centre (o + 1/2) * 8 / size - 1/2
    interpolated between its two nearest source pixels in each direction, clamped at the edges."""
    s = (np.arange(size) + 0.5) * glyph.shape[0] / size - 0.5
    i0 = np.floor(s).astype(int)
    f = s - i0
    lo, hi = np.clip(i0, 0, glyph.shape[0] - 1), np.clip(i0 + 1, 0, glyph.shape[0] - 1)
    rows = glyph[lo] * (1 - f)[:, None] + glyph[hi] * f[:, None]
    return rows[:, lo] * (1 - f) + rows[:, hi] * f


def test_digits_are_the_source_glyphs_upscaled_with_their_labels():
    """A random sample of sklearn's glyphs, upscaled here independently: each is one of the
    data set's images to within uint8 rounding (any other glyph is tens of levels away), with
    its label."""
    from sklearn.datasets import load_digits
    train, val = data.digits(32)
    source = load_digits()
    images = np.concatenate([train.images, val.images])
    assert np.array_equal(images[..., 0], images[..., 2])       # gray in all three channels
    images = images[..., 0].astype(float)
    labels = np.concatenate([train.labels, val.labels])
    for j in np.random.default_rng().choice(len(source.images), 20, replace=False):
        want = _bilinear_upscale(np.round(source.images[j] / 16 * 255), 32)
        error = np.abs(images - want).max(axis=(1, 2))
        k = int(np.argmin(error))
        assert error[k] <= 1.0 and labels[k] == source.target[j], (j, error[k], labels[k], source.target[j])


def _write_jpeg(path, rng, size=(40, 30)):
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")


def make_imagefolder(root, rng, classes=("cat", "dog", "eel"), per_class=4):
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(per_class):
                _write_jpeg(d / f"{c}_{k}.JPEG", rng)
    return root


def test_imagefolder_lists_classes_in_sorted_order(tmp_path):
    rng = np.random.default_rng()
    make_imagefolder(tmp_path, rng)
    train, val = data.imagefolder(str(tmp_path))
    assert train.classes == ["cat", "dog", "eel"] and len(train) == 12 and len(val) == 12
    for i in range(len(train)):
        assert train.classes[train.labels[i]] in train.paths[i]
    img = train.load(5)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8


@pytest.mark.parametrize("breakage, message", [
    ("no_val", "val: not a directory"),
    ("empty_class", "no images"),
    ("flat_files", "no class directories"),
    ("extra_val_class", "not present in train"),
])
def test_imagefolder_malformed_directory_is_a_clear_error(tmp_path, breakage, message):
    rng = np.random.default_rng()
    make_imagefolder(tmp_path, rng)
    if breakage == "no_val":
        import shutil
        shutil.rmtree(tmp_path / "val")
    elif breakage == "empty_class":
        (tmp_path / "train" / "empty").mkdir()
    elif breakage == "flat_files":
        import shutil
        shutil.rmtree(tmp_path / "train")
        (tmp_path / "train").mkdir()
        _write_jpeg(tmp_path / "train" / "x.JPEG", rng)
    elif breakage == "extra_val_class":
        (tmp_path / "val" / "zebra").mkdir()
        _write_jpeg(tmp_path / "val" / "zebra" / "z.JPEG", rng)
    with pytest.raises(data.DataError, match=message) as e:
        data.imagefolder(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_build_datasets_rejects_unknown_kind():
    with pytest.raises(data.DataError, match="--dataset"):
        data.build_datasets("mnist", data_dir=None, image_size=32)


def test_random_crop_box_respects_scale_and_aspect():
    rng = np.random.default_rng()
    h, w = 120, 90
    for _ in range(200):
        x0, y0, x1, y1 = transforms.random_crop_box(h, w, rng, scale=(0.3, 0.8))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        area = (x1 - x0) * (y1 - y0) / (h * w)
        aspect = (x1 - x0) / (y1 - y0)
        assert 0.27 < area < 0.85 and 0.7 < aspect < 1.4


def smooth_image(rng, h, w, period=20.0, noise=0.0):
    """Random low-frequency waves per channel (plus Gaussian noise), uint8 HWC."""
    yy, xx = np.mgrid[0:h, 0:w] / period
    phase = rng.uniform(0, 6, size=(3, 2))
    img = np.stack([127 + 100 * np.sin(xx + p[0]) * np.cos(yy + p[1]) for p in phase], -1)
    return np.clip(img + rng.normal(0, noise, img.shape) if noise else img, 0, 255).astype(np.uint8)


def test_val_transform_is_resize_then_center_crop():
    # A smooth random image (low-frequency waves), so sub-pixel offsets change little.
    img = smooth_image(np.random.default_rng(), 60, 80)
    out = transforms.ValTransform(28)(img)
    # Reference: the two-step torchvision recipe done literally with PIL.
    short = 32  # round(28 * 256 / 224)
    resized = Image.fromarray(img).resize((round(80 * short / 60), short), Image.BILINEAR)
    rw, rh = resized.size
    left, top = (rw - 28) // 2, (rh - 28) // 2
    ref = np.asarray(resized.crop((left, top, left + 28, top + 28)), float)
    assert out.shape == (28, 28, 3)
    assert np.abs(out - ref).mean() < 4   # one resample vs two: sub-pixel offsets only


def test_train_transform_mirrors_about_half_of_the_samples():
    """Each output is its crop resized, mirrored left-right or not (by PIL, not by the
    transform's own code); over 64 seeds about half are mirrored, so a transform that never
    (or always) flips fails, and so does one that flips a different crop."""
    img = np.random.default_rng().integers(0, 256, (40, 30, 3), dtype=np.uint8)
    tf = transforms.TrainTransform(24, scale=(0.5, 1.0), flip=True)
    mirrored = 0
    for seed in range(64):
        out = tf(img, np.random.default_rng(seed))
        box = transforms.random_crop_box(40, 30, np.random.default_rng(seed), (0.5, 1.0))
        crop = Image.fromarray(img).resize((24, 24), Image.BILINEAR, box=box)
        plain, flipped = np.asarray(crop), np.asarray(crop)[:, ::-1]
        assert np.array_equal(out, plain) or np.array_equal(out, flipped), seed
        mirrored += np.array_equal(out, flipped)
    assert 16 <= mirrored <= 48, mirrored
    assert np.array_equal(tf(img, np.random.default_rng(7)), tf(img, np.random.default_rng(7)))
    noflip = transforms.TrainTransform(24, scale=(0.5, 1.0), flip=False)
    for seed in range(16):
        box = transforms.random_crop_box(40, 30, np.random.default_rng(seed), (0.5, 1.0))
        crop = Image.fromarray(img).resize((24, 24), Image.BILINEAR, box=box)
        assert np.array_equal(noflip(img, np.random.default_rng(seed)), np.asarray(crop))


def test_normalize_matches_float64_reference():
    rng = np.random.default_rng()
    x = rng.integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    mean, std = (10.0, 120.5, 200.0), (30.0, 60.0, 5.5)
    got = transforms.normalize(x, mean, std)
    ref = (x.astype(np.float64) - np.asarray(mean)) / np.asarray(std)
    assert got.dtype == np.float32
    assert np.max(np.abs(got - ref) / (np.abs(ref) + 1)) < 1e-6


# ---- decoding only what the crop needs (DCT scaling), and the same augmentation ----------

@pytest.fixture
def count_dct_reductions(monkeypatch):
    """Counts the decodes that libjpeg was asked to do at a reduced scale."""
    from PIL import JpegImagePlugin
    seen = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        if result is not None and self.decoderconfig[0] > 1:
            seen.append(self.decoderconfig[0])
        return result
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


@pytest.mark.parametrize("kind", ["train", "val"])
def test_dct_scaled_decode_keeps_the_crop_box_and_the_pixels(tmp_path, kind, count_dct_reductions):
    rng = np.random.default_rng()
    path = tmp_path / "big.JPEG"
    Image.fromarray(smooth_image(rng, 600, 800, period=40.0, noise=6.0)).save(path, quality=90)
    full = np.asarray(Image.open(path).convert("RGB"))
    tf = transforms.TrainTransform(64) if kind == "train" else transforms.ValTransform(64)
    diffs = []
    for seed in rng.integers(1 << 30, size=12):
        if kind == "train":     # the box comes from the header's size: same draws, same box
            with Image.open(path) as im:
                assert tf.plan(*transforms.source_size(im), np.random.default_rng(seed)) == \
                    tf.plan(*full.shape[:2], np.random.default_rng(seed))
        with Image.open(path) as im:
            scaled = tf(im, np.random.default_rng(seed))
        reference = tf(full, np.random.default_rng(seed))
        assert scaled.shape == reference.shape == (64, 64, 3)
        diffs.append(np.abs(scaled.astype(float) - reference).mean())
    # Crops of >= 128 px shrunk to 64 are decoded at 1/2 or less; the image matches the
    # full decode to about a grey level (a wrong box would differ by tens of levels).
    assert len(count_dct_reductions) >= 6
    assert np.mean(diffs) < 1.5 and max(diffs) < 4, diffs


def test_crops_not_shrunk_twofold_decode_exactly_as_before(tmp_path, count_dct_reductions):
    rng = np.random.default_rng()
    path = tmp_path / "small.JPEG"
    Image.fromarray(smooth_image(rng, 90, 120, noise=10.0)).save(path, quality=85)
    full = np.asarray(Image.open(path).convert("RGB"))
    for tf in (transforms.TrainTransform(48), transforms.ValTransform(48)):
        for seed in rng.integers(1 << 30, size=5):
            with Image.open(path) as im:
                assert np.array_equal(tf(im, np.random.default_rng(seed)), tf(full, np.random.default_rng(seed)))
    assert count_dct_reductions == []


# ---- fidelity of image folders -------------------------------------------------------------

def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng()
    wide = rng.integers(0, 65536, (24, 32)).astype(np.uint16)
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    Image.fromarray(wide).save(d / "deep.png")
    assert Image.open(d / "deep.png").mode.startswith("I;16")
    ds = data.FolderDataset([str(d / "deep.png")], np.zeros(1, np.int64), ["a"], name="x")
    img = ds.load(0)
    expected = np.round(wide.astype(np.float64) * 255 / 65535)
    assert img.shape == (24, 32, 3) and np.array_equal(img, np.repeat(expected[:, :, None], 3, axis=2))
    # The transforms decode through the same conversion.
    with ds.open(0) as im:
        out = transforms.ValTransform(16)(im)
    assert np.array_equal(out, transforms.ValTransform(16)(img))


def test_hidden_entries_are_neither_classes_nor_images(tmp_path):
    rng = np.random.default_rng()
    make_imagefolder(tmp_path, rng)
    for split in ("train", "val"):
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
        _write_jpeg(tmp_path / split / ".ipynb_checkpoints" / "x.JPEG", rng)
        (tmp_path / split / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        _write_jpeg(tmp_path / split / "cat" / "._cat_0.JPEG", rng)   # macOS resource fork name
    train, val = data.imagefolder(str(tmp_path))
    assert train.classes == ["cat", "dog", "eel"] and len(train) == len(val) == 12
    assert not any("/." in p for p in train.paths + val.paths)


def test_every_format_pillow_reads_is_an_image_and_other_files_are_not(tmp_path):
    rng = np.random.default_rng()
    make_imagefolder(tmp_path, rng, per_class=1)
    formats = {".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF", ".gif": "GIF", ".PNG": "PNG"}
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for ext, fmt in formats.items():
        Image.fromarray(pixels).save(tmp_path / "train" / "dog" / f"more{ext}", fmt)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    train, _ = data.imagefolder(str(tmp_path))
    dogs = [p for p, y in zip(train.paths, train.labels) if train.classes[y] == "dog"]
    assert sorted(os.path.splitext(p)[1] for p in dogs) == sorted([".JPEG", *formats])
    for i, p in enumerate(train.paths):
        if p.endswith((".bmp", ".tif", ".PNG")):    # lossless: the pixels themselves
            assert np.array_equal(train.load(i), pixels)
        assert train.load(i).shape[2] == 3
    # A class with nothing readable names what it found.
    (tmp_path / "train" / "fox").mkdir()
    (tmp_path / "train" / "fox" / "readme.txt").write_text("")
    with pytest.raises(data.DataError, match=r"fox: no images .*\.txt"):
        data.imagefolder(str(tmp_path))


def test_exif_orientation_is_ignored_as_torchvision_does(tmp_path):
    rng = np.random.default_rng()
    exif = Image.Exif()
    exif[0x0112] = 6            # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.JPEG"
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(path, exif=exif)
    ds = data.FolderDataset([str(path)], np.zeros(1, np.int64), ["a"], name="x")
    assert Image.open(path).getexif()[0x0112] == 6
    assert ds.load(0).shape == (20, 40, 3)      # as stored: 40 wide, not turned to 20 wide
