"""Image folders on disk as `grain <https://github.com/google/grain>`_ pipelines: classification
trees, lists of ``path,label``, folders of high-resolution images for super-resolution.

Determinism and sharding. Example ``g`` of the run (``g = step * global_batch + row``) is read from
record ``order[g]``, where ``order = grain.MapDataset.range(n).shuffle(seed).repeat()`` (grain's
index shuffle, reshuffled every epoch, random access in O(1) memory), and its augmentation is drawn
from ``numpy.random.default_rng((seed, g))``. So what a row holds depends only on ``(seed, step,
row)``, never on how many processes or workers read it. Each process builds a dataset of only
*its* rows of every global batch (``rows``: the contiguous slice its devices hold,
:func:`flax_attn.training.sharding.process_rows`), which the trainer turns into global arrays with
``jax.make_array_from_process_local_data``. This is what ``grain.sharding.ShardByJaxProcess`` is
for, done by batch rows rather than by record stride: a record-strided shard would put other
examples into a global batch when the process count changes, and 2 processes x 2 devices could not
reproduce the losses of 1 x 4.

Workers and state. With ``workers > 0`` the pipeline runs in that many grain worker processes
(``IterDataset.mp_prefetch``); otherwise in threads of this process (``ReadOptions``). Either
way the iterator's ``get_state()`` (JSON) goes into the ``data`` item of the same Orbax
checkpoint as the train state, and a resumed run continues from exactly the next batch. Every
process's iterator is at the same position of an identically structured dataset (only the rows
differ), so process 0's state, which is the one saved, is every process's state.

Unreadable images. A file that does not decode (truncated, not an image, too small for a patch)
is replaced by the next record of the order, with a :class:`CorruptImageWarning` naming the file
(once per file and process); the row's ``skipped`` field counts the replacements, and the trainer
logs their running total as ``data_skipped``. More than :data:`MAX_CONSECUTIVE_BAD` unreadable
records in a row raise :class:`DataError` (a folder of broken files should stop the run).

Bicubic convention (super-resolution). LR images are the **PIL bicubic** downscale of the HR
image (``Image.resize(..., Image.BICUBIC)`` on 8-bit RGB): Keys' cubic with ``a = -0.5`` and the
kernel widened by the scale factor (antialiased), which is MATLAB ``imresize``'s kernel; it
differs from MATLAB in the edge handling (PIL renormalises the truncated kernel, MATLAB mirrors)
and in rounding the horizontal pass to 8 bits. It is the convention with which the released A2N
weights reproduce the paper's Set5 numbers (38.06 dB at x2, see ``../shared/data/README.md``), and
``flax_attn.sr_metrics`` uses it too. Training patches are downscaled from an HR window with a
margin of two LR pixels (clamped at the image edges) and the margin cut off, which gives exactly
the pixels of the whole image's downscale at a fraction of the cost.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from flax_attn.training.configs import ConfigError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_CONSECUTIVE_BAD",
    "CorruptImageWarning",
    "DataError",
    "GrainSource",
    "classify_eval_arrays",
    "classify_folder_source",
    "decode_image",
    "labelled_files",
    "list_images",
    "random_resized_crop",
    "resize_center_crop",
    "sr_eval_sets",
    "sr_folder_source",
    "sr_patch",
    "stratified_split",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: unreadable records in a row before the pipeline gives up
MAX_CONSECUTIVE_BAD = 16
# Set5-style benchmark folders also hold the benchmark's own LR files (NAME_x4_lr.png).
_LR_NAME = re.compile(r".*_x\d+_lr$", re.IGNORECASE)


class DataError(ConfigError):
    """A data folder or list cannot be used; the message names the argument, what was expected and what was found.

    A :class:`~flax_attn.training.configs.ConfigError`: the CLI reports it as a one-line user error (exit 2)."""


class CorruptImageWarning(UserWarning):
    """An image file could not be used and was replaced by the next record."""


class _UnusableImageError(Exception):
    pass


# --------------------------------------------------------------------------- listing files


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | Path, *, arg: str = "data.train_dir", skip_lr: bool = False) -> list[str]:
    """Sorted image files (``.png``/``.jpg``/``.jpeg``, any case) under ``folder``, recursively.

    ``skip_lr`` leaves out benchmark LR files named ``*_x<N>_lr.*`` (Set5/Set14 layout).
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{arg}: expected a directory of images, got {str(folder)!r} (not a directory)")
    files = sorted(str(p) for p in root.rglob("*") if _is_image(p) and not (skip_lr and _LR_NAME.match(p.stem)))
    if not files:
        raise DataError(f"{arg}: expected image files ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}, found none")
    return files


def _class_tree(root: Path, arg: str) -> tuple[list[str], np.ndarray, list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{arg}: expected class sub-directories root/<class>/*.png in {str(root)!r}, found none")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(str(p) for p in (root / c).rglob("*") if _is_image(p))
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise DataError(f"{arg}: the class folders of {str(root)!r} hold no {'/'.join(IMAGE_SUFFIXES)} files")
    return paths, np.asarray(labels, np.int32), classes


def _list_rows(path: Path, arg: str) -> list[tuple[str, Any]]:
    text = path.read_text()
    rows: list[tuple[str, Any]] = []
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except ValueError as e:
            raise DataError(f"{arg}: {str(path)!r} is not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise DataError(f"{arg}: expected a JSON list of {{'path', 'label'}} or [path, label], got {type(items)}")
        for i, it in enumerate(items):
            if isinstance(it, dict) and "path" in it and "label" in it:
                rows.append((str(it["path"]), it["label"]))
            elif isinstance(it, (list, tuple)) and len(it) == 2:
                rows.append((str(it[0]), it[1]))
            else:
                raise DataError(
                    f"{arg}: entry {i} of {str(path)!r} must be {{'path', 'label'}} or [path, label], got {it!r}"
                )
    else:
        for i, rec in enumerate(csv.reader(text.splitlines())):
            if not rec or not "".join(rec).strip():
                continue
            if len(rec) != 2:
                raise DataError(f"{arg}: line {i + 1} of {str(path)!r} must be 'path,label', got {rec!r}")
            if i == 0 and [c.strip().lower() for c in rec] == ["path", "label"]:
                continue  # header
            rows.append((rec[0].strip(), rec[1].strip()))
    if not rows:
        raise DataError(f"{arg}: {str(path)!r} lists no images")
    return rows


def labelled_files(spec: str | Path, *, arg: str = "data.root") -> tuple[list[str], np.ndarray, list[str]]:
    """``(paths, labels, class_names)`` from a class-folder tree or a ``.csv``/``.json`` list.

    A tree is ``root/<class>/*.{png,jpg,jpeg}``; classes are the sorted sub-directory names. A list
    holds ``path,label`` rows (an optional ``path,label`` header; JSON: ``[{"path", "label"}]`` or
    ``[[path, label]]``); relative paths are relative to the list's directory. Integer labels are
    used as given; otherwise the sorted distinct labels are numbered.
    """
    p = Path(spec)
    if p.is_dir():
        return _class_tree(p, arg)
    if not p.is_file():
        raise DataError(f"{arg}: expected a class-folder tree or a .csv/.json list, got {str(spec)!r} (does not exist)")
    if p.suffix.lower() not in (".csv", ".json"):
        raise DataError(f"{arg}: expected a directory or a .csv/.json file, got {str(spec)!r}")
    rows = _list_rows(p, arg)
    paths = [os.path.normpath(q if Path(q).is_absolute() else p.parent / q) for q, _ in rows]
    raw = [lab for _, lab in rows]
    try:
        ints = [int(x) for x in raw]
        if any(i < 0 for i in ints):
            raise ValueError
        labels, classes = ints, [str(i) for i in range(max(ints) + 1)]
    except (TypeError, ValueError):
        classes = sorted({str(x) for x in raw})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[str(x)] for x in raw]
    return paths, np.asarray(labels, np.int32), classes


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, held_back)``: ``round(fraction * n_c)`` of every class held back (at least one
    of each class with two or more examples), drawn with ``seed``; both sorted."""
    rng = np.random.default_rng([int(seed), 17])
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(max(int(round(fraction * len(idx))), 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


# --------------------------------------------------------------------------- decoding and transforms


def decode_image(path: str, channels: int = 3) -> np.ndarray:
    """The image at ``path`` as uint8 ``(H, W, channels)`` (``channels`` 1: luminance, 3: RGB).

    Raises ``OSError`` (or ``ValueError``) for a file that is not a readable image.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


def _pil_resize(im: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    from PIL import Image

    mode = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[method]
    squeeze = im.shape[-1] == 1
    out = np.asarray(Image.fromarray(im[..., 0] if squeeze else im).resize((size[1], size[0]), mode))
    return out[..., None] if squeeze else out


def random_resized_crop(
    im: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception-style crop (``torchvision.transforms.RandomResizedCrop``'s sampling: area fraction in
    ``scale``, log-uniform aspect ratio in ``ratio``, ten tries then the centre crop of the ratio
    range) resized bilinearly to ``size x size``; uint8 in, uint8 out."""
    h, w = im.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = int(round(np.sqrt(target * ar))), int(round(np.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            ch, cw = h, int(round(h * ratio[1]))
        else:
            cw, ch = w, h
        y, x = (h - ch) // 2, (w - cw) // 2
    crop = im[y : y + ch, x : x + cw]
    return crop if crop.shape[:2] == (size, size) else _pil_resize(crop, (size, size), "bilinear")


def resize_center_crop(im: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Evaluation view: shorter side resized to ``round(size / crop_fraction)`` (bilinear), then the
    central ``size x size``; uint8 in, uint8 out."""
    h, w = im.shape[:2]
    short = int(round(size / crop_fraction))
    if min(h, w) != short:
        nh, nw = (
            (short, max(int(round(w * short / h)), short)) if h <= w else (max(int(round(h * short / w)), short), short)
        )
        im = _pil_resize(im, (nh, nw), "bilinear")
        h, w = nh, nw
    y, x = (h - size) // 2, (w - size) // 2
    return im[y : y + size, x : x + size]


def crop_to_multiple(im: np.ndarray, scale: int) -> np.ndarray:
    """HR cropped (top-left kept) to a multiple of ``scale``, the benchmark convention."""
    h, w = im.shape[:2]
    return im[: h - h % scale, : w - w % scale]


def bicubic_downscale(im: np.ndarray, scale: int) -> np.ndarray:
    """PIL bicubic downscale by ``scale`` of a uint8 image whose sides are multiples of ``scale``."""
    h, w = im.shape[:2]
    return _pil_resize(im, (h // scale, w // scale), "bicubic")


def sr_patch(
    hr: np.ndarray, rng: np.random.Generator, patch: int, scale: int, augment: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """A random aligned ``(lr, hr)`` pair (uint8): an LR window of ``patch`` pixels of the PIL-bicubic
    downscale of ``hr`` (cropped to a multiple of ``scale``), the HR window ``scale`` times larger,
    with a random horizontal flip, vertical flip and transposition when ``augment``.

    Only a window with a two-pixel LR margin is downscaled (the support of the widened bicubic
    kernel is two LR pixels), which reproduces the whole image's downscale exactly.
    """
    hr = crop_to_multiple(hr, scale)
    lh, lw = hr.shape[0] // scale, hr.shape[1] // scale
    if min(lh, lw) < patch:
        raise _UnusableImageError(f"its LR size {lh}x{lw} is smaller than data.patch_size {patch}")
    y, x = int(rng.integers(0, lh - patch + 1)), int(rng.integers(0, lw - patch + 1))
    m = 2
    y0, x0, y1, x1 = max(y - m, 0), max(x - m, 0), min(y + patch + m, lh), min(x + patch + m, lw)
    window = bicubic_downscale(hr[y0 * scale : y1 * scale, x0 * scale : x1 * scale], scale)
    lr_c = window[y - y0 : y - y0 + patch, x - x0 : x - x0 + patch]
    hr_c = hr[y * scale : (y + patch) * scale, x * scale : (x + patch) * scale]
    if augment:
        flips = rng.integers(0, 2, size=3)
        if flips[0]:
            lr_c, hr_c = lr_c[:, ::-1], hr_c[:, ::-1]
        if flips[1]:
            lr_c, hr_c = lr_c[::-1], hr_c[::-1]
        if flips[2]:
            lr_c, hr_c = lr_c.transpose(1, 0, 2), hr_c.transpose(1, 0, 2)
    return np.ascontiguousarray(lr_c), np.ascontiguousarray(hr_c)


# --------------------------------------------------------------------------- grain transforms


def _mark_flags_parsed() -> None:
    # grain's worker processes read absl flags; a program that is not an absl app never parses
    # them, and grain then raises UnparsedFlagAccessError. Their defaults are what we want.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _GlobalPosition(grain.transforms.Map):
    """Local element ``j`` -> global example ``g``: row ``rows.start + j % L`` of global batch ``j // L``."""

    def __init__(self, global_batch: int, rows: slice):
        self.global_batch, self.start, self.local = global_batch, rows.start, rows.stop - rows.start

    def map(self, j):
        step, r = divmod(int(j), self.local)
        return step * self.global_batch + self.start + r


class _Reader:
    """``order[g]``'s file, decoded and prepared; unusable files are replaced by the following records."""

    def __init__(self, paths: Sequence[str], seed: int, channels: int, prepare: Callable):
        self.paths = list(paths)
        self.seed, self.channels, self.prepare = seed, channels, prepare
        self.order = grain.MapDataset.range(len(self.paths)).shuffle(seed=seed).repeat()
        self._warned: set[str] = set()

    def read(self, g: int) -> tuple[int, Any, int]:
        """``(record index, prepared example, number of records skipped)``."""
        rng = np.random.default_rng([self.seed, int(g)])
        for k in range(MAX_CONSECUTIVE_BAD + 1):
            idx = int(self.order[int(g) + k])
            path = self.paths[idx]
            try:
                return idx, self.prepare(decode_image(path, self.channels), rng), k
            except (OSError, ValueError, SyntaxError, _UnusableImageError) as e:
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(
                        f"skipping unusable image {path} ({type(e).__name__}: {e}); "
                        "the next record of the order takes its place",
                        CorruptImageWarning,
                        stacklevel=2,
                    )
        raise DataError(
            f"more than {MAX_CONSECUTIVE_BAD} consecutive unusable images from example {g} on "
            f"(last: {self.paths[idx]!r}); check the data folder"
        )


class _ClassifyExample(grain.transforms.Map):
    def __init__(self, paths, labels, seed, channels, size, augment, crop_scale, crop_ratio, hflip, crop_fraction):
        self.labels = np.asarray(labels, np.int32)
        self.size, self.augment, self.hflip = size, augment, hflip
        self.crop_scale, self.crop_ratio, self.crop_fraction = tuple(crop_scale), tuple(crop_ratio), crop_fraction
        self.reader = _Reader(paths, seed, channels, self._prepare)

    def _prepare(self, im, rng):
        if self.augment:
            im = random_resized_crop(im, rng, self.size, self.crop_scale, self.crop_ratio)
        else:
            im = resize_center_crop(im, self.size, self.crop_fraction)
        if self.hflip and rng.random() < 0.5:
            im = im[:, ::-1]
        return im

    def map(self, g):
        idx, im, skipped = self.reader.read(g)
        return {
            "image": np.ascontiguousarray(im, dtype=np.float32) / 255.0,
            "label": self.labels[idx],
            "skipped": np.int32(skipped),
        }


class _SRExample(grain.transforms.Map):
    def __init__(self, paths, seed, patch, scale, augment):
        self.patch, self.scale, self.augment = patch, scale, augment
        self.reader = _Reader(paths, seed, 3, self._prepare)

    def _prepare(self, im, rng):
        return sr_patch(im, rng, self.patch, self.scale, self.augment)

    def map(self, g):
        _, (lr, hr), skipped = self.reader.read(g)
        return {
            "lr": lr.astype(np.float32) / 255.0,
            "hr": hr.astype(np.float32) / 255.0,
            "skipped": np.int32(skipped),
        }


@dataclasses.dataclass
class GrainSource:
    """A training stream over a per-example grain transform (``g -> dict of arrays``).

    :meth:`batch` reads any batch by random access (used for the model's example input and by
    tests); :meth:`iterator` is the prefetching stream the trainer consumes, whose
    ``get_state()``/``set_state()`` round-trips through the checkpoint.
    """

    example: grain.transforms.Map
    batch_size: int
    steps: int
    workers: int = 0
    read_threads: int = 2
    prefetch_batches: int = 2

    def position(self, step: int) -> dict[str, int]:
        return {"step": int(step)}

    def dataset(self, rows: slice | None = None) -> grain.MapDataset:
        """Local batches of ``rows`` (default all rows) of global batches ``0 .. steps - 1``."""
        rows = rows or slice(0, self.batch_size)
        local = rows.stop - rows.start
        return (
            grain.MapDataset.range(self.steps * local)
            .map(_GlobalPosition(self.batch_size, rows))
            .map(self.example)
            .batch(local, drop_remainder=True)
        )

    def batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        return self.dataset(rows)[int(step)]

    def iterator(self, rows: slice | None = None, state: dict | None = None):
        local = (rows or slice(0, self.batch_size)).stop - (rows or slice(0, self.batch_size)).start
        ds = self.dataset(rows).to_iter_dataset(
            grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.prefetch_batches * local)
        )
        if self.workers > 0:
            _mark_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=1))
        it = iter(ds)
        if state is not None:
            it.set_state(state)
        return it


# --------------------------------------------------------------------------- builders from a config


def classify_folder_source(paths, labels, data, *, seed: int, steps: int) -> GrainSource:
    example = _ClassifyExample(
        paths,
        labels,
        seed,
        data.channels,
        data.image_size,
        data.augment,
        data.crop_scale,
        data.crop_ratio,
        data.hflip,
        data.eval_crop_fraction,
    )
    return GrainSource(example, data.batch_size, steps, data.workers, data.read_threads)


def sr_folder_source(data, *, seed: int, steps: int) -> GrainSource:
    paths = list_images(data.train_dir, arg="data.train_dir")
    example = _SRExample(paths, seed, data.patch_size, data.scale, data.augment)
    return GrainSource(example, data.batch_size, steps, data.workers, data.read_threads)


def _decode_all(paths: Sequence[str], channels: int, arg: str) -> tuple[list[np.ndarray | None], int]:
    out: list[np.ndarray | None] = []
    bad = 0
    for p in paths:
        try:
            out.append(decode_image(p, channels))
        except (OSError, ValueError, SyntaxError) as e:
            warnings.warn(f"{arg}: skipping unreadable image {p} ({type(e).__name__}: {e})", CorruptImageWarning, 2)
            out.append(None)
            bad += 1
    return out, bad


def classify_eval_arrays(paths, labels, data, arg: str) -> dict[str, np.ndarray]:
    """The evaluation images decoded once into memory (resize + centre crop), unreadable ones left out."""
    ims, _ = _decode_all(paths, data.channels, arg)
    keep = [i for i, im in enumerate(ims) if im is not None]
    if not keep:
        raise DataError(f"{arg}: none of the {len(paths)} evaluation images could be read")
    x = np.stack([resize_center_crop(ims[i], data.image_size, data.eval_crop_fraction) for i in keep])
    return {"image": x.astype(np.float32) / 255.0, "label": np.asarray(labels, np.int32)[keep]}


def sr_eval_sets(folder: str, scale: int) -> list[dict[str, np.ndarray]]:
    """Whole-image evaluation sets of a Set5/Set14-layout folder, one per image shape.

    HR is every image except ``*_x<N>_lr`` files, cropped to a multiple of ``scale``; LR is its PIL
    bicubic downscale (the protocol above; the benchmark's own LR files are not used) and
    ``bicubic`` the PIL bicubic upscale of LR (the baseline, uint8). Arrays are ``lr``/``hr`` in
    [0, 1]. Images of equal shape share one set (one compilation per shape).
    """
    paths = list_images(folder, arg="data.eval_dir", skip_lr=True)
    ims, _ = _decode_all(paths, 3, "data.eval_dir")
    groups: dict[tuple[int, int], dict[str, list]] = {}
    for im in ims:
        if im is None:
            continue
        hr = crop_to_multiple(im, scale)
        if min(hr.shape[:2]) < 2 * scale:
            continue
        lr = bicubic_downscale(hr, scale)
        g = groups.setdefault(hr.shape[:2], {"lr": [], "hr": [], "bicubic": []})
        g["lr"].append(lr.astype(np.float32) / 255.0)
        g["hr"].append(hr.astype(np.float32) / 255.0)
        g["bicubic"].append(_pil_resize(lr, hr.shape[:2], "bicubic"))
    if not groups:
        raise DataError(f"data.eval_dir: no usable evaluation image in {folder!r}")
    return [{k: np.stack(v) for k, v in g.items()} for _, g in sorted(groups.items())]
