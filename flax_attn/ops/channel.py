"""Pooling and gating math shared by the channel and lightweight attention blocks (NHWC).

* :func:`channel_pool`: per-pixel statistics across channels (CBAM's spatial gate).
* :func:`global_pool`: per-channel statistics over the image (SE, CBAM, ECA; avg/max/lp/lse).
* :func:`attention_pool2d`: softmax-weighted global pooling (GCNet's ``att`` context modelling).
* :func:`directional_avg_pool`: averages along W and along H (coordinate attention).
* :func:`eca_kernel_size`: ECA-Net's adaptive 1-D kernel size.

Reductions run in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from flax_attn.ops.checks import check_rank
from flax_attn.ops.dtypes import statistics_dtype

__all__ = ["attention_pool2d", "channel_pool", "directional_avg_pool", "eca_kernel_size", "global_pool"]

_NHWC = "(batch, height, width, channels)"


def channel_pool(x: jax.Array, order: Sequence[str] = ("max", "mean")) -> jax.Array:
    """Max and mean over channels, stacked as channels in ``order``: ``(B, H, W, C) -> (B, H, W, 2)``.

    CBAM's official ``ChannelPool`` stacks ``[max, mean]``; some re-implementations use
    ``[mean, max]``. The order decides which input channel of the following conv sees which map.
    """
    check_rank("channel_pool", "x", x, 4, _NHWC)
    maps = {
        "max": lambda: jnp.max(x, axis=-1),
        "mean": lambda: jnp.mean(x, axis=-1, dtype=statistics_dtype(x.dtype)).astype(x.dtype),
    }
    bad = [o for o in order if o not in maps]
    if bad:
        raise ValueError(f"channel_pool: `order` entries must be 'max' or 'mean', got {tuple(order)!r}")
    return jnp.stack([maps[o]() for o in order], axis=-1)


def global_pool(x: jax.Array, pool_type: str = "avg") -> jax.Array:
    """Global pooling over H and W: ``(B, H, W, C) -> (B, C)``.

    ``pool_type``: ``"avg"``, ``"max"``, ``"lp"`` (power-2 ``F.lp_pool2d`` over the whole map, i.e.
    the L2 norm) or ``"lse"`` (log-sum-exp, computed stably from the max as CBAM does).
    """
    check_rank("global_pool", "x", x, 4, _NHWC)
    xf = x.astype(statistics_dtype(x.dtype))
    if pool_type == "avg":
        y = jnp.mean(xf, axis=(1, 2))
    elif pool_type == "max":
        y = jnp.max(xf, axis=(1, 2))
    elif pool_type == "lp":
        # torch: (sign(s) * relu(|s|)) ** 0.5 with s = sum(x ** 2); s >= 0, so this is sqrt(s).
        y = jnp.sqrt(jnp.sum(jnp.square(xf), axis=(1, 2)))
    elif pool_type == "lse":
        m = jax.lax.stop_gradient(jnp.max(xf, axis=(1, 2), keepdims=True))
        y = (m + jnp.log(jnp.sum(jnp.exp(xf - m), axis=(1, 2), keepdims=True)))[:, 0, 0]
    else:
        raise ValueError(f"global_pool: `pool_type` must be 'avg', 'max', 'lp' or 'lse', got {pool_type!r}")
    return y.astype(x.dtype)


def attention_pool2d(x: jax.Array, logits: jax.Array) -> jax.Array:
    """Softmax-weighted global pooling: ``sum_p softmax(logits)_p * x_p`` over all H*W positions.

    Args:
      x: ``(B, H, W, C)`` features.
      logits: ``(B, H, W)`` or ``(B, H, W, 1)`` attention logits (GCNet's ``conv_mask`` output).

    Returns:
      ``(B, C)`` context vectors. The softmax runs in float32.
    """
    check_rank("attention_pool2d", "x", x, 4, _NHWC)
    if logits.ndim == 4 and logits.shape[-1] == 1:
        logits = logits[..., 0]
    if logits.shape != x.shape[:3]:
        raise ValueError(
            f"attention_pool2d: `logits` must have shape {x.shape[:3]} or {(*x.shape[:3], 1)} "
            f"(one logit per position of `x` {x.shape}), got {logits.shape}"
        )
    b, h, w, c = x.shape
    weights = jax.nn.softmax(logits.reshape(b, h * w).astype(statistics_dtype(logits.dtype)), axis=-1)
    return jnp.einsum("bp,bpc->bc", weights.astype(x.dtype), x.reshape(b, h * w, c))


def directional_avg_pool(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Coordinate attention's two 1-D poolings: ``(B, H, W, C) -> ((B, H, C), (B, W, C))``.

    The first averages each row over W (``AdaptiveAvgPool2d((None, 1))``), the second each column
    over H (``AdaptiveAvgPool2d((1, None))``).
    """
    check_rank("directional_avg_pool", "x", x, 4, _NHWC)
    x_h = jnp.mean(x, axis=2, dtype=statistics_dtype(x.dtype)).astype(x.dtype)
    x_w = jnp.mean(x, axis=1, dtype=statistics_dtype(x.dtype)).astype(x.dtype)
    return x_h, x_w


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """ECA-Net's adaptive kernel size ``k = |log2(C) / gamma + b / gamma|``, made odd (arXiv 1910.03151).

    As in the official ECA-ResNet/MobileNet code: ``t = int(abs((log2(C) + b) / gamma))``, then
    ``k = t`` if ``t`` is odd else ``t + 1`` (C=64 gives 3, C=256 gives 5, C=2048 gives 7).
    """
    if channels <= 0:
        raise ValueError(f"eca_kernel_size: `channels` must be positive, got {channels}")
    t = int(abs((math.log(channels, 2) + b) / gamma))
    return t if t % 2 else t + 1
