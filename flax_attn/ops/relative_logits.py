"""2-D relative-position self-attention of Attention Augmented Convolutional Networks
(Bello et al., ICCV 2019, arXiv 1904.09925).

Relative logits: ``rel_w[x, y, y'] = q[x, y] . key_rel_w[y' - y + W - 1]`` and likewise along height.
The reference builds them with ``rel_to_abs`` and then *repeats* them to ``(H*W, H*W)`` per head;
here each is formed once as ``(H, W, W)`` / ``(H, W, H)`` per head from a ``(W, W, d)`` table of
relative embeddings and broadcast into the content logits, so nothing beyond the ``(H*W, H*W)``
logits themselves is formed. The table is built by the reshape "skew" (the trick behind
``rel_to_abs``, applied to the small embedding table rather than to the logits): a broadcast, a
static slice and reshapes, whose gradient is a pad and a sum; an index gather there would make the
gradient a scatter-add.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.ops.checks import check_rank

__all__ = ["augmented_attention", "relative_logits_2d", "skew"]


def skew(rel: jax.Array, length: int, axis: int = 0) -> jax.Array:
    """Relative to absolute positions: ``out[..., i, j, ...] = rel[..., j - i + length - 1, ...]``.

    ``rel`` has ``2 * length - 1`` entries along ``axis`` (offsets ``-(length - 1) .. length - 1``);
    they are replaced by two axes ``(length, length)`` (query ``i``, key ``j``). Built from a
    broadcast, one static slice and reshapes, with no index gather, so the gradient is a pad and a
    sum rather than a scatter-add.
    """
    if rel.shape[axis] != 2 * length - 1:
        raise ValueError(f"skew: axis {axis} of `rel` must have 2 * {length} - 1 entries, got shape {rel.shape}")
    moved = jnp.moveaxis(rel, axis, 0)
    rest = moved.shape[1:]
    flat = moved.reshape(2 * length - 1, -1)
    if length == 1:
        out = flat[None]
    else:
        # `length` copies of rel end to end, read from offset L - 1 in rows of 2L - 2 (one short
        # of a copy): row i then starts at copy position L - 1 - i, which is row i of the table.
        tiled = jnp.broadcast_to(flat, (length, *flat.shape)).reshape(length * (2 * length - 1), -1)
        tiled = tiled[length - 1 : length - 1 + length * (2 * length - 2)]
        out = tiled.reshape(length, 2 * length - 2, -1)[:, :length]
    out = out.reshape(length, length, *rest)
    return jnp.moveaxis(out, (0, 1), (axis, axis + 1))


def _relative_table(rel: jax.Array, length: int, where: str, name: str) -> jax.Array:
    if rel.shape[0] != 2 * length - 1:
        raise ValueError(
            f"{where}: `{name}` has {rel.shape[0]} rows; a size-{length} axis needs 2 * {length} - 1 = "
            f"{2 * length - 1} (table shape {tuple(rel.shape)})"
        )
    return skew(rel, length)  # (L, L, d)


def relative_logits_2d(q: jax.Array, key_rel_h: jax.Array, key_rel_w: jax.Array):
    """Relative-position logits along height and width.

    Args:
      q: ``(B, H, W, Nh, d)`` (already scaled, as in the reference).
      key_rel_h: ``(2H - 1, d)``; key_rel_w: ``(2W - 1, d)``.

    Returns:
      ``(rel_h (B, Nh, H, W, H), rel_w (B, Nh, H, W, W))``: entry ``[b, n, x, y, u]`` of ``rel_h``
      is added to the logit of query ``(x, y)`` and every key in row ``u``; ``rel_w`` likewise for
      key column ``v``.
    """
    where = "relative_logits_2d"
    check_rank(where, "q", q, 5, "(batch, height, width, heads, head_dim)")
    _, h, w, _, d = q.shape
    for name, t in (("key_rel_h", key_rel_h), ("key_rel_w", key_rel_w)):
        check_rank(where, name, t, 2, "(2 * size - 1, head_dim)")
        if t.shape[1] != d:
            raise ValueError(f"{where}: `{name}` must have head_dim={d} columns, got shape {tuple(t.shape)}")
    table_h = _relative_table(key_rel_h.astype(q.dtype), h, where, "key_rel_h")
    table_w = _relative_table(key_rel_w.astype(q.dtype), w, where, "key_rel_w")
    rel_h = jnp.einsum("bxynd,xud->bnxyu", q, table_h, preferred_element_type=jnp.float32)
    rel_w = jnp.einsum("bxynd,yvd->bnxyv", q, table_w, preferred_element_type=jnp.float32)
    return rel_h, rel_w


def augmented_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_rel_h: jax.Array | None = None,
    key_rel_w: jax.Array | None = None,
    *,
    return_weights: bool = False,
):
    """Multi-head 2-D self-attention with optional relative-position logits.

    ``softmax(q k^T + rel_h + rel_w) v`` over all ``H*W`` key positions; ``q`` is expected already
    scaled by ``head_dim ** -0.5`` (the reference scales q before the relative logits too).

    Args:
      q, k: ``(B, H, W, Nh, dk)``; v: ``(B, H, W, Nh, dv)``.
      key_rel_h, key_rel_w: both or neither; see :func:`relative_logits_2d`.

    Returns:
      ``(B, H, W, Nh, dv)`` in ``v``'s dtype, or ``(out, weights (B, Nh, H*W, H*W))``.
    """
    where = "augmented_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rank(where, name, t, 5, "(batch, height, width, heads, head_dim)")
    if k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(f"{where}: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (key_rel_h is None) != (key_rel_w is None):
        raise ValueError(f"{where}: give both `key_rel_h` and `key_rel_w`, or neither")
    b, h, w, nh, _ = q.shape
    logits = jnp.einsum("bxynd,buvnd->bnxyuv", q, k, preferred_element_type=jnp.float32)
    if key_rel_h is not None:
        rel_h, rel_w = relative_logits_2d(q, key_rel_h, key_rel_w)
        logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
    weights = jax.nn.softmax(logits.reshape(b, nh, h * w, h * w), axis=-1)
    out = jnp.einsum(
        "bnij,bjnd->bind",
        weights.astype(v.dtype),
        v.reshape(b, h * w, nh, -1),
        preferred_element_type=jnp.float32,
    ).astype(v.dtype)
    out = out.reshape(b, h, w, nh, -1)
    return (out, weights.astype(v.dtype)) if return_weights else out
