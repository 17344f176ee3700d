"""Super-resolution evaluation with the benchmark protocol of the EDSR code base (used by A2N).

Protocol (what the released A2N numbers are measured with):

* HR is cropped to a multiple of ``scale`` (top-left corner kept);
* LR is the PIL bicubic downscale of the cropped HR (``Image.resize(..., Image.BICUBIC)``) on 8-bit
  RGB;
* the model sees RGB in ``[0, 255]``; SR is clipped to ``[0, 255]`` and rounded;
* PSNR is computed on the luma Y of ITU-R BT.601 (``16 + (65.738 R + 129.057 G + 25.064 B) / 256``
  on 0..255 values, not rounded), with ``scale`` pixels shaved from every border, peak 255.

Pillow is imported only by the functions that resize.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

__all__ = [
    "bicubic_downscale",
    "bicubic_upscale",
    "crop_to_scale",
    "evaluate_sr",
    "psnr_y",
    "quantize",
    "rgb_to_y",
]


def _check_rgb(where: str, name: str, img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{where}: `{name}` must be an (H, W, 3) RGB image, got shape {img.shape}")


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of RGB in ``[0, 255]``: ``(..., 3) -> (...)`` float64 in ``[16, 235]``."""
    img = np.asarray(img, dtype=np.float64)
    if img.shape[-1] != 3:
        raise ValueError(f"rgb_to_y: last axis must be RGB (3), got shape {img.shape}")
    return 16.0 + (65.738 * img[..., 0] + 129.057 * img[..., 1] + 25.064 * img[..., 2]) / 256.0


def quantize(img: np.ndarray) -> np.ndarray:
    """Clip to ``[0, 255]`` and round to ``uint8``, as an SR output is saved as an image."""
    return np.round(np.clip(np.asarray(img, dtype=np.float64), 0.0, 255.0)).astype(np.uint8)


def psnr_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """PSNR (dB, peak 255) on the BT.601 Y channel with ``shave`` pixels removed at every border.

    Args:
      sr, hr: ``(H, W, 3)`` RGB in ``[0, 255]`` of the same shape (``sr`` already quantized).
      shave: border width, the scale factor in the benchmark protocol.
    """
    sr, hr = np.asarray(sr), np.asarray(hr)
    _check_rgb("psnr_y", "sr", sr)
    if sr.shape != hr.shape:
        raise ValueError(f"psnr_y: `sr` {sr.shape} and `hr` {hr.shape} must have the same shape")
    h, w = sr.shape[:2]
    if shave < 0 or 2 * shave >= min(h, w):
        raise ValueError(f"psnr_y: `shave`={shave} leaves nothing of a {h}x{w} image")
    diff = rgb_to_y(sr) - rgb_to_y(hr)
    if shave:
        diff = diff[shave:-shave, shave:-shave]
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


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
