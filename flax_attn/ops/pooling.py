"""PyTorch-exact adaptive pooling for NHWC images.

PyTorch's adaptive bins are ``[floor(i * in / out), ceil((i + 1) * in / out))``: they overlap when
``out`` does not divide ``in``. Both poolings are separable over H and W, so each axis is reduced
with a small ``(out, in)`` bin matrix; nothing of size ``H * W * out_h * out_w`` is formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.ops.checks import check_rank
from flax_attn.ops.dtypes import statistics_dtype

__all__ = ["adaptive_avg_pool2d", "adaptive_max_pool2d"]


def _bins(in_size: int, out_size: int) -> np.ndarray:
    """Boolean ``(out, in)`` matrix, True where input index j falls in output bin i."""
    i = np.arange(out_size)
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil
    j = np.arange(in_size)
    return (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])


def _pair(where, output_size, x):
    out = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(out) != 2:
        raise ValueError(f"{where}: `output_size` must be an int or (height, width), got {output_size!r}")
    # None keeps the input size, as in PyTorch.
    out = tuple(x.shape[1 + a] if o is None else int(o) for a, o in enumerate(out))
    if min(out) <= 0:
        raise ValueError(f"{where}: `output_size` must be positive, got {output_size!r}")
    return out


def adaptive_avg_pool2d(x: jax.Array, output_size: int | tuple[int | None, int | None]) -> jax.Array:
    """``torch.nn.functional.adaptive_avg_pool2d`` on ``(B, H, W, C)``; returns ``(B, oh, ow, C)``."""
    check_rank("adaptive_avg_pool2d", "x", x, 4, "(batch, height, width, channels)")
    oh, ow = _pair("adaptive_avg_pool2d", output_size, x)
    h, w = x.shape[1:3]
    if (oh, ow) == (1, 1):
        return jnp.mean(x, axis=(1, 2), keepdims=True, dtype=statistics_dtype(x.dtype)).astype(x.dtype)
    sdt = statistics_dtype(x.dtype)
    bh = _bins(h, oh).astype(sdt)
    bw = _bins(w, ow).astype(sdt)
    bh /= bh.sum(1, keepdims=True)
    bw /= bw.sum(1, keepdims=True)
    y = jnp.einsum("ih,bhwc->biwc", jnp.asarray(bh), x.astype(sdt), precision="highest")
    y = jnp.einsum("jw,biwc->bijc", jnp.asarray(bw), y, precision="highest")
    return y.astype(x.dtype)


def _masked_max(x: jax.Array, bins: np.ndarray, axis: int) -> jax.Array:
    # x moved so that `axis` is last: (..., in) -> (..., out)
    xm = jnp.moveaxis(x, axis, -1)
    vals = jnp.where(jnp.asarray(bins), xm[..., None, :], -jnp.inf)
    return jnp.moveaxis(jnp.max(vals, axis=-1), -1, axis)


def adaptive_max_pool2d(x: jax.Array, output_size: int | tuple[int | None, int | None]) -> jax.Array:
    """``torch.nn.functional.adaptive_max_pool2d`` on ``(B, H, W, C)``; returns ``(B, oh, ow, C)``."""
    check_rank("adaptive_max_pool2d", "x", x, 4, "(batch, height, width, channels)")
    oh, ow = _pair("adaptive_max_pool2d", output_size, x)
    h, w = x.shape[1:3]
    if (oh, ow) == (1, 1):
        return jnp.max(x, axis=(1, 2), keepdims=True)
    y = _masked_max(x, _bins(h, oh), axis=1)
    return _masked_max(y, _bins(w, ow), axis=2)
