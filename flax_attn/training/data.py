"""Datasets and deterministic, shardable batch streams.

Every training batch is a pure function of ``(seed, step)``: the classification order is a
permutation drawn from ``(seed, epoch)``, the super-resolution crops from ``(seed, step)``. So the
data-iterator position *is* the step, a resumed run sees exactly the batches it would have seen,
and each process can load only its own rows of the global batch (``rows``) without talking to the
others. Arrays are numpy on the host; :mod:`flax_attn.training.sharding` turns them into global jax.Arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

__all__ = [
    "CropSource",
    "DigitsSource",
    "EvalSet",
    "bicubic_resize",
    "digits_split",
    "load_skimage_image",
    "superres_eval_set",
    "superres_train_source",
]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


# --------------------------------------------------------------------------- classification


@functools.lru_cache(maxsize=8)
def digits_split(image_size: int = 8, test_fraction: float = 0.2, split_seed: int = 0):
    """scikit-learn's digits (1797 8x8 scans in 0..16) as ``(x_train, y_train, x_test, y_test)``.

    Images are float32 NHWC in [0, 1], bilinearly resized to ``image_size`` when it is not 8.
    The split is stratified and fixed by ``split_seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    if image_size != 8:
        from skimage.transform import resize

        x = np.stack(
            [resize(im, (image_size, image_size), order=1, anti_aliasing=False, mode="edge") for im in x]
        ).astype(np.float32)
    y = d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


@dataclasses.dataclass
class DigitsSource:
    """Epochs of shuffled (and optionally shifted) digits; the last partial batch of an epoch is dropped."""

    images: np.ndarray
    labels: np.ndarray
    batch_size: int
    seed: int
    augment: bool = True

    def __post_init__(self):
        if self.batch_size > len(self.images):
            raise ValueError(f"DigitsSource: batch_size {self.batch_size} exceeds the {len(self.images)} examples")
        self.steps_per_epoch = len(self.images) // self.batch_size
        self._perm_cache: dict[int, np.ndarray] = {}

    def position(self, step: int) -> dict[str, int]:
        """The iterator position before ``step``: ``{"epoch", "index"}`` (batch index in the epoch)."""
        return {
            "step": int(step),
            "epoch": step // self.steps_per_epoch,
            "index": step % self.steps_per_epoch,
        }

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: _rng(self.seed, epoch).permutation(len(self.images))}
        return self._perm_cache[epoch]

    def batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """Rows ``rows`` (default all) of global batch ``step``."""
        pos = self.position(step)
        idx = self._perm(pos["epoch"])[pos["index"] * self.batch_size : (pos["index"] + 1) * self.batch_size]
        rows = rows or slice(0, self.batch_size)
        x = self.images[idx]
        if self.augment:
            # One-pixel random shifts (zero fill), drawn for the whole global batch so that every
            # process agrees, then sliced.
            shifts = _rng(self.seed, 1_000_003, step).integers(-1, 2, size=(self.batch_size, 2))
            x = np.stack([_shift(im, dy, dx) for im, (dy, dx) in zip(x[rows], shifts[rows])])
        else:
            x = x[rows]
        return {"image": x, "label": self.labels[idx][rows]}


def _shift(im: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(im)
    h, w = im.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = im[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


# --------------------------------------------------------------------------- super-resolution


def load_skimage_image(name: str) -> np.ndarray:
    """``skimage.data.<name>()`` as uint8 RGB ``(H, W, 3)`` (grey images repeated, alpha dropped)."""
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if fn is None:
        raise ValueError(f"superres: skimage.data has no image {name!r}")
    im = np.asarray(fn())
    if im.dtype != np.uint8:
        raise ValueError(f"superres: skimage.data.{name} has dtype {im.dtype}, expected a uint8 photograph")
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=-1)
    return np.ascontiguousarray(im[..., :3])


def bicubic_resize(im: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of a uint8 ``(H, W, 3)`` image to ``size = (H', W')`` (antialiased when
    shrinking)."""
    from PIL import Image

    return np.asarray(Image.fromarray(im).resize((size[1], size[0]), Image.BICUBIC))


def _crop_to_multiple(im: np.ndarray, scale: int) -> np.ndarray:
    h, w = im.shape[:2]
    return im[: h - h % scale, : w - w % scale]


@dataclasses.dataclass
class CropSource:
    """Random aligned (LR, HR) crop pairs of a fixed list of images, drawn from ``(seed, step)``.

    ``hr`` are the images cropped to a multiple of ``scale``; ``lr`` their PIL-bicubic
    downscales. A crop takes an LR window of ``patch_size`` at a uniform position of a uniformly
    chosen image and the HR window ``scale`` times larger at the same place, with random flips
    and transposition when ``augment``.
    """

    hr: list[np.ndarray]
    lr: list[np.ndarray]
    batch_size: int
    patch_size: int
    scale: int
    seed: int
    augment: bool = True

    def __post_init__(self):
        for im in self.lr:
            if min(im.shape[:2]) < self.patch_size:
                raise ValueError(
                    f"CropSource: an LR image of shape {im.shape} is smaller than patch_size {self.patch_size}"
                )

    def position(self, step: int) -> dict[str, int]:
        return {"step": int(step)}

    def batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        b, p, s = self.batch_size, self.patch_size, self.scale
        rng = _rng(self.seed, step)
        which = rng.integers(0, len(self.hr), size=b)
        u = rng.random(size=(b, 2))
        flips = rng.integers(0, 2, size=(b, 3)) if self.augment else np.zeros((b, 3), np.int64)
        lrs, hrs = [], []
        for i in range(b)[rows or slice(None)]:
            lr_im, hr_im = self.lr[which[i]], self.hr[which[i]]
            y = int(u[i, 0] * (lr_im.shape[0] - p + 1))
            x = int(u[i, 1] * (lr_im.shape[1] - p + 1))
            lr_c = lr_im[y : y + p, x : x + p]
            hr_c = hr_im[y * s : (y + p) * s, x * s : (x + p) * s]
            if flips[i, 0]:
                lr_c, hr_c = lr_c[:, ::-1], hr_c[:, ::-1]
            if flips[i, 1]:
                lr_c, hr_c = lr_c[::-1], hr_c[::-1]
            if flips[i, 2]:
                lr_c, hr_c = lr_c.transpose(1, 0, 2), hr_c.transpose(1, 0, 2)
            lrs.append(lr_c)
            hrs.append(hr_c)
        return {
            "lr": np.stack(lrs).astype(np.float32) / 255.0,
            "hr": np.stack(hrs).astype(np.float32) / 255.0,
        }


@functools.lru_cache(maxsize=4)
def _train_images(names: tuple[str, ...], scale: int):
    hr = [_crop_to_multiple(load_skimage_image(n), scale) for n in names]
    lr = [bicubic_resize(im, (im.shape[0] // scale, im.shape[1] // scale)) for im in hr]
    return hr, lr


def superres_train_source(names, *, batch_size, patch_size, scale, seed, augment=True) -> CropSource:
    hr, lr = _train_images(tuple(names), scale)
    return CropSource(hr, lr, batch_size, patch_size, scale, seed, augment)


@functools.lru_cache(maxsize=4)
def superres_eval_set(names: tuple[str, ...], eval_size: int, scale: int) -> dict[str, np.ndarray]:
    """Centre crops (``eval_size`` HR) of the evaluation images: ``lr``, ``hr`` in [0, 1] and the
    PIL-bicubic upscale ``bicubic`` (uint8 as PIL gives it), the baseline the model must beat."""
    if eval_size % scale:
        raise ValueError(f"superres: eval_size {eval_size} must be a multiple of scale {scale}")
    lr, hr, bic = [], [], []
    for n in names:
        im = load_skimage_image(n)
        h, w = im.shape[:2]
        if min(h, w) < eval_size:
            raise ValueError(f"superres: eval image {n!r} {im.shape} is smaller than eval_size {eval_size}")
        y, x = (h - eval_size) // 2, (w - eval_size) // 2
        c = im[y : y + eval_size, x : x + eval_size]
        small = bicubic_resize(c, (eval_size // scale, eval_size // scale))
        hr.append(c)
        lr.append(small)
        bic.append(bicubic_resize(small, (eval_size, eval_size)))
    return {
        "lr": np.stack(lr).astype(np.float32) / 255.0,
        "hr": np.stack(hr).astype(np.float32) / 255.0,
        "bicubic": np.stack(bic),
    }


# --------------------------------------------------------------------------- evaluation sets


@dataclasses.dataclass
class EvalSet:
    """A fixed evaluation set, padded to whole global batches with a ``mask`` of real rows."""

    arrays: dict[str, np.ndarray]
    batch_size: int

    def __post_init__(self):
        n = len(next(iter(self.arrays.values())))
        self.num_examples = n
        self.num_batches = -(-n // self.batch_size)
        total = self.num_batches * self.batch_size
        padded = {}
        for k, v in self.arrays.items():
            pad = np.zeros((total - n, *v.shape[1:]), v.dtype)
            padded[k] = np.concatenate([v, pad]) if total > n else v
        padded["mask"] = (np.arange(total) < n).astype(np.float32)
        self.padded = padded

    def batch(self, i: int, rows: slice | None = None) -> dict[str, Any]:
        start = i * self.batch_size
        rows = rows or slice(0, self.batch_size)
        sl = slice(start + rows.start, start + rows.stop)
        return {k: v[sl] for k, v in self.padded.items()}
