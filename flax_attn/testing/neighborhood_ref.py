"""Dense masked-attention reference for neighbourhood attention (tests only; small inputs).

The mask is NATTEN 0.21's own window rule, written pair by pair the way its Flex-Attention
backend states it (``natten/backends/flex.py``, ``get_na_flex_mask``): for every (query, key) pair
and every axis, same dilation group, then the causal or the clamped-centre condition on the
positions inside the group. Nothing here shares code with :mod:`flax_attn.ops.neighborhood`, so a
test of one against the other can fail. Attention itself is a plain ``softmax(q k^T * scale +
bias) v`` over all keys with the mask applied, in JAX, so gradients come from autodiff of the
dense formula. The relative positional bias is added the way NAT/DiNAT do (``natten`` <= 0.17,
``rpb[h, (key - query) / dilation + k - 1]`` per axis); a query with no visible key gets zeros.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np

__all__ = ["dense_neighborhood_attention", "natten014_window_start", "natten_mask", "window_starts"]


def _axis_allowed(qi, ki, length: int, k: int, s: int, d: int, causal: bool):
    """One axis of NATTEN's flex mask for query positions ``qi`` and key positions ``ki`` (ints or
    broadcastable integer arrays; the same expressions as the flex ``mask_mod``)."""
    qi, ki = np.asarray(qi), np.asarray(ki)
    g = qi % d
    mq, mk = qi // d, ki // d
    group_len = length // d + (1 - (g + (d - length % d)) // d)
    same_group = g == ki % d
    if causal:
        leader = np.minimum((mq // s) * s + s - 1, group_len - 1)
        return same_group & (mq - mk >= 0) & (leader - mk < k)
    left, right = k // 2, k // 2 + (k % 2 - 1)
    leader = np.minimum((mq // s) * s + s // 2, group_len - 1)
    centre = np.clip(leader, left, group_len - 1 - right)
    w0, w1 = centre - mk, mk - centre
    return same_group & (((0 <= w0) & (w0 <= left)) | ((0 <= w1) & (w1 <= right)))


def natten014_window_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    """First key of query ``index``'s window along one axis: NATTEN 0.14's ``get_window_start``
    (``natten/src/cpp/natten_cpu_commons.h``, ``NEIGHBORHOOD_SIZE = kernel_size // 2``), the rule
    NAT's layer and the ``border="clamp"`` op follow (odd kernels, no stride, no causal)."""
    ns = kernel_size // 2
    if dilation <= 1:
        return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
    ni = index - ns * dilation
    if ni < 0:
        return index % dilation
    if index + ns * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dilation
        return a + imodd - kernel_size * dilation
    return ni


def natten_mask(spatial, kernel_size, stride, dilation, is_causal) -> np.ndarray:
    """``(N, N)`` boolean, ``N = prod(spatial)`` in row-major order: may query ``a`` see key ``b``."""
    n = len(spatial)
    per_axis = [
        np.array(
            [
                [
                    _axis_allowed(i, j, spatial[a], kernel_size[a], stride[a], dilation[a], is_causal[a])
                    for j in range(spatial[a])
                ]
                for i in range(spatial[a])
            ]
        )
        for a in range(n)
    ]
    mask = np.ones((1, 1), bool)
    for m in per_axis:  # the rule is a conjunction over axes: a Kronecker product of the axis masks
        mask = np.kron(mask, m).astype(bool)
    return mask


def window_starts(length: int, k: int, s: int, d: int, causal: bool) -> np.ndarray:
    """First key of every query's window along one axis (a causal window's first key may be < 0):
    the key of window offset ``t`` is ``start + t * d``."""
    starts = []
    for qi in range(length):
        allowed = np.flatnonzero(_axis_allowed(qi, np.arange(length), length, k, s, d, causal))
        if causal:
            g, mq = qi % d, qi // d
            group_len = length // d + (1 - (g + (d - length % d)) // d)
            leader = min((mq // s) * s + s - 1, group_len - 1)
            starts.append((leader - k + 1) * d + g)
        else:
            starts.append(allowed[0])
    return np.array(starts)


def dense_neighborhood_attention(
    q, k, v, kernel_size, stride, dilation, is_causal, scale=None, rpb=None, key_mask=None, return_weights=False
):
    """Neighbourhood attention as dense masked attention over all ``prod(spatial)`` keys.

    Args: as :func:`flax_attn.ops.na2d`: ``kernel_size``, ``stride``, ``dilation`` and
    ``is_causal`` each an int (bool) for every spatial axis or a tuple with one entry per axis.

    Returns:
      ``(B, *spatial, heads, D)`` in float32, and with ``return_weights`` the weights in window
      order ``(B, *spatial, heads, prod(kernel_size))`` (0 where the window has no visible key).
    """
    b, *spatial, heads, dim = q.shape
    n = len(spatial)
    kernel_size, stride, dilation, is_causal = (
        tuple(a) if isinstance(a, (tuple, list)) else (a,) * n for a in (kernel_size, stride, dilation, is_causal)
    )
    size = math.prod(spatial)
    scale = dim**-0.5 if scale is None else scale
    mask = jnp.asarray(natten_mask(spatial, kernel_size, stride, dilation, is_causal))
    qf, kf, vf = (x.astype(jnp.float32).reshape(b, size, heads, dim) for x in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    coords = np.stack(np.unravel_index(np.arange(size), spatial), axis=-1)  # (N, n)
    if rpb is not None:
        rel = (coords[None, :, :] - coords[:, None, :]) // np.asarray(dilation) + np.asarray(kernel_size) - 1
        rel = np.clip(rel, 0, 2 * np.asarray(kernel_size) - 2)  # out-of-window pairs are masked anyway
        logits = logits + rpb.astype(jnp.float32)[(slice(None), *(rel[..., a] for a in range(n)))][None]
    allowed = mask[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.reshape(b, 1, 1, size)
    logits = jnp.where(allowed, logits, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.where(allowed, jnp.exp(logits - top), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    weights = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, vf).reshape(b, *spatial, heads, dim)
    if not return_weights:
        return out
    starts = [window_starts(spatial[a], kernel_size[a], stride[a], dilation[a], is_causal[a]) for a in range(n)]
    window = np.zeros((size, math.prod(kernel_size)), np.int64)
    inside = np.zeros((size, math.prod(kernel_size)), bool)
    for qi in range(size):
        for t, offs in enumerate(itertools.product(*(range(x) for x in kernel_size))):
            key = [starts[a][coords[qi, a]] + offs[a] * dilation[a] for a in range(n)]
            if all(0 <= key[a] < spatial[a] for a in range(n)):
                window[qi, t] = np.ravel_multi_index(key, spatial)
                inside[qi, t] = True
    w = jnp.take_along_axis(weights, jnp.asarray(window)[None, None], axis=-1) * inside[None, None]
    return out, jnp.moveaxis(w, 1, 2).reshape(b, *spatial, heads, -1)
