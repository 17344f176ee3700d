"""The pairwise functions of non-local blocks (Wang et al., CVPR 2018, arXiv 1711.07971).

``y_i = sum_j f(theta_i, phi_j) g_j / C(x)`` for the four instantiations of the paper, on flattened
positions: ``theta`` ``(B, N, Ck)`` (queries), ``phi`` ``(B, M, Ck)`` and ``g`` ``(B, M, Cv)`` (the
possibly sub-sampled keys and values).

Memory: only the Gaussian modes need the ``(N, M)`` affinity matrix. The dot-product mode is
linear, so ``theta (phi^T g) / M`` gives the same result from a ``(Ck, Cv)`` matrix; the
concatenation mode ``relu(a_i + b_j)`` is computed by sorting ``b`` and taking suffix sums, with
``O((N + M) Cv)`` memory. The affinity matrix is formed only when ``return_weights=True``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.ops._checks import check_rank
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


def _concat_sorted(a, b, g):
    """``sum_j relu(a_i + b_j) g_j`` without the (N, M) matrix: b sorted, suffix sums, one search."""
    order = jnp.argsort(b, axis=-1)
    bs = jnp.take_along_axis(b, order, axis=-1)  # (B, M) ascending
    gs = jnp.take_along_axis(g.astype(statistics_dtype(g.dtype)), order[..., None], axis=1)  # (B, M, Cv)

    def suffix(t):  # suffix[k] = sum_{j >= k} t[j], with suffix[M] = 0
        s = jnp.flip(jnp.cumsum(jnp.flip(t, axis=1), axis=1), axis=1)
        return jnp.concatenate([s, jnp.zeros_like(s[:, :1])], axis=1)

    sg = suffix(gs)
    sbg = suffix(bs[..., None] * gs)
    # relu(a + b_j) > 0 exactly for b_j > -a: the first such index in the sorted keys.
    start = jax.vmap(lambda keys, q: jnp.searchsorted(keys, q, side="right"))(
        jax.lax.stop_gradient(bs), jax.lax.stop_gradient(-a)
    )
    take = lambda s: jnp.take_along_axis(s, start[..., None], axis=1)  # noqa: E731
    return a[..., None] * take(sg) + take(sbg)


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
        raise ValueError(
            f"{fn}: `g` {tuple(g.shape)} must match `phi` {tuple(phi.shape)} in batch and positions"
        )
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
