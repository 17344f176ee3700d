"""Position and channel attention of DANet (Fu et al., CVPR 2019, arXiv 1809.02983), on flattened maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.ops.checks import check_rank
from flax_attn.ops.dtypes import statistics_dtype

__all__ = ["channel_attention", "position_attention"]


def position_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, return_weights: bool = False):
    """PAM: ``out_i = sum_j softmax_j(q_i . k_j) v_j``, unscaled (no ``1/sqrt(d)``), as official.

    Args:
      query, key: ``(B, N, Cq)``; value: ``(B, N, C)``.

    Returns:
      ``(B, N, C)``, or ``(out, attention (B, N, N))``. Logits and softmax run in float32.
    """
    fn = "position_attention"
    check_rank(fn, "query", query, 3, "(batch, positions, channels)")
    check_rank(fn, "key", key, 3, "(batch, positions, channels)")
    check_rank(fn, "value", value, 3, "(batch, positions, channels)")
    if key.shape != query.shape or value.shape[:2] != query.shape[:2]:
        raise ValueError(f"{fn}: shapes do not match: query {query.shape}, key {key.shape}, value {value.shape}")
    acc = statistics_dtype(query.dtype, key.dtype)
    energy = jnp.einsum("bic,bjc->bij", query, key, preferred_element_type=acc)
    attention = jax.nn.softmax(energy, axis=-1)
    out = jnp.einsum(
        "bij,bjc->bic", attention.astype(value.dtype), value, preferred_element_type=statistics_dtype(value.dtype)
    ).astype(value.dtype)
    return (out, attention.astype(value.dtype)) if return_weights else out


def channel_attention(x: jax.Array, *, return_weights: bool = False):
    """CAM: ``out = softmax(max(E) - E) x`` over channels with ``E = x^T x`` ``(C, C)``.

    The official "max minus energy" form is kept literally (a softmax over it weights *dissimilar*
    channels more). Only a ``(C, C)`` matrix is formed, never ``(N, N)``.

    Args:
      x: ``(B, N, C)`` flattened feature map.

    Returns:
      ``(B, N, C)``, or ``(out, attention (B, C, C))``.
    """
    check_rank("channel_attention", "x", x, 3, "(batch, positions, channels)")
    acc = statistics_dtype(x.dtype)
    energy = jnp.einsum("bnc,bnd->bcd", x, x, preferred_element_type=acc)
    energy_new = jnp.max(energy, axis=-1, keepdims=True) - energy
    attention = jax.nn.softmax(energy_new, axis=-1)
    out = jnp.einsum("bcd,bnd->bnc", attention.astype(x.dtype), x, preferred_element_type=acc).astype(x.dtype)
    return (out, attention.astype(x.dtype)) if return_weights else out
