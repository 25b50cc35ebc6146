"""ImageNet augmentation and validation transforms, scaled to any output size.

Train: random-resized crop (area fraction in `scale`, aspect ratio in [3/4, 4/3], as in
Inception/ResNet training) to size x size, then a horizontal flip with probability 1/2.
Val: resize the shorter side to size * 256/224, center crop size x size (224 -> 256/224).
Both work on uint8 HWC arrays and return uint8 HWC; normalization to float happens later,
on the training device, so only bytes travel between processes.

Randomness comes from a Generator the caller seeds per sample (seed, epoch, index), so an
image's augmentation does not depend on which worker or which resumed run produced it.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

RESIZE_RATIO = 256 / 224
ASPECT_RANGE = (3 / 4, 4 / 3)


def _resize_box(img: np.ndarray, box: tuple, out_w: int, out_h: int) -> np.ndarray:
    """Bilinear resample of the (x0, y0, x1, y1) region of img to out_w x out_h."""
    im = Image.fromarray(img)
    return np.asarray(im.resize((out_w, out_h), Image.BILINEAR, box=box))


def random_crop_box(h: int, w: int, rng: np.random.Generator, scale: tuple,
                    ratio: tuple = ASPECT_RANGE, tries: int = 10) -> tuple:
    """(x0, y0, x1, y1) of a random crop of area fraction in `scale`, aspect in `ratio`."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            return (x0, y0, x0 + cw, y0 + ch)
    # Fallback (as torchvision): the largest central crop within the aspect range.
    aspect = min(max(w / h, ratio[0]), ratio[1])
    cw, ch = (w, int(round(w / aspect))) if w / h < aspect else (int(round(h * aspect)), h)
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return (x0, y0, x0 + cw, y0 + ch)


class TrainTransform:
    def __init__(self, size: int, scale: tuple = (0.08, 1.0), flip: bool = True):
        self.size, self.scale, self.flip = size, tuple(scale), flip

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        box = random_crop_box(h, w, rng, self.scale)
        out = _resize_box(img, box, self.size, self.size)
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        return out


class ValTransform:
    def __init__(self, size: int):
        self.size = size
        self.resize = int(round(size * RESIZE_RATIO))

    def __call__(self, img: np.ndarray, rng=None) -> np.ndarray:
        h, w = img.shape[:2]
        # Shorter side -> self.resize, then the central size x size window of that image,
        # done as one resample of the matching source box.
        s = self.resize / min(h, w)
        crop = self.size / s                      # the crop's side in source pixels
        x0, y0 = (w - crop) / 2, (h - crop) / 2
        return _resize_box(img, (x0, y0, x0 + crop, y0 + crop), self.size, self.size)


def normalize(batch_uint8, mean, std, xp=np):
    """uint8 NHWC -> float32 NHWC, (x - mean) / std per channel (on the device of xp)."""
    x = xp.asarray(batch_uint8).astype(xp.float32)
    m = xp.asarray(np.asarray(mean, np.float32))
    inv = xp.asarray(1.0 / np.asarray(std, np.float32))
    x -= m
    x *= inv
    return x
