"""Swin's window geometry, shared by the window-attention reference and its kernel.

Facts of microsoft/Swin-Transformer ``models/swin_transformer.py``: windows are row-major tiles of
the feature map with row-major tokens, the relative position index addresses the
``((2 Wh - 1)(2 Ww - 1), heads)`` bias table, and after the cyclic shift the map splits into 3 x 3
regions whose tokens must not attend across (Swin's ``-100`` mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["relative_position_index", "shift_regions", "window_partition", "window_reverse"]


def relative_position_index(window_size: tuple[int, int]) -> np.ndarray:
    """Swin's ``relative_position_index``: ``(N, N)`` ints into the ``((2Wh-1)(2Ww-1), heads)`` table."""
    wh, ww = window_size
    ys, xs = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
    flat = np.stack([ys.reshape(-1), xs.reshape(-1)])  # (2, N)
    rel = flat[:, :, None] - flat[:, None, :]  # (2, N, N): query minus key
    return ((rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)).astype(np.int32)


def window_partition(x: jax.Array, window_size: int) -> jax.Array:
    """``(B, H, W, ...)`` -> ``(B, nH * nW, ws * ws, ...)``: windows in row-major order, tokens row-major."""
    b, h, w = x.shape[:3]
    rest = x.shape[3:]
    ws = window_size
    x = x.reshape(b, h // ws, ws, w // ws, ws, *rest)
    x = jnp.moveaxis(x, 3, 2)  # (B, nH, nW, ws, ws, ...)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws, *rest)


def window_reverse(windows: jax.Array, window_size: int, h: int, w: int) -> jax.Array:
    """Inverse of :func:`window_partition`."""
    b = windows.shape[0]
    rest = windows.shape[3:]
    ws = window_size
    x = windows.reshape(b, h // ws, w // ws, ws, ws, *rest)
    x = jnp.moveaxis(x, 2, 3)
    return x.reshape(b, h, w, *rest)


def shift_regions(h: int, w: int, window_size: int, shift_size: int) -> np.ndarray:
    """Per window of one rolled image, the Swin region (0..8) of each token: ``(nW, N)`` float32.

    Two tokens of a window get Swin's ``-100`` exactly when their regions differ.
    """
    ws, s = window_size, shift_size
    region = np.zeros((h, w), np.float32)
    bounds = (slice(0, -ws), slice(-ws, -s), slice(-s, None))
    for i, hs in enumerate(bounds):
        for j, wsl in enumerate(bounds):
            region[hs, wsl] = 3 * i + j
    # numpy, not window_partition: the regions are a trace-time constant.
    return region.reshape(h // ws, ws, w // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)
