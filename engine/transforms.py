"""ImageNet augmentation and validation transforms, scaled to any output size.

Train: random-resized crop (area fraction in `scale`, aspect ratio in [3/4, 4/3], as in
Inception/ResNet training) to size x size, then a horizontal flip with probability 1/2.
Val: resize the shorter side to size * 256/224, center crop size x size (224 -> 256/224).
Both return uint8 HWC; normalization to float happens later, on the training device, so
only bytes travel between processes.

Both take either a uint8 HWC array or a PIL image whose pixels are not decoded yet. The
crop box is drawn from the image's full size, then a JPEG is decoded at the smallest DCT
scale (1/2, 1/4, 1/8: libjpeg's scaled IDCT, through PIL's `draft`) that still leaves the
box at least as large as the output, and resampled once. So a crop downscaled 2x or more
costs a fraction of a full decode, and the box, hence the augmentation, is the same
whichever way the pixels were decoded.

Randomness comes from a Generator the caller seeds per sample (seed, epoch, index), so an
image's augmentation does not depend on which worker or which resumed run produced it.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from engine.backend import device_of
from engine.data import to_rgb

RESIZE_RATIO = 256 / 224
ASPECT_RANGE = (3 / 4, 4 / 3)
DCT_SCALES = (8, 4, 2)     # the reductions libjpeg decodes directly


def source_size(src) -> tuple:
    """(height, width) of a uint8 HWC array or of a PIL image (from its header alone)."""
    if isinstance(src, np.ndarray):
        return src.shape[:2]
    return src.size[1], src.size[0]


def _decode_for(im, box: tuple, out_w: int, out_h: int):
    """(RGB image, box in its pixels): decoded at the largest DCT reduction that keeps the
    box at least out_w x out_h (none for formats other than JPEG: draft returns None)."""
    shrink = min((box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h)
    k = next((k for k in DCT_SCALES if k <= shrink), 1)
    if k > 1:
        w, h = im.size
        drafted = im.draft("RGB", (w // k, h // k))
        if drafted is not None:
            scale = w / drafted[1][2]       # the reduction libjpeg will apply
            box = tuple(c / scale for c in box)
    return to_rgb(im), box


def _resize_box(src, box: tuple, out_w: int, out_h: int, flip: bool = False) -> np.ndarray:
    """Bilinear resample of the (x0, y0, x1, y1) region of src to out_w x out_h, mirrored
    left-right if `flip`, as uint8 HWC."""
    if isinstance(src, np.ndarray):
        im = Image.fromarray(src)
    else:
        im, box = _decode_for(src, box, out_w, out_h)
    out = im.resize((out_w, out_h), Image.BILINEAR, box=box)
    # PIL mirrors in C; copying a negatively strided NumPy view of 3-byte pixels took
    # ~1 ms per 224 px image, a third of its decode.
    return np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out)


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
        self.output_shape = (size, size, 3)

    def plan(self, h: int, w: int, rng: np.random.Generator) -> tuple:
        """(crop box, flip?) for an h x w image: every random draw of one sample."""
        box = random_crop_box(h, w, rng, self.scale)
        return box, bool(self.flip and rng.random() < 0.5)

    def __call__(self, src, rng: np.random.Generator) -> np.ndarray:
        box, flip = self.plan(*source_size(src), rng)
        return _resize_box(src, box, self.size, self.size, flip)


class ValTransform:
    def __init__(self, size: int):
        self.size = size
        self.resize = int(round(size * RESIZE_RATIO))
        self.output_shape = (size, size, 3)

    def plan(self, h: int, w: int, rng=None) -> tuple:
        """(crop box, no flip): shorter side -> self.resize, then the central size x size
        window of that image, done as one resample of the matching source box."""
        s = self.resize / min(h, w)
        crop = self.size / s                      # the crop's side in source pixels
        x0, y0 = (w - crop) / 2, (h - crop) / 2
        return (x0, y0, x0 + crop, y0 + crop), False

    def __call__(self, src, rng=None) -> np.ndarray:
        box, _ = self.plan(*source_size(src))
        return _resize_box(src, box, self.size, self.size)


_constants: dict = {}      # (mean, std, device) -> (mean, 1/std) as float32 arrays there


def _channel_constants(mean, std, xp):
    """mean and 1/std on the device of xp, copied there once per process: a captured CUDA
    graph may not copy from the host (engine.graph_step), and every step would otherwise."""
    key = (tuple(map(float, mean)), tuple(map(float, std)), device_of(xp))
    if key not in _constants:
        _constants[key] = (xp.asarray(np.asarray(mean, np.float32)),
                           xp.asarray(1.0 / np.asarray(std, np.float32)))
    return _constants[key]


def normalize(batch_uint8, mean, std, xp=np, dtype=np.float32):
    """uint8 NHWC -> float32 NHWC, (x - mean) / std per channel (on the device of xp),
    rounded once to `dtype` (the model's input dtype: bfloat16 in bf16 mode)."""
    x = xp.asarray(batch_uint8).astype(xp.float32)
    m, inv = _channel_constants(mean, std, xp)
    x -= m
    x *= inv
    return x if np.dtype(dtype) == np.float32 else x.astype(dtype)
