"""2-D neighbourhood attention: every query attends to the ``k x k`` window of keys around it.

Two border conventions:

* ``"reflect"``: the window is centred on the query and positions outside the image are reflected
  back inside (``torch.nn.ReflectionPad2d`` followed by ``nn.Unfold``), as ACmix (arXiv 2111.14556)
  does. A query near the border can see the same key twice.
* ``"clamp"``: NATTEN's rule (Hassani et al., arXiv 2204.07143 / 2209.15001). Positions are split
  into ``dilation`` groups (``index % dilation``); inside its group a query's window of ``k`` keys
  is centred on it where possible and shifted inwards at the borders so that it stays inside the
  image: group position ``m`` of a group with ``L_g`` members starts at ``clip(m - k // 2, 0, L_g - k)``.

Layout is ``(batch, height, width, heads, head_dim)`` like :func:`jax.nn.dot_product_attention`.
The pure-XLA path here is the reference that the Pallas kernels in
:mod:`flax_attn.kernels.neighborhood` are tested against. It never materialises ACmix's unfolded
``(B, C * k^2, H, W)`` tensors: a static loop over the ``k`` window rows (offsets, not pixels)
gathers one window row of keys at a time (a transient of ``k``, not ``k^2``, copies of the input,
recomputed rather than saved for the backward pass), builds ``(B, Hq, Wq, heads, k^2)`` logits, and
accumulates the output row by row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.kernels.checks import BORDERS, check_neighborhood_args
from flax_attn.kernels.dispatch import resolve_implementation
from flax_attn.kernels.neighborhood import neighborhood_attention_pallas

__all__ = ["check_neighborhood_args", "neighborhood_attention", "neighborhood_indices"]

_WHERE = "neighborhood_attention"


def _clamp_starts(length: int, kernel_size: int, dilation: int, centres: np.ndarray) -> np.ndarray:
    """NATTEN window starts for the given centre positions (see the module docstring)."""
    r = kernel_size // 2
    group = centres % dilation
    m = centres // dilation
    group_len = (length - group + dilation - 1) // dilation
    return np.clip(m - r, 0, group_len - kernel_size) * dilation + group


def neighborhood_indices(
    length: int, kernel_size: int, dilation: int = 1, stride: int = 1, border: str = "reflect"
) -> np.ndarray:
    """Key index along one axis for every (window offset, query): an int array ``(kernel_size, n_queries)``.

    Query ``i`` sits at key position ``i * stride``; ``n_queries = ceil(length / stride)``.
    """
    centres = np.arange(0, length, stride)
    t = np.arange(kernel_size)[:, None]
    if border == "reflect":
        pos = centres[None, :] + (t - kernel_size // 2) * dilation
        pos = np.where(pos < 0, -pos, pos)
        pos = np.where(pos > length - 1, 2 * (length - 1) - pos, pos)
        return pos.astype(np.int32)
    if border == "clamp":
        return (_clamp_starts(length, kernel_size, dilation, centres)[None, :] + t * dilation).astype(np.int32)
    raise ValueError(f"{_WHERE}: `border` must be one of {BORDERS}, got {border!r}")


def _window_tables(x, h, w, kernel_size, dilation, stride, border):
    """(source array, row table (k, Hq), column table (Wq, k)): ``source[:, rows[a]][:, :, cols]``
    is window row ``a`` for every query, ``(B, Hq, Wq, k, heads, d)``."""
    rows = neighborhood_indices(h, kernel_size, dilation, stride, border)
    cols = neighborhood_indices(w, kernel_size, dilation, stride, border).T
    if border == "reflect":
        # Index the reflect-padded image with plain shifts (cheaper gathers than reflected indices).
        p = (kernel_size // 2) * dilation
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0), (0, 0)), mode="reflect")
        t = np.arange(kernel_size) * dilation
        rows = (np.arange(rows.shape[1])[None, :] * stride + t[:, None]).astype(np.int32)
        cols = (np.arange(cols.shape[0])[:, None] * stride + t[None, :]).astype(np.int32)
    return x, jnp.asarray(rows), jnp.asarray(cols)


def _neighborhood_xla(q, k, v, *, kernel_size, dilation, stride, border, scale, return_weights):
    _, h, w = k.shape[:3]
    qf = q.astype(jnp.float32) * jnp.float32(scale)
    ksrc, rows, cols = _window_tables(k, h, w, kernel_size, dilation, stride, border)
    vsrc, _, _ = _window_tables(v, h, w, kernel_size, dilation, stride, border)

    def window_row(src, r):
        return jnp.take(jnp.take(src, r, axis=1), cols, axis=2).astype(jnp.float32)

    # A scan over window rows makes them strictly sequential, so only one row of gathered keys
    # (k copies of the input, not k^2) is alive at a time; the checkpoint recomputes it in the
    # backward pass instead of saving k of them.
    @jax.checkpoint
    def logits_row(carry, r):
        return carry, jnp.einsum("bhwnd,bhwknd->bhwnk", qf, window_row(ksrc, r))

    _, logits = jax.lax.scan(logits_row, None, rows)  # (k, B, Hq, Wq, heads, k)
    logits = jnp.moveaxis(logits, 0, -2).reshape(*qf.shape[:-1], kernel_size * kernel_size)
    weights = jax.nn.softmax(logits, axis=-1)
    weights_rows = jnp.moveaxis(weights.reshape(*qf.shape[:-1], kernel_size, kernel_size), -2, 0)

    @jax.checkpoint
    def output_row(acc, xs):
        r, wa = xs
        return acc + jnp.einsum("bhwnk,bhwknd->bhwnd", wa, window_row(vsrc, r)), None

    out, _ = jax.lax.scan(output_row, jnp.zeros(q.shape[:-1] + v.shape[-1:], jnp.float32), (rows, weights_rows))
    out = out.astype(q.dtype)
    if return_weights:
        return out, weights.astype(q.dtype)
    return out


def neighborhood_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kernel_size: int,
    dilation: int = 1,
    border: str = "reflect",
    stride: int = 1,
    scale: float | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
):
    """Neighbourhood attention ``softmax(q . k_window * scale) v_window`` on 2-D feature maps.

    Args:
      q: queries ``(B, Hq, Wq, heads, D)`` with ``Hq = ceil(H / stride)``, ``Wq = ceil(W / stride)``.
      k, v: keys and values ``(B, H, W, heads, D)``.
      kernel_size: window side ``k`` (odd).
      dilation: spacing between the window's keys.
      border: ``"reflect"`` (ACmix, ``ReflectionPad2d`` + ``Unfold``) or ``"clamp"`` (NATTEN).
      stride: query ``(i, j)`` is centred on key ``(i * stride, j * stride)`` (ACmix's stride-2
        unfold).
      scale: logit scale; default ``D ** -0.5`` (as SDPA and NATTEN).
      return_weights: also return the weights ``(B, Hq, Wq, heads, k * k)``, offsets in row-major
        window order (``nn.Unfold`` order: index ``dy * k + dx``).
      implementation: ``None`` (:func:`flax_attn.kernels.default_implementation`: XLA unless the
        kernel is recorded as verified on this platform; XLA whenever weights are asked for),
        ``"xla"`` or ``"pallas"`` (interpreted on CPU). The Pallas kernel does not return weights.

    Returns:
      ``(B, Hq, Wq, heads, D)`` in ``q.dtype`` (and the weights if asked). Logits, softmax and the
      weighted sum run in float32.

    Raises:
      ValueError: at trace time, for mismatched shapes, an even or non-positive ``kernel_size``,
        reflection padding ``(k // 2) * dilation`` not smaller than the image (``ReflectionPad2d``
        refuses it too), or a clamp window ``k * dilation`` larger than the image.

    Example:
      >>> x = jnp.ones((2, 13, 17, 4, 8))
      >>> neighborhood_attention(x, x, x, kernel_size=7).shape
      (2, 13, 17, 4, 8)
    """
    check_neighborhood_args(q, k, v, kernel_size, dilation, stride, border)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if implementation is None and return_weights:
        implementation = "xla"
    implementation = resolve_implementation(_WHERE, "neighborhood", implementation)
    if implementation == "pallas" and return_weights:
        raise ValueError(f"{_WHERE}: the Pallas kernel does not return weights; use implementation='xla'")
    if implementation == "pallas":
        return neighborhood_attention_pallas(
            q, k, v, kernel_size=kernel_size, dilation=dilation, stride=stride, border=border, scale=scale
        )
    return _neighborhood_xla(
        q,
        k,
        v,
        kernel_size=kernel_size,
        dilation=dilation,
        stride=stride,
        border=border,
        scale=scale,
        return_weights=return_weights,
    )
