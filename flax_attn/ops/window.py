"""Swin-style window attention (Liu et al., arXiv 2103.14030): attention inside non-overlapping windows.

Semantics follow microsoft/Swin-Transformer ``models/swin_transformer.py``: windows are
``window_size x window_size`` tiles of the (optionally cyclically shifted) feature map, each window
attends within itself with a learned relative position bias indexed by Swin's
``relative_position_index``, and shifted windows add Swin's attention mask (``-100`` between tokens
that came from different regions before the roll, ``0`` otherwise).

Layout: ``(batch, height, width, heads, head_dim)`` like :func:`flax_attn.ops.neighborhood_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.kernels.checks import check_window_args
from flax_attn.kernels.dispatch import resolve_implementation
from flax_attn.kernels.layout import relative_position_index, shift_regions, window_partition, window_reverse
from flax_attn.kernels.window import window_attention_pallas
from flax_attn.ops.attention import scaled_dot_product_attention
from flax_attn.ops.relative_logits import skew

__all__ = [
    "check_window_args",
    "relative_position_bias",
    "relative_position_index",
    "shift_attention_mask",
    "window_attention",
    "window_partition",
    "window_reverse",
]

_WHERE = "window_attention"


def relative_position_bias(bias_table: jax.Array, window_size: int) -> jax.Array:
    """``bias_table[relative_position_index]`` as ``(heads, N, N)`` float32, without a gather.

    Swin's index is separable: query ``(qy, qx)`` and key ``(ky, kx)`` read row
    ``(qy - ky + M - 1) * (2M - 1) + (qx - kx + M - 1)``, so the table viewed as
    ``(2M - 1, 2M - 1, heads)`` is skewed along each offset axis (:func:`flax_attn.ops.relative_logits.skew`,
    a broadcast, a slice and reshapes; reversed because Swin counts query minus key). The gradient
    of the table is then pads and sums, where the index gather would transpose to a scatter-add.
    """
    m = window_size
    heads = bias_table.shape[-1]
    t = jnp.flip(bias_table.astype(jnp.float32).reshape(2 * m - 1, 2 * m - 1, heads), axis=(0, 1))
    t = skew(skew(t, m, axis=0), m, axis=2)  # (qy, ky, qx, kx, heads)
    return jnp.transpose(t, (4, 0, 2, 1, 3)).reshape(heads, m * m, m * m)


def shift_attention_mask(h: int, w: int, window_size: int, shift_size: int) -> np.ndarray:
    """Swin's mask for shifted windows: ``(num_windows, N, N)`` float32 with 0 and -100."""
    win = shift_regions(h, w, window_size, shift_size)  # (nW, N)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window_size: int,
    shift_size: int = 0,
    bias_table: jax.Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Attention within ``window_size x window_size`` windows, optionally cyclically shifted.

    Args:
      q, k, v: ``(B, H, W, heads, D)``; ``H`` and ``W`` must be multiples of ``window_size``
        (Swin pads the feature map before calling its attention).
      window_size: window side ``M``.
      shift_size: cyclic shift (``0 <= shift_size < window_size``); the map is rolled by
        ``-shift_size`` before partitioning and back afterwards, with Swin's attention mask.
      bias_table: ``((2M - 1)^2, heads)`` relative position bias, indexed by
        :func:`relative_position_index`; ``None`` = no bias.
      scale: default ``D ** -0.5``.
      dropout_rate, dropout_rng: attention dropout (applied when ``dropout_rng`` is given).
      implementation: ``None`` (:func:`flax_attn.kernels.default_implementation`: XLA unless the
        kernel is recorded as verified on this platform; XLA whenever dropout is active),
        ``"xla"`` (this function's reference path), ``"pallas"`` (the fused kernel of
        :mod:`flax_attn.kernels.window`; interpreted on CPU) or ``"cudnn"``: the same dense
        attention per window with the bias and mask, through
        ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU only; no dropout).

    Returns:
      ``(B, H, W, heads, D)`` in ``q.dtype``; logits and softmax in float32.
    """
    dropout = dropout_rng is not None and dropout_rate > 0.0
    if implementation is None and dropout:
        # Neither the kernel nor the fused route has attention dropout: training with it runs XLA.
        implementation = "xla"
    implementation = resolve_implementation(_WHERE, "window", implementation, allowed=("xla", "pallas", "cudnn"))
    check_window_args(_WHERE, q, k, v, window_size, shift_size, bias_table)
    if implementation == "pallas":
        if dropout:
            raise ValueError(f"{_WHERE}: the Pallas kernel has no attention dropout; use implementation='xla'")
        return window_attention_pallas(
            q, k, v, window_size=window_size, shift_size=shift_size, bias_table=bias_table, scale=scale
        )
    b, h, w, heads, _ = q.shape
    ws = window_size
    n = ws * ws
    if shift_size:
        q, k, v = (jnp.roll(x, (-shift_size, -shift_size), axis=(1, 2)) for x in (q, k, v))
    qw, kw, vw = (window_partition(x, ws) for x in (q, k, v))  # (B, nW, N, heads, D)
    nw = qw.shape[1]
    bias = jnp.zeros((1, 1, n, n), jnp.float32)
    if bias_table is not None:
        bias = bias + relative_position_bias(bias_table, ws)[None, None]  # (1, 1, heads, N, N)
    if shift_size:
        bias = bias + jnp.asarray(shift_attention_mask(h, w, ws, shift_size))[None, :, None]  # (1, nW, 1, N, N)
    bias = jnp.broadcast_to(bias, (b, nw, heads, n, n)).reshape(b * nw, heads, n, n)
    flat = lambda x: x.reshape(b * nw, n, heads, x.shape[-1])  # noqa: E731
    out = scaled_dot_product_attention(
        flat(qw),
        flat(kw),
        flat(vw),
        bias=bias,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        implementation=implementation,
    )
    out = window_reverse(out.reshape(b, nw, n, heads, -1), ws, h, w)
    if shift_size:
        out = jnp.roll(out, (shift_size, shift_size), axis=(1, 2))
    return out
