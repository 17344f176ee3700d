"""PyTorch-exact ``F.interpolate`` for NHWC images (nearest, bilinear with and without align_corners).

``jax.image.resize`` antialiases when downsampling and has no ``align_corners``; these follow
PyTorch's index arithmetic exactly, including the use of ``1 / scale_factor`` (not ``in / out``)
when a scale factor is given.

Each axis is resized by a static ``(out, in)`` interpolation matrix built in NumPy from those
indices: integer nearest upsampling becomes a broadcast (repeat), a regular nearest subsampling a
strided slice, and everything else one small matmul per axis. None of these lowers to a gather, so
the gradient needs no scatter-add (a serial loop on XLA:CPU and TPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.ops.checks import check_rank
from flax_attn.ops.dtypes import statistics_dtype

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


def _nearest_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    m = np.zeros((out_size, in_size), np.float32)  # exact 0/1 in any dtype
    m[np.arange(out_size), _nearest_index(in_size, out_size, scale)] = 1.0
    return m


def _linear_matrix(in_size: int, out_size: int, scale: float, align_corners: bool, dtype=np.float32) -> np.ndarray:
    i0, i1, frac = _linear_coords(in_size, out_size, scale, align_corners, dtype)
    m = np.zeros((out_size, in_size), dtype)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), np.dtype(dtype).type(1) - frac)
    np.add.at(m, (rows, i1), frac)
    return m


def _apply_axis(x: jax.Array, axis: int, m: np.ndarray) -> jax.Array:
    """``out[..., o, ...] = sum_i m[o, i] x[..., i, ...]`` along ``axis``: a static ``(out, in)`` matrix."""
    out_size, in_size = m.shape
    if out_size == in_size and np.array_equal(m, np.eye(in_size)):
        return x
    rows = m.argmax(axis=1)
    if np.count_nonzero(m) == out_size and np.all(m[np.arange(out_size), rows] == 1):
        # A pure selection (nearest): a repeat or a strided slice where the pattern allows; a
        # gather would transpose to a scatter.
        r = out_size // in_size
        if r * in_size == out_size and np.array_equal(rows, np.arange(out_size) // r):
            y = jnp.expand_dims(x, axis + 1)
            shape = list(y.shape)
            shape[axis + 1] = r
            y = jnp.broadcast_to(y, shape)
            return y.reshape(x.shape[:axis] + (out_size,) + x.shape[axis + 1 :])
        step = rows[1] - rows[0] if out_size > 1 else 1
        if step > 0 and np.array_equal(rows, rows[0] + step * np.arange(out_size)):
            return jax.lax.slice_in_dim(x, int(rows[0]), int(rows[-1]) + 1, int(step), axis=axis)
    # Otherwise a small dense matmul (as `jax.image.scale_and_translate` does): its transpose is
    # another matmul, where per-index gathers would transpose to a serial scatter-add.
    letters = "abcdefgh"[: x.ndim]
    spec = f"o{letters[axis]},{letters}->{letters[:axis]}o{letters[axis + 1 :]}"
    acc = statistics_dtype(x.dtype)
    y = jnp.einsum(spec, jnp.asarray(m, acc), x, precision="highest", preferred_element_type=acc)
    return y.astype(x.dtype)


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
            "size",
            in_size,
            None if sizes is None else sizes[axis - 1],
            None if factors is None else factors[axis - 1],
        )
        if o <= 0:
            raise ValueError(f"interpolate: output size along axis {axis} would be {o} for input {x.shape}")
        if mode == "nearest":
            m = _nearest_matrix(in_size, o, scale)
        else:
            m = _linear_matrix(in_size, o, scale, bool(align_corners), statistics_dtype(x.dtype))
        out = _apply_axis(out, axis, m)
    return out
