"""Deformable convolution (Dai et al., arXiv 1703.06211; modulated v2: Zhu et al., arXiv 1811.11168).

``deform_conv2d`` follows ``torchvision.ops.deform_conv2d`` in NHWC:

* kernel point ``k = i * kw + j`` of offset group ``g`` samples the input at
  ``(oy * stride_h - pad_h + i * dilation_h + dy, ox * stride_w - pad_w + j * dilation_w + dx)``
  with ``dy = offset[..., 2 * (g * kh * kw + k)]`` and ``dx = offset[..., 2 * (g * kh * kw + k) + 1]``
  (torchvision's channel order, also mmcv's and the DCNv2 CUDA code's);
* bilinear sampling as torchvision's ``bilinear_interpolate``: a point with ``y <= -1``,
  ``y >= H``, ``x <= -1`` or ``x >= W`` gives 0; otherwise each of the four neighbours that lies
  inside the image contributes with its bilinear weight (the others count as 0);
* input channel ``c`` belongs to offset group ``c // (C / offset_groups)``; the v2 mask
  ``mask[..., g * kh * kw + k]`` multiplies the sampled value;
* the sampled columns are contracted with the weight as a grouped convolution.

Memory: the sampled columns ``(N, Ho, Wo, kh * kw, C)`` are the only large intermediate (the
im2col buffer torchvision also builds); there is one gather per bilinear corner and one matmul.
The sampling positions are data-dependent, so the backward keeps a scatter-add per corner. Reading
the four corners with one gather of a packed table (as ``grid_sample`` does) was measured and not
kept: 0.8x the speed of four gathers at 8x64x64x64, 3x3 (``benchmarks/dense_ops.py``), where the
packed table costs more than the three gathers and scatters it saves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.ops.checks import check_rank

__all__ = ["deform_conv2d"]


def _pair(where: str, name: str, v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"{where}: `{name}` must be an int or a pair, got {v!r}")
    return v


def deform_conv2d(
    x: jax.Array,
    offset: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """``torchvision.ops.deform_conv2d`` on NHWC inputs; differentiable in every array argument.

    Args:
      x: ``(N, H, W, C)``.
      offset: ``(N, Ho, Wo, 2 * offset_groups * kh * kw)``, ``(dy, dx)`` interleaved per kernel
        point (torchvision's channel order moved to the last axis). ``offset_groups`` is read from
        its size and must divide ``C``.
      weight: ``(kh, kw, C / groups, O)`` (HWIO, the Flax conv layout; torchvision's
        ``(O, C / groups, kh, kw)`` transposed). ``groups`` is ``C / weight.shape[2]``.
      bias: ``(O,)`` or None.
      stride, padding, dilation: int or ``(h, w)``; zero padding.
      mask: ``(N, Ho, Wo, offset_groups * kh * kw)`` modulation (DCNv2) or None.

    Returns:
      ``(N, Ho, Wo, O)``, ``Ho = (H + 2 * pad_h - dilation_h * (kh - 1) - 1) // stride_h + 1``.

    Example:
      >>> x = jnp.ones((1, 5, 6, 4)); w = jnp.ones((3, 3, 4, 8))
      >>> off = jnp.zeros((1, 5, 6, 2 * 9))  # zero offsets: an ordinary 3x3 convolution
      >>> deform_conv2d(x, off, w, padding=1).shape
      (1, 5, 6, 8)
    """
    where = "deform_conv2d"
    check_rank(where, "x", x, 4, "(N, H, W, C)")
    check_rank(where, "offset", offset, 4, "(N, Ho, Wo, 2 * offset_groups * kh * kw)")
    check_rank(where, "weight", weight, 4, "(kh, kw, C / groups, O) (HWIO)")
    sh, sw = _pair(where, "stride", stride)
    ph, pw = _pair(where, "padding", padding)
    dh, dw = _pair(where, "dilation", dilation)
    n, h, w, c = x.shape
    kh, kw, cin_g, out_c = weight.shape
    k = kh * kw
    if cin_g <= 0 or c % cin_g:
        raise ValueError(
            f"{where}: input channels {c} (x shape {tuple(x.shape)}) must be a multiple of the weight's "
            f"input channels {cin_g} (weight shape {tuple(weight.shape)}, HWIO)"
        )
    groups = c // cin_g
    if out_c % groups:
        raise ValueError(f"{where}: output channels {out_c} must be divisible by groups={groups}")
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"{where}: input {tuple(x.shape)} is too small for kernel {(kh, kw)} (output {ho}x{wo})")
    oc = offset.shape[-1]
    if oc == 0 or oc % (2 * k):
        raise ValueError(
            f"{where}: `offset` must have 2 * offset_groups * kh * kw channels (a multiple of {2 * k}), "
            f"got shape {tuple(offset.shape)}"
        )
    og = oc // (2 * k)
    if c % og:
        raise ValueError(f"{where}: input channels {c} must be divisible by offset_groups={og} (from `offset`)")
    if tuple(offset.shape[:3]) != (n, ho, wo):
        raise ValueError(
            f"{where}: `offset` must be ({n}, {ho}, {wo}, {oc}) for this input and kernel, got {tuple(offset.shape)}"
        )
    if mask is not None:
        check_rank(where, "mask", mask, 4, "(N, Ho, Wo, offset_groups * kh * kw)")
        if tuple(mask.shape) != (n, ho, wo, og * k):
            raise ValueError(
                f"{where}: `mask` must be ({n}, {ho}, {wo}, {og * k}) (offset_groups * kh * kw), "
                f"got {tuple(mask.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (out_c,):
        raise ValueError(f"{where}: `bias` must be ({out_c},), got {tuple(bias.shape)}")

    dtype = jnp.result_type(x.dtype, weight.dtype)
    cdt = jnp.promote_types(offset.dtype, jnp.float32)  # coordinates always in >= float32
    off = offset.astype(cdt).reshape(n, ho, wo, og, k, 2)
    ki, kj = jnp.divmod(jnp.arange(k), kw)
    base_y = (jnp.arange(ho) * sh - ph)[:, None, None] + (ki * dh)[None, None, :]  # (Ho, 1, K)
    base_x = (jnp.arange(wo) * sw - pw)[None, :, None] + (kj * dw)[None, None, :]  # (1, Wo, K)
    py = base_y[None, :, :, None, :].astype(cdt) + off[..., 0]  # (N, Ho, Wo, G, K)
    px = base_x[None, :, :, None, :].astype(cdt) + off[..., 1]

    # Offset-group-major view of x: (N, G, H*W, C/G).
    xg = x.reshape(n, h * w, og, c // og).transpose(0, 2, 1, 3)
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0f = jnp.floor(jax.lax.stop_gradient(py))
    x0f = jnp.floor(jax.lax.stop_gradient(px))
    y0 = y0f.astype(jnp.int32)
    x0 = x0f.astype(jnp.int32)
    ly, lx = py - y0f, px - x0f

    def corner(iy, ix, wgt):
        ok = inside & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        idx = jnp.where(ok, iy * w + ix, 0)  # (N, Ho, Wo, G, K)
        idx = idx.transpose(0, 3, 1, 2, 4).reshape(n, og, ho * wo * k)
        vals = jnp.take_along_axis(xg, idx[..., None], axis=2)  # (N, G, P*K, C/G)
        wgt = jnp.where(ok, wgt, 0).transpose(0, 3, 1, 2, 4).reshape(n, og, ho * wo * k, 1)
        return vals * wgt.astype(dtype)

    cols = (
        corner(y0, x0, (1 - ly) * (1 - lx))
        + corner(y0, x0 + 1, (1 - ly) * lx)
        + corner(y0 + 1, x0, ly * (1 - lx))
        + corner(y0 + 1, x0 + 1, ly * lx)
    )
    if mask is not None:
        m = mask.astype(dtype).reshape(n, ho, wo, og, k).transpose(0, 3, 1, 2, 4).reshape(n, og, ho * wo * k, 1)
        cols = cols * m
    # (N, G, P, K, C/G) -> (N, P, K, C) with channels back in their original order.
    cols = cols.reshape(n, og, ho * wo, k, c // og).transpose(0, 2, 3, 1, 4).reshape(n, ho * wo, k, groups, cin_g)
    wmat = weight.astype(dtype).reshape(k, cin_g, groups, out_c // groups)
    out = jnp.einsum("npkgc,kcgo->npgo", cols.astype(dtype), wmat).reshape(n, ho, wo, out_c)
    if bias is not None:
        out = out + bias.astype(dtype)
    return out
