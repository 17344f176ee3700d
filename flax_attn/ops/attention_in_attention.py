"""The attention math of A2N (Chen et al., "Attention in Attention Network for Image Super-Resolution",
arXiv 2104.09497): the attention dropout weights, the branch mix, and the sigmoid gate of pixel attention.

Plain functions on NHWC arrays; the learnable parts (convolutions, the two ``Linear`` layers of the
attention dropout module) stay in :mod:`flax_attn.a2n`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.ops.checks import check_rank

__all__ = ["attention_dropout_weights", "mix_branches", "sigmoid_gate"]


def attention_dropout_weights(logits: jax.Array, temperature: float) -> jax.Array:
    """Softmax of ``logits / temperature`` over the last axis, in float32.

    The attention dropout module (ADM) of an AAB turns its ``(B, K)`` logits into ``K`` branch
    weights that sum to one; a large temperature (30 in the paper) keeps them close to uniform early
    in training, so neither branch is switched off before it has learned anything.

    Args:
      logits: ``(B, K)``.
      temperature: positive scalar ``t``.

    Returns:
      ``(B, K)`` float32 weights, each row summing to one.
    """
    check_rank("attention_dropout_weights", "logits", logits, 2, "(batch, K)")
    if not temperature > 0:
        raise ValueError(f"attention_dropout_weights: `temperature` must be positive, got {temperature!r}")
    return jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def mix_branches(attention: jax.Array, non_attention: jax.Array, weights: jax.Array) -> jax.Array:
    """``attention * weights[:, 0] + non_attention * weights[:, 1]``, per sample.

    Args:
      attention, non_attention: ``(B, H, W, C)`` branch outputs.
      weights: ``(B, K)`` with ``K >= 2``; as in the official AAB only the first two columns are
        used (further ones only take part in the softmax normalisation).

    Returns:
      ``(B, H, W, C)`` in the dtype of the branches.
    """
    check_rank("mix_branches", "attention", attention, 4, "(batch, height, width, channels)")
    if attention.shape != non_attention.shape:
        raise ValueError(
            f"mix_branches: `attention` {attention.shape} and `non_attention` {non_attention.shape} must match"
        )
    if weights.ndim != 2 or weights.shape[0] != attention.shape[0] or weights.shape[1] < 2:
        raise ValueError(
            f"mix_branches: `weights` must be (batch={attention.shape[0]}, K>=2), got shape {weights.shape}"
        )
    w = weights.astype(attention.dtype)[:, None, None, :]
    return attention * w[..., 0:1] + non_attention * w[..., 1:2]


def sigmoid_gate(x: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pixel attention: ``x * sigmoid(logits)``, one coefficient per pixel and channel.

    Returns:
      ``(gated x, attention map)``, both shaped like ``x``; the map is returned for visualisation.
    """
    if x.shape != logits.shape:
        raise ValueError(f"sigmoid_gate: `x` {x.shape} and `logits` {logits.shape} must have the same shape")
    att = jax.nn.sigmoid(logits)
    return x * att, att
