"""``torch.nn.MaxPoolNd`` on channels-last arrays (floor mode, implicit ``-inf`` padding).

The forward is one ``reduce_window``. Its autodiff gradient would be ``select_and_scatter``, a
serial loop on XLA:CPU and slow on TPU, so the derivative is given by hand (``custom_jvp``): the
tangent of each output is the tangent of the *first* input in its window (row-major order, the
element PyTorch's ``argmax`` picks) that attains the max. That is ``k^d`` strided static slices,
compares and selects, and its transpose (the gradient) is ``k^d`` interior-padded ``pad``s of a
masked cotangent: dense, elementwise work that vectorises on every backend. Under differentiation
the rule computes the max from the same slices (one pass yields the value and the winner), so the
``reduce_window`` runs only when nothing is differentiated.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["max_pool"]


def _tuple(where: str, name: str, v, n: int) -> tuple[int, ...]:
    out = (int(v),) * n if isinstance(v, int) else tuple(int(i) for i in v)
    if len(out) != n:
        raise ValueError(f"{where}: `{name}` must be an int or a {n}-tuple, got {v!r}")
    return out


def _reduce(x, k, s, p):
    # A concrete (numpy) identity: with a traced one JAX no longer sees the max monoid.
    init = np.array(-np.inf, dtype=x.dtype)
    pads = ((0, 0), *[(pp, pp) for pp in p], (0, 0))
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, *k, 1), (1, *s, 1), pads)


def _window_slices(xp, k, s, out_spatial):
    """The ``prod(k)`` strided views ``xp[:, o0::s0, o1::s1, ..., :]`` cut to the output size."""
    for offs in itertools.product(*(range(kk) for kk in k)):
        start = (0, *offs, 0)
        limit = (xp.shape[0], *(o + (n - 1) * ss + 1 for o, n, ss in zip(offs, out_spatial, s)), xp.shape[-1])
        yield jax.lax.slice(xp, start, limit, (1, *s, 1))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, k, s, p):
    return _reduce(x, k, s, p)


@_max_pool.defjvp
def _max_pool_jvp(k, s, p, primals, tangents):
    (x,), (t,) = primals, tangents
    pads = ((0, 0), *[(pp, pp) for pp in p], (0, 0))
    out_spatial = tuple((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip(x.shape[1:-1], k, s, p))
    xs = _window_slices(jnp.pad(x, pads, constant_values=-jnp.inf), k, s, out_spatial)
    ts = _window_slices(jnp.pad(t, pads), k, s, out_spatial)
    # One running (max, tangent) pair over the window in row-major order, updated as PyTorch's
    # kernel does (`val > max || isnan(val)`): the first maximum wins, a NaN always does. The
    # winner comes out of the compares themselves: an equality test against a separately computed
    # max lost gradients in a jitted network (non_local_mnist_net: the max and the compared inputs
    # need not be bitwise equal once XLA fuses the producer of `x` into both), whereas here exactly
    # one input per window always gets the tangent.
    y, ty = next(xs), next(ts)
    for xo, to in zip(xs, ts):
        better = (xo > y) | jnp.isnan(xo)
        y = jnp.where(better, xo, y)
        ty = jnp.where(better, to, ty)
    return y, ty


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
    trailing odd row is dropped by a 2x2 pool; padding never wins the max (it is ``-inf``). The
    gradient of an output goes to the first maximal input of its window, as in PyTorch, and is
    computed without ``select_and_scatter`` (see the module docstring).

    Args:
      x: ``(B, *spatial, C)``.
      kernel_size, stride, padding: as in torch; ``stride`` defaults to ``kernel_size``.
      spatial_dims: number of spatial axes (default: from a tuple ``kernel_size``, else ``x.ndim - 2``).
    """
    n = spatial_dims or (len(kernel_size) if not isinstance(kernel_size, int) else x.ndim - 2)
    where = "max_pool"
    if x.ndim != n + 2:
        raise ValueError(f"{where}: input must be {n + 2}-D (batch, *spatial[{n}], channels), got shape {x.shape}")
    k = _tuple(where, "kernel_size", kernel_size, n)
    s = k if stride is None else _tuple(where, "stride", stride, n)
    p = _tuple(where, "padding", padding, n)
    for axis, (kk, ss, pp) in enumerate(zip(k, s, p)):
        if kk <= 0 or ss <= 0 or pp < 0:
            raise ValueError(
                f"{where}: kernel_size and stride must be positive and padding non-negative, got "
                f"kernel_size={kernel_size!r}, stride={stride!r}, padding={padding!r}"
            )
        if 2 * pp > kk:
            raise ValueError(f"{where}: padding {pp} must be at most half the kernel size {kk} (torch's rule)")
        if x.shape[1 + axis] + 2 * pp < kk:
            raise ValueError(
                f"{where}: spatial axis {axis} of size {x.shape[1 + axis]} (padding {pp}) "
                f"is smaller than the "
                f"kernel {kk}; input shape {x.shape}"
            )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{where}: `x` must be floating point (the padding is -inf), got dtype {x.dtype}")
    return _max_pool(x, k, s, p)
