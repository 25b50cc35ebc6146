"""Data sets: the built-in digits, ImageNet-layout folders, and synthetic images.

A data set is a list of samples: `load(i)` returns image i as uint8 HWC with 3 channels
(raising on an unreadable file), `open(i)` a context manager giving what the transforms
take (the array itself, or a PIL image not yet decoded, so that a JPEG can be decoded at
the scale its crop needs), `labels[i]` its class, `describe(i)` what to name in an error
message. Each data set also says how it should be augmented (`flip`, `crop_scale`) and
normalized (`mean`, `std`, per channel, on the 0..255 scale).

Image folders read every format Pillow opens, skip hidden entries (names starting with a
dot: `.ipynb_checkpoints`, `.DS_Store`), scale 16-bit images to 8 bits, and ignore EXIF
orientation (pixels as stored, as torchvision does).

Nothing here imports MPI: loader worker processes import this module.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

from engine.errors import EngineError

DATASETS = ("digits", "imagefolder", "synthetic")

# Modes of 16-bit (and 32-bit integer) images; their values are read as 0..65535.
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# The digits split: a fixed fraction of every class goes to validation, chosen by a fixed
# seed that does not depend on --seed, so every run validates on the same 360 images.
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 20170904


class DataError(EngineError, ValueError):
    """A data set cannot be used as given (missing, empty or malformed directory): a usage
    error where every rank meets it alike before training (engine.guard.on_every_rank)."""
    usage = True


@dataclass
class ArrayDataset:
    """Images held in memory as one uint8 NHWC array."""

    images: np.ndarray            # (N, H, W, 3) uint8
    labels: np.ndarray            # (N,) int64
    num_classes: int
    name: str
    mean: tuple
    std: tuple
    flip: bool                    # horizontal flip is a valid augmentation
    crop_scale: tuple             # area range of the random-resized crop

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        return self.images[i]

    def open(self, i: int):
        return contextlib.nullcontext(self.images[i])

    def describe(self, i: int) -> str:
        return f"{self.name} image {i}"


@dataclass
class FolderDataset:
    """Image files listed at start-up, decoded on demand (in loader workers)."""

    paths: list
    labels: np.ndarray
    classes: list
    name: str
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    flip: bool = True
    crop_scale: tuple = (0.08, 1.0)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        with self.open(i) as im:
            return np.asarray(to_rgb(im))

    def open(self, i: int):
        """The file's PIL image, header read, pixels not yet decoded; closes its file on exit."""
        from PIL import Image
        return Image.open(self.paths[i])

    def describe(self, i: int) -> str:
        return self.paths[i]


def to_rgb(im):
    """A PIL image as 8-bit RGB. 16-bit gray (and 32-bit integer) images are scaled from
    0..65535 to 0..255 (PIL's convert would clip every value above 255 to white)."""
    from PIL import Image
    if im.mode in WIDE_INTEGER_MODES:
        wide = np.clip(np.asarray(im, np.int64), 0, 65535)
        im = Image.fromarray(((wide + 128) // 257).astype(np.uint8))
    return im if im.mode == "RGB" else im.convert("RGB")


def image_extensions() -> frozenset:
    """Lower-case file extensions of every format this Pillow can open (not only save)."""
    from PIL import Image
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _visible(entries):
    """Directory entries whose names do not start with a dot (hidden files and folders)."""
    return [e for e in entries if not e.name.startswith(".")]


def _to_rgb_uint8(gray: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) gray levels in [0, 1] -> (N, size, size, 3) uint8, bilinear upscale."""
    from PIL import Image
    out = np.empty((len(gray), size, size, 3), np.uint8)
    for k, g in enumerate(gray):
        im = Image.fromarray(np.round(g * 255).astype(np.uint8))
        out[k] = np.asarray(im.resize((size, size), Image.BILINEAR))[:, :, None]
    return out


def digits(size: int) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 1,797 8x8 digits, upscaled to size x size, split per class 80/20."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    gray = bunch.images / 16.0
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    val = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        val[rng.permutation(members)[:round(len(members) * DIGITS_VAL_FRACTION)]] = True
    images = _to_rgb_uint8(gray, size)
    train_images = images[~val]
    mean = tuple(float(m) for m in train_images.mean(axis=(0, 1, 2)))
    std = tuple(float(s) for s in train_images.std(axis=(0, 1, 2)))
    # A mirrored 2 or 5 is another glyph, so no flips; crops stay large enough to keep the digit.
    common = dict(num_classes=10, mean=mean, std=std, flip=False, crop_scale=(0.8, 1.0))
    return (ArrayDataset(train_images, labels[~val], name="digits/train", **common),
            ArrayDataset(images[val], labels[val], name="digits/val", **common))


def synthetic(size: int, num_classes: int = 10, n_train: int = 1024, n_val: int = 256,
              seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Learnable noise: each class has its own mean colour and stripe pattern."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(num_classes, 3))
    periods = rng.integers(2, max(3, size // 2), size=num_classes)

    def make(n):
        labels = rng.integers(0, num_classes, size=n).astype(np.int64)
        stripes = (np.arange(size)[None, :] // periods[labels][:, None]) % 2  # (n, size)
        base = colours[labels][:, None, None, :] + 30.0 * stripes[:, None, :, None]
        noise = rng.normal(0, 25, size=(n, size, size, 3))
        return np.clip(base + noise, 0, 255).astype(np.uint8), labels

    (xt, yt), (xv, yv) = make(n_train), make(n_val)
    common = dict(num_classes=num_classes, mean=(127.5,) * 3, std=(64.0,) * 3, flip=True,
                  crop_scale=(0.35, 1.0))
    return (ArrayDataset(xt, yt, name="synthetic/train", **common),
            ArrayDataset(xv, yv, name="synthetic/val", **common))


def _list_split(split_dir: str, classes: list | None) -> tuple[list, np.ndarray, list]:
    """Files of split_dir/<class>/*; `classes` (from train) fixes the label numbering."""
    if not os.path.isdir(split_dir):
        raise DataError(f"{split_dir}: not a directory (expected ImageNet layout "
                        f"<data>/train/<class>/*.JPEG and <data>/val/<class>/*.JPEG)")
    found = sorted(e.name for e in _visible(os.scandir(split_dir)) if e.is_dir())
    if not found:
        raise DataError(f"{split_dir}: no class directories (expected {split_dir}/<class>/*.JPEG)")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{split_dir}: class directories not present in train: {', '.join(unknown[:5])}")
    index = {c: k for k, c in enumerate(classes)}
    extensions = image_extensions()
    paths, labels = [], []
    for c in found:
        class_dir = os.path.join(split_dir, c)
        entries = [e for e in _visible(os.scandir(class_dir)) if e.is_file()]
        files = sorted(e.path for e in entries if os.path.splitext(e.name)[1].lower() in extensions)
        if not files:
            others = sorted({os.path.splitext(e.name)[1] or e.name for e in entries})
            found_note = f"; found only {', '.join(others[:5])}" if others else ""
            raise DataError(f"{class_dir}: no images (no file in a format Pillow reads{found_note})")
        paths += files
        labels += [index[c]] * len(files)
    return paths, np.asarray(labels, np.int64), classes


def imagefolder(root: str) -> tuple[FolderDataset, FolderDataset]:
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG; classes numbered in sorted order."""
    if not root:
        raise DataError("--dataset imagefolder needs --data DIR (ImageNet layout)")
    if not os.path.isdir(root):
        what = "is a file, not a directory" if os.path.exists(root) else "no such directory"
        raise DataError(f"--data {root}: {what} (expected ImageNet layout DIR/train/<class>/*.JPEG and "
                        f"DIR/val/<class>/*.JPEG)")
    try:
        train_paths, train_labels, classes = _list_split(os.path.join(root, "train"), None)
        val_paths, val_labels, _ = _list_split(os.path.join(root, "val"), classes)
    except OSError as e:        # a symlink loop, an unreadable folder: the path it names is enough
        raise DataError(f"--data {root}: cannot list {e.filename}: {e.strerror or e}") from None
    return (FolderDataset(train_paths, train_labels, classes, name=f"{root}/train"),
            FolderDataset(val_paths, val_labels, classes, name=f"{root}/val"))


def build_datasets(kind: str, *, data_dir: str | None, image_size: int, seed: int = 0):
    """(train, val) for --dataset `kind`; digits and synthetic ignore --data."""
    if kind == "digits":
        return digits(image_size)
    if kind == "synthetic":
        return synthetic(image_size, seed=seed)
    if kind == "imagefolder":
        return imagefolder(data_dir)
    raise DataError(f"--dataset must be one of {', '.join(DATASETS)}, got {kind!r}")
