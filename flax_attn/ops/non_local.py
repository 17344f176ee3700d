"""The pairwise functions of non-local blocks (Wang et al., CVPR 2018, arXiv 1711.07971).

``y_i = sum_j f(theta_i, phi_j) g_j / C(x)`` for the four instantiations of the paper, on flattened
positions: ``theta`` ``(B, N, Ck)`` (queries), ``phi`` ``(B, M, Ck)`` and ``g`` ``(B, M, Cv)`` (the
possibly sub-sampled keys and values).

Memory: only the Gaussian modes need the ``(N, M)`` affinity matrix. The dot-product mode is
linear, so ``theta (phi^T g) / M`` gives the same result from a ``(Ck, Cv)`` matrix; the
concatenation mode ``relu(a_i + b_j)`` is computed by sorting ``b`` and taking suffix sums, with
``O((N + M) Cv)`` memory, and its gradient by the same construction with queries and keys swapped
(a custom VJP, so no gather of the sort is transposed into a scatter). The affinity matrix is
formed only when ``return_weights=True``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.ops.checks import check_rank
from flax_attn.ops.dtypes import statistics_dtype

__all__ = ["NON_LOCAL_MODES", "non_local_attention"]

NON_LOCAL_MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


def _concat_terms(theta, phi, concat_kernel):
    ck = theta.shape[-1]
    w = jnp.asarray(concat_kernel).reshape(-1).astype(theta.dtype)
    if w.shape[0] != 2 * ck:
        raise ValueError(
            f"non_local_attention: `concat_kernel` must have 2 * {ck} = {2 * ck} entries "
            f"(theta channels then phi channels), got shape {jnp.shape(concat_kernel)}"
        )
    a = jnp.einsum("bnc,c->bn", theta, w[:ck], preferred_element_type=statistics_dtype(theta.dtype))
    b = jnp.einsum("bmc,c->bm", phi, w[ck:], preferred_element_type=statistics_dtype(phi.dtype))
    return a, b


def _suffix(t):
    """``out[k] = sum_{j >= k} t[j]`` along axis 1, with ``out[M] = 0``: ``(B, M, ...) -> (B, M + 1, ...)``."""
    s = jnp.flip(jnp.cumsum(jnp.flip(t, axis=1), axis=1), axis=1)
    return jnp.concatenate([s, jnp.zeros_like(s[:, :1])], axis=1)


def _sums_above(keys, values, thresholds):
    """For every threshold ``t_i``: ``sum_{j: keys_j > t_i} v_j`` for each ``v`` in ``values``.

    Sort the keys once, take suffix sums of the values in that order and binary-search each
    threshold: ``O((N + M) log M)`` work and no ``(N, M)`` matrix. keys ``(B, M)``, values
    ``(B, M, C)``, thresholds ``(B, N)`` -> ``(B, N, C)`` each.
    """
    order = jnp.argsort(keys, axis=-1)
    sorted_keys = jnp.take_along_axis(keys, order, axis=-1)
    start = jax.vmap(lambda k, t: jnp.searchsorted(k, t, side="right"))(sorted_keys, thresholds)
    out = []
    for v in values:
        sv = _suffix(jnp.take_along_axis(v, order[..., None], axis=1))
        out.append(jnp.take_along_axis(sv, start[..., None], axis=1))
    return out


@jax.custom_vjp
def _relu_pair_sum(a, b, g):
    """``y_i = sum_j relu(a_i + b_j) g_j`` without the (N, M) matrix (one floating dtype in and out).

    ``relu(a_i + b_j) > 0`` exactly when ``b_j > -a_i``, so ``y_i = a_i G_i + BG_i`` with ``G_i``
    and ``BG_i`` the sums of ``g_j`` and ``b_j g_j`` over those keys (:func:`_sums_above`).
    The gradient is written by hand: autodiff through the sort and the searches would transpose
    their gathers into scatter-adds (serial loops on XLA:CPU and TPU). By symmetry the key side
    is the same computation with the roles swapped: key ``j`` is reached by the queries with
    ``a_i > -b_j``, so ``dg_j = sum_i (a_i + b_j) ct_i`` and ``db_j = g_j . sum_i ct_i`` over those
    queries, again sums above thresholds (sorting the queries). Only gathers remain.
    """
    return _relu_pair_sum_fwd(a, b, g)[0]


def _relu_pair_sum_fwd(a, b, g):
    sg, sbg = _sums_above(b, [g, b[..., None] * g], -a)
    return a[..., None] * sg + sbg, (a, b, g, sg)


def _relu_pair_sum_bwd(res, ct):
    a, b, g, sg = res
    da = jnp.sum(ct * sg, axis=-1)
    sct, sact = _sums_above(a, [ct, a[..., None] * ct], -b)  # (B, M, Cv) each
    dg = sact + b[..., None] * sct
    db = jnp.sum(g * sct, axis=-1)
    return da, db, dg


_relu_pair_sum.defvjp(_relu_pair_sum_fwd, _relu_pair_sum_bwd)


def _concat_sorted(a, b, g):
    """``sum_j relu(a_i + b_j) g_j`` without the (N, M) matrix; see :func:`_relu_pair_sum`."""
    dt = jnp.result_type(a.dtype, b.dtype, statistics_dtype(g.dtype))
    return _relu_pair_sum(a.astype(dt), b.astype(dt), g.astype(dt))


def non_local_attention(
    theta: jax.Array,
    phi: jax.Array,
    g: jax.Array,
    *,
    mode: str = "embedded_gaussian",
    concat_kernel: jax.Array | None = None,
    return_weights: bool = False,
):
    """Non-local aggregation ``y = (f(theta, phi) / C) g``.

    Modes (``C`` is the normaliser):

    * ``"embedded_gaussian"`` and ``"gaussian"``: ``softmax_j(theta_i . phi_j)`` (the Gaussian mode
      passes the raw input as ``theta``/``phi``).
    * ``"dot_product"``: ``theta_i . phi_j / M``.
    * ``"concatenation"``: ``relu(w^T [theta_i; phi_j]) / M`` with ``concat_kernel`` ``w`` of
      ``2 * Ck`` entries, theta's half first (the official ``concat_project`` 1x1 conv, no bias).

    Args:
      theta: ``(B, N, Ck)``.
      phi: ``(B, M, Ck)``.
      g: ``(B, M, Cv)``.
      return_weights: also return ``f / C`` as ``(B, N, M)`` (the official ``nl_map``).

    Returns:
      ``y`` ``(B, N, Cv)`` in ``g``'s dtype, or ``(y, weights)``. Softmax runs in float32.
    """
    fn = "non_local_attention"
    check_rank(fn, "theta", theta, 3, "(batch, positions, channels)")
    check_rank(fn, "phi", phi, 3, "(batch, key_positions, channels)")
    check_rank(fn, "g", g, 3, "(batch, key_positions, value_channels)")
    if mode not in NON_LOCAL_MODES:
        raise ValueError(f"{fn}: `mode` must be one of {NON_LOCAL_MODES}, got {mode!r}")
    if phi.shape[0] != theta.shape[0] or phi.shape[2] != theta.shape[2]:
        raise ValueError(
            f"{fn}: `phi` {tuple(phi.shape)} must match `theta` {tuple(theta.shape)} in batch and channels"
        )
    if g.shape[:2] != phi.shape[:2]:
        raise ValueError(f"{fn}: `g` {tuple(g.shape)} must match `phi` {tuple(phi.shape)} in batch and positions")
    if (mode == "concatenation") != (concat_kernel is not None):
        raise ValueError(f"{fn}: `concat_kernel` is required for mode='concatenation' and only for it")
    m = phi.shape[1]
    out_dtype = g.dtype

    if mode in ("embedded_gaussian", "gaussian"):
        logits = jnp.einsum("bnc,bmc->bnm", theta, phi, preferred_element_type=statistics_dtype(g.dtype))
        weights = jax.nn.softmax(logits, axis=-1)
    elif mode == "dot_product":
        if not return_weights:
            # Linear in f: associate the other way round and never form (N, M).
            kv = jnp.einsum("bmc,bmd->bcd", phi, g, preferred_element_type=statistics_dtype(g.dtype))
            y = jnp.einsum("bnc,bcd->bnd", theta.astype(kv.dtype), kv) / m
            return y.astype(out_dtype)
        weights = jnp.einsum("bnc,bmc->bnm", theta, phi, preferred_element_type=statistics_dtype(g.dtype)) / m
    else:
        a, b = _concat_terms(theta, phi, concat_kernel)
        if not return_weights:
            return (_concat_sorted(a, b, g) / m).astype(out_dtype)
        weights = jax.nn.relu(a[:, :, None] + b[:, None, :]) / m

    y = jnp.einsum("bnm,bmd->bnd", weights.astype(g.dtype), g, preferred_element_type=statistics_dtype(g.dtype)).astype(
        out_dtype
    )
    if return_weights:
        return y, weights.astype(out_dtype)
    return y
