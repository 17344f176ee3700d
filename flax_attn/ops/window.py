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

from flax_attn.ops._checks import check_rank
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


def relative_position_index(window_size: tuple[int, int]) -> np.ndarray:
    """Swin's ``relative_position_index``: ``(N, N)`` ints into the ``((2Wh-1)(2Ww-1), heads)`` table."""
    wh, ww = window_size
    ys, xs = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
    flat = np.stack([ys.reshape(-1), xs.reshape(-1)])  # (2, N)
    rel = flat[:, :, None] - flat[:, None, :]  # (2, N, N): query minus key
    return ((rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)).astype(np.int32)


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


def shift_attention_mask(h: int, w: int, window_size: int, shift_size: int) -> np.ndarray:
    """Swin's mask for shifted windows: ``(num_windows, N, N)`` float32 with 0 and -100."""
    ws, s = window_size, shift_size
    region = np.zeros((h, w), np.float32)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            region[hs, wsl] = cnt
            cnt += 1
    # numpy, not window_partition: the mask is a trace-time constant.
    win = region.reshape(h // ws, ws, w // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)  # (nW, N)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def check_window_args(where, q, k, v, window_size, shift_size, bias_table) -> None:
    """Trace-time validation shared by every implementation; raises ``ValueError`` naming ``where``."""
    layout = "(batch, height, width, heads, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(where, name, x, 5, layout)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{where}: q, k, v must have the same shape, got {q.shape}, {k.shape}, {v.shape}")
    h, w, heads = q.shape[1:4]
    ws = window_size
    if ws < 1 or h % ws or w % ws:
        raise ValueError(
            f"{where}: height and width must be multiples of `window_size`={ws}, got input shape {q.shape}"
        )
    if not 0 <= shift_size < ws:
        raise ValueError(f"{where}: `shift_size` must be in [0, window_size={ws}), got {shift_size}")
    if bias_table is not None and bias_table.shape != ((2 * ws - 1) ** 2, heads):
        raise ValueError(f"{where}: `bias_table` must have shape {((2 * ws - 1) ** 2, heads)}, got {bias_table.shape}")


def default_implementation() -> str:
    return "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "xla"


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
      implementation: ``None`` (the fused Pallas kernel of :mod:`flax_attn.kernels.window` on
        GPU/TPU, XLA on CPU; XLA whenever dropout is active), ``"xla"`` (this function's reference
        path) or ``"pallas"``.

    Returns:
      ``(B, H, W, heads, D)`` in ``q.dtype``; logits and softmax in float32.
    """
    if implementation not in (None, "xla", "pallas"):
        raise ValueError(f"{_WHERE}: `implementation` must be None, 'xla' or 'pallas', got {implementation!r}")
    check_window_args(_WHERE, q, k, v, window_size, shift_size, bias_table)
    dropout = dropout_rng is not None and dropout_rate > 0.0
    if implementation is None:
        # The kernel has no attention dropout: training with dropout runs the XLA path.
        implementation = "xla" if dropout else default_implementation()
    if implementation == "pallas":
        if dropout:
            raise ValueError(f"{_WHERE}: the Pallas kernel has no attention dropout; use implementation='xla'")
        from flax_attn.kernels.window import window_attention_pallas

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
    )
    out = window_reverse(out.reshape(b, nw, n, heads, -1), ws, h, w)
    if shift_size:
        out = jnp.roll(out, (shift_size, shift_size), axis=(1, 2))
    return out
