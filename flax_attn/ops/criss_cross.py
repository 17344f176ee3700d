"""Criss-cross attention (CCNet, Huang et al., arXiv 1811.11721) as a pure function.

Each pixel ``(y, x)`` attends to the ``H + W - 1`` pixels of its row and its column, the centre
counted once. Logits are plain dot products (no ``1/sqrt(d)`` scaling) and one softmax runs jointly
over the row and the column, exactly like the official CUDA op (``ca_weight`` -> ``softmax(dim=1)``
-> ``ca_map`` in speedinghzl/CCNet ``cc_attention``).

Layout of the attention weights, as the official ``ca_weight`` writes its energy
``(N, H + W - 1, H, W)`` (checked against ``ca_forward_kernel`` in ``src/ca.cu``): channel ``i < W``
is the row entry ``(y, i)`` (the centre ``(y, x)`` is the row entry ``i = x``); channel ``W + i`` for
``i < H - 1`` is the column entry ``(j, x)`` with ``j = i if i < y else i + 1``, i.e. the column in
order with the centre skipped. ``return_weights=True`` returns this layout moved to NHWC,
``(B, H, W, H + W - 1)``. (CCNet's later pure-PyTorch ``cc.py`` orders the softmax axis the other
way, column first with the centre masked by ``-inf``, then row; the output is the same.)

The reference computes the row logits ``(B, H, W, W)`` and the column logits ``(B, H, W, H)``
separately and combines them with a joint log-sum-exp, so its memory scales as
``B * H * W * (H + W)``, never ``(H * W) ** 2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.kernels.checks import check_criss_cross_args
from flax_attn.kernels.criss_cross import criss_cross_attention_pallas
from flax_attn.kernels.dispatch import resolve_implementation

__all__ = ["criss_cross_attention", "criss_cross_logits"]


def criss_cross_logits(q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row logits ``(B, H, W, W)`` and column logits ``(B, H, W, H)`` in float32.

    ``row[b, y, x, i] = q[b, y, x] . k[b, y, i]`` and ``col[b, y, x, j] = q[b, y, x] . k[b, j, x]``;
    the column centre ``j == y`` is ``-inf`` (it is already counted in the row).
    """
    row = jnp.einsum("bywc,byic->bywi", q, k, preferred_element_type=jnp.float32)
    col = jnp.einsum("bywc,bjwc->bywj", q, k, preferred_element_type=jnp.float32)
    h = q.shape[1]
    centre = jnp.arange(h)[:, None, None] == jnp.arange(h)[None, None, :]  # (y, 1, j)
    col = jnp.where(centre, -jnp.inf, col)
    return row.astype(jnp.float32), col.astype(jnp.float32)


def _official_weight_layout(p_row: jax.Array, p_col: jax.Array) -> jax.Array:
    """``(B, H, W, W)`` row and ``(B, H, W, H)`` column weights -> official ``(B, H, W, H + W - 1)``."""
    h = p_col.shape[1]
    i = jnp.arange(h - 1)[None, :]
    idx = i + (i >= jnp.arange(h)[:, None])  # (y, i) -> column row j, skipping j == y
    idx = jnp.broadcast_to(idx[None, :, None, :], p_col.shape[:3] + (h - 1,))
    return jnp.concatenate([p_row, jnp.take_along_axis(p_col, idx, axis=-1)], axis=-1)


def _xla(q, k, v, return_weights):
    row, col = criss_cross_logits(q, k)
    m = jnp.maximum(jnp.max(row, -1, keepdims=True), jnp.max(col, -1, keepdims=True))
    m = jax.lax.stop_gradient(m)
    e_row, e_col = jnp.exp(row - m), jnp.exp(col - m)
    denom = jnp.sum(e_row, -1, keepdims=True) + jnp.sum(e_col, -1, keepdims=True)
    p_row, p_col = e_row / denom, e_col / denom
    vf = v.astype(jnp.float32)
    out = jnp.einsum("bywi,byic->bywc", p_row, vf) + jnp.einsum("bywj,bjwc->bywc", p_col, vf)
    out = out.astype(jnp.result_type(q.dtype, k.dtype, v.dtype))
    if not return_weights:
        return out
    return out, _official_weight_layout(p_row, p_col)


def criss_cross_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, return_weights: bool = False, implementation: str | None = None
):
    """Criss-cross attention over NHWC maps: each pixel attends to its row and column.

    Args:
      q, k: ``(B, H, W, Cqk)`` queries and keys.
      v: ``(B, H, W, Cv)`` values.
      return_weights: also return the attention ``(B, H, W, H + W - 1)`` in the official order
        (the ``W`` row entries, then the ``H - 1`` column entries without the centre).
      implementation: ``None`` (:func:`flax_attn.kernels.default_implementation`: XLA unless the
        kernel is recorded as verified on this platform), ``"xla"`` or ``"pallas"`` (the fused
        kernel; interpreted on CPU).

    Returns:
      ``(B, H, W, Cv)`` in the inputs' result dtype, and the weights (float32) when asked.
      Softmax statistics are float32 whatever the input dtype.

    Example:
      >>> q = k = jnp.ones((1, 5, 7, 4)); v = jnp.ones((1, 5, 7, 3))
      >>> criss_cross_attention(q, k, v).shape
      (1, 5, 7, 3)
    """
    where = "criss_cross_attention"
    implementation = resolve_implementation(where, "criss_cross", implementation)
    check_criss_cross_args(where, q, k, v)
    if implementation == "xla":
        return _xla(q, k, v, return_weights)
    out = criss_cross_attention_pallas(q, k, v)
    if not return_weights:
        return out
    # The weights are an output of the size of the energy, so they are materialised anyway; they
    # come from the reference (differentiable by autodiff), the output from the fused kernel.
    return out, _xla(q, k, v, True)[1]
