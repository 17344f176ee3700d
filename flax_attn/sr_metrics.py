"""Super-resolution evaluation with the benchmark protocol of the EDSR code base (used by A2N).

Protocol (what the released A2N numbers are measured with):

* HR is cropped to a multiple of ``scale`` (top-left corner kept);
* LR is the PIL bicubic downscale of the cropped HR (``Image.resize(..., Image.BICUBIC)``) on 8-bit
  RGB;
* the model sees RGB in ``[0, 255]``; SR is clipped to ``[0, 255]`` and rounded;
* PSNR is computed on the luma Y of ITU-R BT.601 (``16 + (65.738 R + 129.057 G + 25.064 B) / 256``
  on 0..255 values, not rounded), with ``scale`` pixels shaved from every border, peak 255;
* SSIM (:func:`ssim_y`) on the same Y with the 11x11 Gaussian window (sigma 1.5) of Wang et al. and
  valid filtering (equal to ``skimage.metrics.structural_similarity`` with ``gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255``).

This is the package's one implementation of these metrics: the training library's evaluation
(:mod:`flax_attn.training.metrics`) uses it on JAX batches inside ``jit``, the A2N checks on NumPy
images in float64. Pillow is imported only by the functions that resize.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "bicubic_downscale",
    "bicubic_upscale",
    "crop_to_scale",
    "evaluate_sr",
    "psnr_y",
    "quantize",
    "rgb_to_y",
    "ssim_y",
]


def _check_rgb(where: str, name: str, img) -> None:
    if img.ndim < 3 or img.shape[-1] != 3:
        raise ValueError(f"{where}: `{name}` must be an (H, W, 3) RGB image or a batch of them, got shape {img.shape}")


def _as_float(img):
    """JAX arrays stay JAX arrays (float32 or wider, traceable under ``jit``); anything else becomes
    a float64 NumPy array, the precision of the protocol's reference numbers."""
    if isinstance(img, jax.Array):
        return img.astype(jnp.promote_types(img.dtype, jnp.float32))
    return np.asarray(img, dtype=np.float64)


def rgb_to_y(img):
    """ITU-R BT.601 luma of RGB in ``[0, 255]``: ``(..., 3) -> (...)`` in ``[16, 235]``.

    NumPy input gives float64 NumPy; a JAX array gives a JAX array (float32 unless wider).
    """
    img = _as_float(img)
    if img.shape[-1] != 3:
        raise ValueError(f"rgb_to_y: last axis must be RGB (3), got shape {img.shape}")
    return 16.0 + (65.738 * img[..., 0] + 129.057 * img[..., 1] + 25.064 * img[..., 2]) / 256.0


def quantize(img: np.ndarray) -> np.ndarray:
    """Clip to ``[0, 255]`` and round to ``uint8``, as an SR output is saved as an image."""
    return np.round(np.clip(np.asarray(img, dtype=np.float64), 0.0, 255.0)).astype(np.uint8)


def _y_pair(where: str, sr, hr, shave: int):
    """Both images' Y channels with ``shave`` border pixels removed, after the shared argument checks."""
    sr, hr = _as_float(sr), _as_float(hr)
    _check_rgb(where, "sr", sr)
    if sr.shape != hr.shape:
        raise ValueError(f"{where}: `sr` {sr.shape} and `hr` {hr.shape} must have the same shape")
    h, w = sr.shape[-3:-1]
    if shave < 0 or 2 * shave >= min(h, w):
        raise ValueError(f"{where}: `shave`={shave} leaves nothing of a {h}x{w} image")
    ys = rgb_to_y(sr), rgb_to_y(hr)
    if shave:
        ys = tuple(y[..., shave : h - shave, shave : w - shave] for y in ys)
    return ys


def psnr_y(sr, hr, shave: int):
    """PSNR (dB, peak 255) on the BT.601 Y channel with ``shave`` pixels removed at every border.

    Args:
      sr, hr: ``(H, W, 3)`` RGB in ``[0, 255]`` of the same shape (``sr`` already quantized for the
        benchmark protocol), or batches ``(..., H, W, 3)`` of them.
      shave: border width, the scale factor in the benchmark protocol.

    Returns:
      NumPy inputs: the PSNR in float64, a ``float`` for one image (``inf`` for identical images).
      JAX inputs (e.g. inside ``jit``): a ``(...)`` array per image; the mean squared error is floored
      at 1e-10, so that a perfect image keeps an averaged metric finite.
    """
    ya, yb = _y_pair("psnr_y", sr, hr, shave)
    if isinstance(ya, jax.Array) or isinstance(yb, jax.Array):
        mse = jnp.mean(jnp.square(ya - yb), axis=(-2, -1))
        return 10.0 * jnp.log10(255.0**2 / jnp.maximum(mse, 1e-10))
    mse = np.mean((ya - yb) ** 2, axis=(-2, -1))
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(255.0**2 / mse)
    return float(out) if out.ndim == 0 else out


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    g /= g.sum()
    return g.astype(np.float32)


def _filter_valid(x: jax.Array, g: np.ndarray) -> jax.Array:
    # Separable valid filtering over the last two axes (static slices: no convolution op).
    k = jnp.asarray(g)
    n = len(g)
    h = sum(k[i] * x[..., i : x.shape[-2] - n + 1 + i, :] for i in range(n))
    return sum(k[i] * h[..., i : h.shape[-1] - n + 1 + i] for i in range(n))


def ssim_y(sr, hr, shave: int) -> jax.Array:
    """SSIM on the BT.601 Y channel (window and constants above), per image, as a JAX array.

    Args:
      sr, hr: ``(..., H, W, 3)`` RGB in ``[0, 255]`` of the same shape, NumPy or JAX (traceable).
      shave: border width (the scale factor).
    """
    x, y = (jnp.asarray(v) for v in _y_pair("ssim_y", sr, hr, shave))
    g = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mx * mx
    syy = _filter_valid(y * y, g) - my * my
    sxy = _filter_valid(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return jnp.mean(s, axis=(-2, -1))


def crop_to_scale(hr: np.ndarray, scale: int) -> np.ndarray:
    """Crop ``(H, W, C)`` to ``(H - H % scale, W - W % scale, C)``."""
    h, w = hr.shape[:2]
    return hr[: h - h % scale, : w - w % scale]


def _pil_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if img.dtype != np.uint8:
        raise ValueError(f"PIL bicubic resize expects a uint8 image, got dtype {img.dtype}")
    return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """PIL bicubic downscale of a uint8 ``(H, W, 3)`` image whose sides are multiples of ``scale``."""
    _check_rgb("bicubic_downscale", "hr", hr)
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"bicubic_downscale: image {h}x{w} is not a multiple of scale {scale}; crop_to_scale first")
    return _pil_resize(hr, (w // scale, h // scale))


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """PIL bicubic upscale by ``scale`` (the usual 'Bicubic' baseline row of SR tables)."""
    _check_rgb("bicubic_upscale", "lr", lr)
    h, w = lr.shape[:2]
    return _pil_resize(lr, (w * scale, h * scale))


def evaluate_sr(
    upscale: Callable[[np.ndarray], np.ndarray],
    hr_images: Iterable[np.ndarray],
    scale: int,
) -> list[float]:
    """Y-PSNR of ``upscale`` on each HR image with the protocol above.

    Args:
      upscale: ``lr (h, w, 3) float32 in [0, 255] -> sr (scale*h, scale*w, 3)`` (any float range; it
        is quantized here).
      hr_images: uint8 ``(H, W, 3)`` RGB images.
      scale: the SR factor.

    Returns:
      PSNR per image in dB (average them for the table value).
    """
    out = []
    for hr in hr_images:
        hr = crop_to_scale(np.asarray(hr), scale)
        lr = bicubic_downscale(hr, scale)
        sr = np.asarray(upscale(lr.astype(np.float32)))
        if sr.shape != hr.shape:
            raise ValueError(f"evaluate_sr: `upscale` returned shape {sr.shape} for an HR image of shape {hr.shape}")
        out.append(psnr_y(quantize(sr), hr, scale))
    return out
