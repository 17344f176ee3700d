"""Stereo matching ops of AANet (Xu & Zhang, CVPR 2020, arXiv 2004.09548; haofeixu/aanet), NHWC.

* :func:`correlation_cost_volume`: ``nets/cost.py``'s ``CostVolume`` with
  ``feature_similarity='correlation'``: ``cost[b, y, x, d] = mean_c left[b, y, x, c] *
  right[b, y, x - d, c]`` for ``x >= d`` and 0 for ``x < d`` (no right pixel to match).
* :func:`disparity_regression`: ``nets/estimation.py``'s ``DisparityEstimation``: soft-argmin,
  ``sum_d d * softmax_d(cost)`` over the candidates ``0 .. D - 1`` of the given volume (``D`` is the
  volume's own channel count, so one module serves every scale); the cost is negated first when
  it is a matching *cost* rather than a similarity (``match_similarity=False``).
* :func:`disparity_warp`: ``nets/warp.py``'s ``disp_warp``: the right image sampled at
  ``(x - disp, y)`` (bilinear, border padding), i.e. warped to the left view.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.ops.checks import check_rank
from flax_attn.ops.sampling import grid_sample

__all__ = ["correlation_cost_volume", "disparity_regression", "disparity_warp"]


def correlation_cost_volume(left: jax.Array, right: jax.Array, max_disp: int) -> jax.Array:
    """Correlation cost volume of two feature maps (AANet ``CostVolume``, ``'correlation'``).

    Args:
      left, right: ``(B, H, W, C)`` features of the left and right views.
      max_disp: number of disparity candidates ``D`` (``0 .. D - 1``); may exceed ``W`` (the
        candidates beyond the width are all zero, as in AANet).

    Returns:
      ``(B, H, W, D)``: ``mean_c left[..., x, c] * right[..., x - d, c]``, zero where ``x < d``.

    Example:
      >>> f = jnp.ones((1, 4, 6, 8))
      >>> correlation_cost_volume(f, f, 3)[0, 0, :, 2]
      Array([0., 0., 1., 1., 1., 1.], dtype=float32)
    """
    where = "correlation_cost_volume"
    check_rank(where, "left", left, 4, "(B, H, W, C)")
    check_rank(where, "right", right, 4, "(B, H, W, C)")
    if left.shape != right.shape:
        raise ValueError(
            f"{where}: `left` and `right` must have the same shape, got {tuple(left.shape)} and {tuple(right.shape)}"
        )
    if not isinstance(max_disp, int) or max_disp <= 0:
        raise ValueError(f"{where}: `max_disp` must be a positive int, got {max_disp!r}")
    w = left.shape[2]
    slices = []
    for d in range(max_disp):
        if d == 0:
            slices.append(jnp.mean(left * right, axis=-1))
        elif d >= w:
            slices.append(jnp.zeros(left.shape[:3], jnp.result_type(left, right)))
        else:
            # Shifting right by d with zero fill makes the x < d columns exactly 0.
            shifted = jnp.pad(right[:, :, : w - d], ((0, 0), (0, 0), (d, 0), (0, 0)))
            slices.append(jnp.mean(left * shifted, axis=-1))
    return jnp.stack(slices, axis=-1)


def disparity_regression(cost: jax.Array, *, match_similarity: bool = True) -> jax.Array:
    """Soft-argmin disparity (AANet ``DisparityEstimation``).

    Args:
      cost: ``(B, H, W, D)``, one score per disparity candidate ``0 .. D - 1``.
      match_similarity: True when larger ``cost`` means a better match (correlation, AANet's
        default); False negates it first (a matching cost, as for difference/concat volumes).

    Returns:
      ``(B, H, W)`` expected disparity ``sum_d d * softmax_d``, in ``[0, D - 1]``; the softmax runs
      in float32.

    Example:
      >>> c = jnp.array([[[[0.0, 50.0, 0.0]]]])
      >>> round(float(disparity_regression(c)[0, 0, 0]), 4)
      1.0
    """
    check_rank("disparity_regression", "cost", cost, 4, "(B, H, W, D)")
    c = cost.astype(jnp.promote_types(cost.dtype, jnp.float32))
    if not match_similarity:
        c = -c
    prob = jax.nn.softmax(c, axis=-1)
    candidates = jnp.arange(cost.shape[-1], dtype=prob.dtype)
    return jnp.sum(prob * candidates, axis=-1).astype(cost.dtype)


def disparity_warp(img: jax.Array, disp: jax.Array, padding_mode: str = "border") -> jax.Array:
    """Warp the right view to the left one by a disparity map (AANet ``disp_warp``'s image).

    Args:
      img: ``(B, H, W, C)`` right image (or features).
      disp: ``(B, H, W)`` non-negative disparity in pixels of ``img``.
      padding_mode: ``"border"`` (AANet's default) or ``"zeros"``.

    Returns:
      ``(B, H, W, C)``: ``img`` sampled bilinearly at ``(x - disp, y)``. AANet normalises pixel
      coordinates by ``W - 1`` / ``H - 1`` and ran on PyTorch 1.2, whose ``grid_sample`` aligned
      corners; so this samples with ``align_corners=True`` and integer disparities hit pixels
      exactly.
    """
    where = "disparity_warp"
    check_rank(where, "img", img, 4, "(B, H, W, C)")
    check_rank(where, "disp", disp, 3, "(B, H, W)")
    if tuple(disp.shape) != tuple(img.shape[:3]):
        raise ValueError(f"{where}: `disp` must have shape {tuple(img.shape[:3])}, got {tuple(disp.shape)}")
    b, h, w, _ = img.shape
    dtype = jnp.promote_types(disp.dtype, jnp.float32)
    xs = jnp.arange(w, dtype=dtype)[None, None, :] - disp.astype(dtype)
    ys = jnp.broadcast_to(jnp.arange(h, dtype=dtype)[None, :, None], (b, h, w))
    # Same normalisation as AANet's normalize_coords (a 1-pixel axis would divide by zero there too).
    gx = 2 * (xs / max(w - 1, 1)) - 1
    gy = 2 * (ys / max(h - 1, 1)) - 1
    grid = jnp.stack([gx, gy], axis=-1)
    return grid_sample(img, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
