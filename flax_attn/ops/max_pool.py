"""``torch.nn.MaxPoolNd`` on channels-last arrays (floor mode, implicit ``-inf`` padding)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

__all__ = ["max_pool"]


def _tuple(where: str, name: str, v, n: int) -> tuple[int, ...]:
    out = (int(v),) * n if isinstance(v, int) else tuple(int(i) for i in v)
    if len(out) != n:
        raise ValueError(f"{where}: `{name}` must be an int or a {n}-tuple, got {v!r}")
    return out


def max_pool(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    *,
    spatial_dims: int | None = None,
) -> jax.Array:
    """``torch.nn.functional.max_pool{1,2,3}d`` on ``(B, *spatial, C)`` with ``ceil_mode=False``.

    Output size per axis is ``floor((L + 2 * padding - kernel) / stride) + 1`` as in PyTorch, so a
    trailing odd row is dropped by a 2x2 pool; padding never wins the max (it is ``-inf``).

    Args:
      x: ``(B, *spatial, C)``.
      kernel_size, stride, padding: as in torch; ``stride`` defaults to ``kernel_size``.
      spatial_dims: number of spatial axes (default: from a tuple ``kernel_size``, else ``x.ndim - 2``).
    """
    n = spatial_dims or (len(kernel_size) if not isinstance(kernel_size, int) else x.ndim - 2)
    where = "max_pool"
    if x.ndim != n + 2:
        raise ValueError(
            f"{where}: input must be {n + 2}-D (batch, *spatial[{n}], channels), got shape {x.shape}"
        )
    k = _tuple(where, "kernel_size", kernel_size, n)
    s = k if stride is None else _tuple(where, "stride", stride, n)
    p = _tuple(where, "padding", padding, n)
    for axis, (kk, pp) in enumerate(zip(k, p)):
        if 2 * pp > kk:
            raise ValueError(
                f"{where}: padding {pp} must be at most half the kernel size {kk} (torch's rule)"
            )
        if x.shape[1 + axis] + 2 * pp < kk:
            raise ValueError(
                f"{where}: spatial axis {axis} of size {x.shape[1 + axis]} (padding {pp}) "
                f"is smaller than the "
                f"kernel {kk}; input shape {x.shape}"
            )
    # A concrete (numpy) identity: with a traced one JAX no longer sees the max monoid and the
    # window reduction loses its VJP under jit.
    init = np.array(-np.inf, dtype=x.dtype)
    return jax.lax.reduce_window(
        x, init, jax.lax.max, (1, *k, 1), (1, *s, 1), ((0, 0), *[(pp, pp) for pp in p], (0, 0))
    )
