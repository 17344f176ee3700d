"""PyTorch-exact ``F.interpolate`` for NHWC images (nearest, bilinear with and without align_corners).

``jax.image.resize`` antialiases when downsampling and has no ``align_corners``; these follow
PyTorch's index arithmetic exactly, including the use of ``1 / scale_factor`` (not ``in / out``)
when a scale factor is given.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.ops._checks import check_rank

__all__ = ["interpolate"]


def _out_size(name, in_size, size, scale_factor):
    if size is not None:
        return int(size), in_size / int(size)
    # PyTorch (recompute_scale_factor=None) keeps the user's factor for the index arithmetic.
    return int(math.floor(in_size * scale_factor)), 1.0 / scale_factor


def _nearest_index(in_size: int, out_size: int, scale: float) -> np.ndarray:
    # torch: src = min(floor(dst * scale), in - 1), computed in float32
    idx = np.floor(np.arange(out_size, dtype=np.float32) * np.float32(scale)).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def _linear_coords(in_size: int, out_size: int, scale: float, align_corners: bool, dtype=np.float32):
    # torch evaluates the source coordinates in the input's accumulation type: float32 for 16- and
    # 32-bit inputs, float64 for float64 ones.
    f = np.dtype(dtype).type
    dst = np.arange(out_size, dtype=dtype)
    if align_corners:
        ratio = f((in_size - 1) / (out_size - 1)) if out_size > 1 else f(0.0)
        src = dst * ratio
    else:
        src = (dst + f(0.5)) * f(scale) - f(0.5)
        src = np.maximum(src, f(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0).astype(dtype)
    return i0, i1, frac


def _lerp_axis(x: jax.Array, axis: int, i0, i1, frac) -> jax.Array:
    shape = [1] * x.ndim
    shape[axis] = -1
    w = jnp.asarray(frac).reshape(shape).astype(x.dtype)
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    return a * (1 - w) + b * w


def interpolate(
    x: jax.Array,
    size: int | tuple[int, int] | None = None,
    scale_factor: float | tuple[float, float] | None = None,
    mode: str = "nearest",
    align_corners: bool | None = None,
) -> jax.Array:
    """``torch.nn.functional.interpolate`` on an NHWC batch.

    Args:
      x: ``(B, H, W, C)``.
      size: output ``(H, W)`` (or one int for both).
      scale_factor: multiplier(s) for H and W; exactly one of ``size``/``scale_factor``.
      mode: ``"nearest"`` or ``"bilinear"``.
      align_corners: only for ``"bilinear"``; PyTorch's default is False.

    Returns:
      ``(B, Ho, Wo, C)`` in the dtype of ``x``.
    """
    check_rank("interpolate", "x", x, 4, "(batch, height, width, channels)")
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give exactly one of `size` and `scale_factor`")
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"interpolate: `mode` must be 'nearest' or 'bilinear', got {mode!r}")
    if mode == "nearest" and align_corners is not None:
        raise ValueError("interpolate: `align_corners` only applies to mode='bilinear'")
    sizes = (size, size) if isinstance(size, int) else size
    factors = (scale_factor, scale_factor) if isinstance(scale_factor, (int, float)) else scale_factor
    out = x
    for axis in (1, 2):
        in_size = x.shape[axis]
        o, scale = _out_size(
            "size", in_size, None if sizes is None else sizes[axis - 1],
            None if factors is None else factors[axis - 1],
        )
        if o <= 0:
            raise ValueError(f"interpolate: output size along axis {axis} would be {o} for input {x.shape}")
        if mode == "nearest":
            out = jnp.take(out, jnp.asarray(_nearest_index(in_size, o, scale)), axis=axis)
        else:
            cdt = np.float64 if x.dtype == jnp.float64 else np.float32
            out = _lerp_axis(out, axis, *_linear_coords(in_size, o, scale, bool(align_corners), cdt))
    return out
