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
``(B, C * k^2, H, W)`` tensors: a scan over the ``k`` window rows (offsets, not pixels) cuts one
window row of keys at a time out of the (padded) map (a transient of ``k``, not ``k^2``, copies of
the input, recomputed rather than saved for the backward pass), builds ``(B, Hq, Wq, heads, k^2)``
logits, and accumulates the output row by row. The window row is a dynamic slice at the scanned
offset followed by static strided slices, never an index gather, so the gradient has no
scatter-add (a serial loop on XLA:CPU and TPU).
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


def _arithmetic_runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """Split a static index vector into maximal runs ``(start, step, length)`` with ``step >= 0``."""
    runs, p = [], 0
    while p < len(idx):
        step = int(idx[p + 1] - idx[p]) if p + 1 < len(idx) else 1
        if step < 0:
            step = 1
            q = p + 1
        else:
            q = p + 1
            while q < len(idx) and idx[q] - idx[q - 1] == step:
                q += 1
        runs.append((int(idx[p]), step, q - p))
        p = q
    return runs


def _static_take(x: jax.Array, idx: np.ndarray, axis: int) -> jax.Array:
    """``jnp.take(x, idx, axis)`` for a static ``idx``, from strided slices and broadcasts.

    The window tables are piecewise arithmetic (one strided run for the reflect border; clamped
    runs at the borders for NATTEN's rule), so a handful of slices replaces the gather, and the
    gradient is pads and sums instead of a scatter-add.
    """
    parts = []
    for start, step, length in _arithmetic_runs(idx):
        if step == 0:
            one = jax.lax.slice_in_dim(x, start, start + 1, axis=axis)
            shape = list(one.shape)
            shape[axis] = length
            parts.append(jnp.broadcast_to(one, shape))
        else:
            parts.append(jax.lax.slice_in_dim(x, start, start + (length - 1) * step + 1, step, axis=axis))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _window_bases(x, h, w, kernel_size, dilation, stride, border):
    """(source array, row base (Hq,), column base (Wq,)): window offset ``(a, b)`` of query
    ``(i, j)`` is ``source[:, row_base[i] + a * dilation, col_base[j] + b * dilation]``.

    Both border rules have this form: the reflect border reads the reflect-padded image at plain
    shifts, and NATTEN's clamped windows start at a per-query position and then step by the
    dilation (``neighborhood_indices`` row ``a`` is row 0 plus ``a * dilation``).
    """
    rows = neighborhood_indices(h, kernel_size, dilation, stride, border)
    cols = neighborhood_indices(w, kernel_size, dilation, stride, border)
    if border == "reflect":
        p = (kernel_size // 2) * dilation
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0), (0, 0)), mode="reflect")
        return x, np.arange(rows.shape[1]) * stride, np.arange(cols.shape[1]) * stride
    return x, rows[0], cols[0]


def _neighborhood_xla(q, k, v, *, kernel_size, dilation, stride, border, scale, return_weights):
    _, h, w = k.shape[:3]
    qf = q.astype(jnp.float32) * jnp.float32(scale)
    ksrc, row_base, col_base = _window_bases(k, h, w, kernel_size, dilation, stride, border)
    vsrc, _, _ = _window_bases(v, h, w, kernel_size, dilation, stride, border)
    span = (kernel_size - 1) * dilation
    src_h, src_w = ksrc.shape[1] - span, ksrc.shape[2] - span

    def window_row(src, a):
        # Window row a for every query: (B, Hq, src_w, heads, d) rows of the map. The row offset is
        # the scan's index (a dynamic_slice, whose transpose is a dynamic_update_slice); the rest
        # are static slices. No gather, so no scatter in the gradient.
        return _static_take(jax.lax.dynamic_slice_in_dim(src, a * dilation, src_h, axis=1), row_base, axis=1)

    def window_key(row, b):  # offset (a, b) for every query: (B, Hq, Wq, heads, d)
        start = b * dilation
        return _static_take(jax.lax.slice_in_dim(row, start, start + src_w, axis=2), col_base, axis=2).astype(
            jnp.float32
        )

    offsets = jnp.arange(kernel_size)

    # A scan over window rows makes them strictly sequential, so only one row of keys (k copies of
    # the input, not k^2) is alive at a time; the checkpoint recomputes it in the backward pass
    # instead of saving k of them. Inside a row, each offset is a multiply-and-sum over head_dim
    # (XLA:CPU fuses the slice into it) rather than a batched (1 x d) @ (d x k) dot per query,
    # which measured 1.9x slower on CPU.
    @jax.checkpoint
    def logits_row(carry, a):
        row = window_row(ksrc, a)
        return carry, jnp.stack([jnp.sum(qf * window_key(row, b), axis=-1) for b in range(kernel_size)], axis=-1)

    _, logits = jax.lax.scan(logits_row, None, offsets)  # (k, B, Hq, Wq, heads, k)
    logits = jnp.moveaxis(logits, 0, -2).reshape(*qf.shape[:-1], kernel_size * kernel_size)
    weights = jax.nn.softmax(logits, axis=-1)
    weights_rows = jnp.moveaxis(weights.reshape(*qf.shape[:-1], kernel_size, kernel_size), -2, 0)

    @jax.checkpoint
    def output_row(acc, xs):
        a, wa = xs
        row = window_row(vsrc, a)
        for b in range(kernel_size):
            acc = acc + wa[..., b, None] * window_key(row, b)
        return acc, None

    out, _ = jax.lax.scan(output_row, jnp.zeros(q.shape[:-1] + v.shape[-1:], jnp.float32), (offsets, weights_rows))
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
