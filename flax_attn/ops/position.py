"""Fixed 2-D positional encodings for image transformers (DETR, Carion et al., arXiv 2005.12872)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.ops.checks import check_rank

__all__ = ["sine_position_embedding"]


def sine_position_embedding(
    mask: jax.Array,
    num_pos_feats: int = 64,
    temperature: float = 10000.0,
    normalize: bool = False,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
) -> jax.Array:
    """DETR's sine/cosine encoding of (row, column) positions, counted over the unpadded pixels.

    The position of a pixel is the running count of *valid* (not padded) pixels along its column
    (y) and row (x), so padding at the bottom/right does not shift the positions of the image.
    With ``normalize`` the counts are divided by the count at the last row/column (plus ``eps``)
    and multiplied by ``scale``. Frequencies follow Vaswani et al.: channel ``2i`` and ``2i + 1``
    use ``temperature ** (2i / num_pos_feats)``, with sin on even and cos on odd channels.

    Args:
      mask: ``(B, H, W)`` bool, True = padded pixel (DETR's ``NestedTensor.mask``).
      num_pos_feats: channels per axis; the output has ``2 * num_pos_feats``.
      temperature, normalize, scale, eps: as in DETR's ``PositionEmbeddingSine``.

    Returns:
      ``(B, H, W, 2 * num_pos_feats)`` float32: the y encoding in the first half, x in the second.
      A fully padded image gets zero counts and so a finite encoding (sin 0 / cos 0).

    Example:
      >>> sine_position_embedding(jnp.zeros((1, 3, 5), bool), num_pos_feats=8).shape
      (1, 3, 5, 16)
    """
    check_rank("sine_position_embedding", "mask", mask, 3, "(batch, height, width)")
    if num_pos_feats <= 0 or num_pos_feats % 2:
        raise ValueError(f"sine_position_embedding: `num_pos_feats` must be positive and even, got {num_pos_feats}")
    not_mask = jnp.logical_not(jnp.asarray(mask, jnp.bool_)).astype(jnp.float32)
    y_embed = jnp.cumsum(not_mask, axis=1)
    x_embed = jnp.cumsum(not_mask, axis=2)
    if normalize:
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    # Frequencies in float32 as the reference computes them (a float64 table differs in the last bits).
    i = np.arange(num_pos_feats, dtype=np.float32)
    dim_t = np.power(np.float32(temperature), (np.float32(2) * (i // 2) / np.float32(num_pos_feats)))
    dim_t = jnp.asarray(dim_t.astype(np.float32))

    def encode(e):
        p = e[..., None] / dim_t
        b, h, w, _ = p.shape
        return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(b, h, w, num_pos_feats)

    return jnp.concatenate([encode(y_embed), encode(x_embed)], axis=-1)
