"""Scaled dot-product attention with the semantics of ``torch.nn.functional.scaled_dot_product_attention``.

Layout follows ``jax.nn.dot_product_attention``: ``(batch, length, heads, head_dim)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.kernels.dispatch import resolve_implementation
from flax_attn.ops.checks import check_rank
from flax_attn.ops.dtypes import statistics_dtype

__all__ = ["scaled_dot_product_attention", "masked_softmax"]


def masked_softmax(logits: jax.Array, mask: jax.Array | None = None, axis: int = -1) -> jax.Array:
    """Softmax in float32 where rows with no attendable entry give zeros, not NaN.

    ``mask`` (bool, True = keep) is applied before the softmax; ``-inf`` entries already in ``logits``
    count as masked too. Rows that are entirely masked produce all-zero weights and zero gradients.
    """
    logits = logits.astype(statistics_dtype(logits.dtype))
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=axis, keepdims=True)
    # A fully masked row has max -inf; shifting by 0 keeps exp(-inf) = 0 instead of exp(nan).
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    unnormalised = jnp.exp(logits - row_max)
    denom = jnp.sum(unnormalised, axis=axis, keepdims=True)
    return unnormalised / jnp.where(denom == 0.0, 1.0, denom)


def _broadcast_to_logits(name: str, arr: jax.Array, logits_shape: tuple[int, ...]) -> jax.Array:
    try:
        return jnp.broadcast_to(arr, logits_shape)
    except ValueError:
        raise ValueError(
            f"scaled_dot_product_attention: `{name}` of shape {tuple(arr.shape)} does not broadcast to the "
            f"attention logits (batch, heads, q_len, kv_len) = {logits_shape}"
        ) from None


def scaled_dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
):
    """Attention ``softmax(q k^T * scale + bias) v`` on ``(batch, length, heads, head_dim)`` inputs.

    Semantics match ``torch.nn.functional.scaled_dot_product_attention`` (with the head axis moved
    to position 2, as in ``jax.nn.dot_product_attention``):

    * ``mask`` broadcastable to ``(batch, heads, q_len, kv_len)``. A boolean mask means True =
      attend; a floating mask is added to the logits (``-inf`` entries are masked out).
    * ``bias`` (float, same broadcasting) is added to the logits as well.
    * ``is_causal``: query ``i`` attends to keys ``j <= i`` (top-left aligned, like PyTorch, also
      when ``q_len != kv_len``).
    * ``scale`` defaults to ``head_dim ** -0.5``. The value head dim may differ from the query's.
    * ``dropout_rate`` drops attention weights (inverted dropout) when ``dropout_rng`` is given.

    **Known difference from PyTorch.** A query row whose keys are *all* masked returns zeros (and
    zero gradients) instead of PyTorch's NaN. Fully padded key masks are common in DETR-style
    batching; NaN there silently poisons the whole batch's gradients.

    Logits and softmax run in float32 whatever the input dtype; the weighted sum of values runs in
    the value dtype with float32 accumulation.

    Args:
      query: ``(B, L, H, D)``.
      key: ``(B, S, H, D)``.
      value: ``(B, S, H, Dv)``.
      return_weights: also return the attention weights ``(B, H, L, S)`` (after dropout).
      implementation: ``None`` (:func:`flax_attn.kernels.default_implementation` for ``"sdpa"``:
        this function's XLA math unless a fused route is recorded as verified on the platform),
        ``"xla"``, or ``"cudnn"``: JAX's fused attention, ``jax.nn.dot_product_attention(...,
        implementation="cudnn")`` (cuDNN flash attention; GPU only, and only what cuDNN supports:
        no dropout, no returned weights, the value head dim equal to the query's). The semantics
        above, fully masked rows included, are kept on every route.

    Returns:
      ``(B, L, H, Dv)`` in the value dtype, or ``(out, weights)`` when ``return_weights``.

    Example:
      >>> q = k = v = jnp.ones((2, 5, 4, 8))
      >>> scaled_dot_product_attention(q, k, v).shape
      (2, 5, 4, 8)
    """
    fn = "scaled_dot_product_attention"
    check_rank(fn, "query", query, 4, "(batch, q_len, heads, head_dim)")
    check_rank(fn, "key", key, 4, "(batch, kv_len, heads, head_dim)")
    check_rank(fn, "value", value, 4, "(batch, kv_len, heads, v_head_dim)")
    b, l, h, d = query.shape
    if key.shape[0] != b or key.shape[2] != h or key.shape[3] != d:
        raise ValueError(
            f"{fn}: `key` shape {tuple(key.shape)} must be (batch={b}, kv_len, heads={h}, head_dim={d}) "
            f"to match `query` {tuple(query.shape)}"
        )
    s = key.shape[1]
    if value.shape[:3] != (b, s, h):
        raise ValueError(
            f"{fn}: `value` shape {tuple(value.shape)} must be (batch={b}, kv_len={s}, heads={h}, v_head_dim) "
            f"to match `key` {tuple(key.shape)}"
        )
    if dropout_rate < 0.0 or dropout_rate >= 1.0:
        raise ValueError(f"{fn}: `dropout_rate` must be in [0, 1), got {dropout_rate}")
    if scale is None:
        scale = d**-0.5
    dropout = dropout_rate > 0.0 and dropout_rng is not None
    if implementation is None and (dropout or return_weights or value.shape[-1] != d):
        implementation = "xla"  # what the fused routes cannot do
    implementation = resolve_implementation(fn, "sdpa", implementation, allowed=("xla", "cudnn"))
    if implementation != "xla":
        for unsupported, what in (
            (dropout, "attention dropout"),
            (return_weights, "return_weights=True"),
            (value.shape[-1] != d, f"a value head dim {value.shape[-1]} != the query head dim {d}"),
        ):
            if unsupported:
                raise ValueError(f"{fn}: implementation={implementation!r} does not support {what}; use 'xla'")
        return _fused(query, key, value, mask, bias, is_causal, scale, implementation)

    logits_shape = (b, h, l, s)
    acc = statistics_dtype(query.dtype, key.dtype, value.dtype)
    logits = jnp.einsum("blhd,bshd->bhls", query, key, preferred_element_type=acc) * scale

    keep = None
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype == jnp.bool_:
            keep = _broadcast_to_logits("mask", mask, logits_shape)
        else:
            logits = logits + _broadcast_to_logits("mask", mask, logits_shape).astype(acc)
    if bias is not None:
        logits = logits + _broadcast_to_logits("bias", jnp.asarray(bias), logits_shape).astype(acc)
    if is_causal:
        causal = jnp.tril(jnp.ones((l, s), dtype=jnp.bool_))
        keep = causal if keep is None else keep & causal

    weights = masked_softmax(logits, keep, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        survive = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(survive, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bhls,bshd->blhd", weights.astype(value.dtype), value, preferred_element_type=acc).astype(
        value.dtype
    )
    if return_weights:
        return out, weights.astype(value.dtype)
    return out


def _as_4d(name: str, arr: jax.Array, logits_shape: tuple[int, ...]) -> jax.Array:
    """``arr`` with leading unit dims up to rank 4, checked to broadcast to the logits (not materialised)."""
    try:
        jnp.broadcast_shapes(arr.shape, logits_shape)
    except ValueError:
        raise ValueError(
            f"scaled_dot_product_attention: `{name}` of shape {tuple(arr.shape)} does not broadcast to the "
            f"attention logits (batch, heads, q_len, kv_len) = {logits_shape}"
        ) from None
    if arr.ndim > 4:
        return jnp.broadcast_to(arr, logits_shape)
    return arr.reshape((1,) * (4 - arr.ndim) + arr.shape)


def _fused(query, key, value, mask, bias, is_causal, scale, implementation):
    """The same attention through ``jax.nn.dot_product_attention(implementation=...)``.

    Its masks and biases use the same ``(batch, heads, q_len, kv_len)`` order. A floating mask is
    split into its ``-inf`` pattern (a boolean mask) and its finite values (a bias), so that rows
    without any attendable key can be returned as zeros, as the XLA path does (the fused kernels
    would average the values or give NaN there).
    """
    b, l, h, _ = query.shape
    logits_shape = (b, h, l, key.shape[1])
    keep, add = None, None
    if mask is not None:
        mask = _as_4d("mask", jnp.asarray(mask), logits_shape)
        if mask.dtype == jnp.bool_:
            keep = mask
        else:
            keep = mask > -jnp.inf
            add = jnp.where(keep, mask, 0.0).astype(jnp.float32)
    if bias is not None:
        bias = _as_4d("bias", jnp.asarray(bias), logits_shape).astype(jnp.float32)
        add = bias if add is None else add + bias
    if add is not None:
        add = add.astype(query.dtype)
    out = jax.nn.dot_product_attention(
        query, key, value, bias=add, mask=keep, scale=scale, is_causal=is_causal, implementation=implementation
    )
    if keep is not None:
        any_key = jnp.broadcast_to(keep, logits_shape)
        if is_causal:
            any_key = any_key & jnp.tril(jnp.ones(logits_shape[2:], jnp.bool_))
        any_key = jnp.any(any_key, axis=-1)  # (B, H, L)
        out = jnp.where(jnp.swapaxes(any_key, 1, 2)[..., None], out, jnp.zeros((), out.dtype))
    return out.astype(value.dtype)
