"""Convolution as XLA:CPU runs it fastest: one routing function and the dense forms it routes to.

:func:`conv` computes exactly ``jax.lax.conv_general_dilated`` (channels-last input, HWIO kernel,
symmetric or explicit padding, strides, kernel dilation, feature groups). On accelerators it is
that call. On CPU four kinds of shape take a dense form instead, because XLA:CPU's convolution emitter is
slow for them and its forward/backward would dominate the blocks that use them (measured in
``benchmarks/dense_ops.py``, results in ``benchmarks/results/dense_ops_cpu.md``):

* **pointwise** (1x1 kernel, one group): a matmul of the (strided) input rows with the kernel. XLA
  turns the 1x1 convolution's weight gradient into a convolution over the batch that is 3-10x
  slower than the ``x.T @ dy`` matmul it is.
* **depthwise** (``groups == in_channels``): ``kh * kw`` strided static slices of the padded input,
  each scaled by its tap's per-channel weights and summed. XLA:CPU runs a feature-grouped
  convolution as many tiny convolutions (a 3x3 depthwise conv over 4x56x56x256 took 57 ms
  forward against 2 ms for the slices); the slices' gradients are pads and per-channel sums.
* **grouped** (``1 < groups <= 64``, not depthwise): one dense conv with the block-diagonal kernel
  (zeros between groups). XLA:CPU's backward of a feature-grouped convolution is pathological:
  ACmix's ``dep_conv`` (4x56x56x288, 32 groups of 9 -> 8 channels, 3x3) took 34 s forward+backward
  against 0.32 s dense, at the same compiled memory (68.5 MB vs 66.0 MB). The dense conv does
  ``groups`` times the multiply-adds, so more groups stay on XLA's grouped convolution.
* **tiny output maps** (2-D, ``Ho * Wo <= 49``): im2col, the ``kh * kw`` slices concatenated on
  channels and contracted with the kernel in one matmul (see :func:`patch_matmul_conv`).

Every form is the same sum of products as the convolution, so results agree to float rounding; the
tests compare each with ``conv_general_dilated`` in values and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["conv", "depthwise_conv", "grouped_conv", "patch_matmul_conv", "pointwise_conv"]

# Largest output map (Ho * Wo) that a 2-D conv computes as one patch matmul on CPU. Measured
# forward+backward, 3x3, batch 8 (XLA:CPU, float32, highest precision): conv_general_dilated /
# patch matmul = 48x at 2x2 (512 -> 512: 99 ms vs 2 ms), 2.1x at 4x4, 1.3x at 7x7, 1.0x at 8x8,
# 0.94x at 14x14 and 0.42x at 28x28; XLA:CPU's convolution emitter has a slow path for tiny maps.
PATCH_MATMUL_MAX_OUTPUT = 49

# Most groups a grouped (not depthwise) conv runs as one dense block-diagonal conv on CPU.
GROUPED_AS_DENSE_MAX_GROUPS = 64


def _out_size(size: int, lo: int, hi: int, k: int, stride: int, dilation: int) -> int:
    return (size + lo + hi - dilation * (k - 1) - 1) // stride + 1


def _taps(x, ks, strides, pads, dilation):
    """The ``prod(ks)`` strided static slices of the zero-padded ``x``, offset-major (HWIO order)."""
    n = len(ks)
    out_sizes = [_out_size(x.shape[1 + a], *pads[a], ks[a], strides[a], dilation[a]) for a in range(n)]
    xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    offsets = [()]
    for a in range(n):
        offsets = [(*o, i * dilation[a]) for o in offsets for i in range(ks[a])]
    for start in offsets:
        limit = (xp.shape[0], *(s + (o - 1) * st + 1 for s, o, st in zip(start, out_sizes, strides)), xp.shape[-1])
        yield jax.lax.slice(xp, (0, *start, 0), limit, (1, *strides, 1))


def patch_matmul_conv(x, kernel, strides, pads, dilation):
    """A conv (HWIO kernel, one group) as im2col: the ``kh * kw`` strided static slices of the padded
    input concatenated on channels, contracted with the kernel in one matmul."""
    ks, cout = kernel.shape[:-2], kernel.shape[-1]
    patches = jnp.concatenate(list(_taps(x, ks, strides, pads, dilation)), axis=-1)
    return jnp.einsum("...k,ko->...o", patches, kernel.reshape(-1, cout))


def pointwise_conv(x, kernel, strides):
    """A 1x1 conv (one group, no padding) as one 2-D matmul of the strided input's rows."""
    n = x.ndim - 2
    if any(s != 1 for s in strides):
        x = jax.lax.slice(x, (0,) * x.ndim, x.shape, (1, *strides, 1))
    cin, cout = kernel.shape[-2:]
    y = x.reshape(-1, cin) @ kernel.reshape(cin, cout)
    return y.reshape(*x.shape[: n + 1], cout)


def depthwise_conv(x, kernel, strides, pads, dilation):
    """A depthwise conv (``groups == in_channels``, kernel ``(*ks, 1, in_channels * multiplier)``) as a
    sum of the taps' strided slices, each scaled by that tap's per-channel weights."""
    ks, cout = kernel.shape[:-2], kernel.shape[-1]
    multiplier = cout // x.shape[-1]
    if multiplier > 1:  # output channel o reads input channel o // multiplier, as in torch
        x = jnp.repeat(x, multiplier, axis=-1)
    weights = kernel.reshape(-1, cout)
    y = None
    for t, tap in enumerate(_taps(x, ks, strides, pads, dilation)):
        term = tap * weights[t]
        y = term if y is None else y + term
    return y


def grouped_conv(x, kernel, strides, pads, dilation, groups):
    """A grouped conv (kernel ``(*ks, in_channels / groups, out_channels)``) as one dense conv with the
    block-diagonal kernel: zero weights between groups, so ``groups`` times the multiply-adds, but
    XLA's dense convolution path forwards and backwards, with the grouped conv's memory."""
    ks, (cin_g, cout) = kernel.shape[:-2], kernel.shape[-2:]
    cout_g = cout // groups
    # torch's grouped weight: output channel o belongs to group o // cout_g and reads that group's inputs
    blocks = kernel.reshape(*ks, cin_g, groups, cout_g)
    dense = jnp.einsum("...igo,gh->...giho", blocks, jnp.eye(groups, dtype=kernel.dtype))
    return _xla_conv(x, dense.reshape(*ks, cin_g * groups, cout), strides, pads, dilation, 1)


def _xla_conv(x, kernel, strides, pads, dilation, groups):
    n = kernel.ndim - 2
    spatial = "DHW"[3 - n :]
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=dn,
        feature_group_count=groups,
    )


def conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    dilation: Sequence[int],
    groups: int = 1,
) -> jax.Array:
    """``conv_general_dilated`` of a channels-last ``x`` with an ``(*ks, in/groups, out)`` kernel,
    through the fastest equivalent form for the default backend (see the module docstring)."""
    n = kernel.ndim - 2
    ks = kernel.shape[:n]
    strides, dilation, pads = tuple(strides), tuple(dilation), [tuple(p) for p in pads]
    if jax.default_backend() == "cpu":
        out = [_out_size(x.shape[1 + a], *pads[a], ks[a], strides[a], dilation[a]) for a in range(n)]
        if groups == 1 and all(k == 1 for k in ks) and not any(lo or hi for lo, hi in pads):
            return pointwise_conv(x, kernel, strides)
        if groups > 1 and groups == x.shape[-1] and min(out) > 0:
            return depthwise_conv(x, kernel, strides, pads, dilation)
        if 1 < groups <= GROUPED_AS_DENSE_MAX_GROUPS and min(out) > 0:
            return grouped_conv(x, kernel, strides, pads, dilation, groups)
        if groups == 1 and n == 2 and min(out) > 0 and out[0] * out[1] <= PATCH_MATMUL_MAX_OUTPUT:
            return patch_matmul_conv(x, kernel, strides, pads, dilation)
    return _xla_conv(x, kernel, strides, pads, dilation, groups)
