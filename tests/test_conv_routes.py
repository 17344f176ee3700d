"""flax_attn.ops.conv: every dense form equals ``conv_general_dilated`` in values and gradients, and
on CPU the routed shapes really leave XLA's convolution (the speed reason they exist)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn.ops import conv as conv_ops


def _reference(x, kernel, strides, pads, dilation, groups):
    n = kernel.ndim - 2
    spatial = "DHW"[3 - n :]
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    return jax.lax.conv_general_dilated(
        x, kernel, strides, pads, rhs_dilation=dilation, dimension_numbers=dn, feature_group_count=groups
    )


# (input shape, kernel shape, strides, pads, dilation, groups, the form conv() must route to on CPU)
CASES = [
    ((2, 9, 11, 6), (1, 1, 6, 5), (1, 1), [(0, 0)] * 2, (1, 1), 1, "pointwise"),
    ((2, 9, 11, 6), (1, 1, 6, 5), (2, 3), [(0, 0)] * 2, (1, 1), 1, "pointwise"),
    ((2, 13, 6), (1, 6, 4), (2,), [(0, 0)], (1,), 1, "pointwise"),
    ((1, 4, 5, 6, 3), (1, 1, 1, 3, 7), (1, 2, 1), [(0, 0)] * 3, (1, 1, 1), 1, "pointwise"),
    ((2, 9, 11, 6), (3, 3, 1, 6), (1, 1), [(1, 1)] * 2, (1, 1), 6, "depthwise"),
    ((2, 9, 11, 6), (5, 3, 1, 6), (2, 1), [(2, 1), (0, 2)], (1, 2), 6, "depthwise"),
    ((2, 9, 11, 4), (3, 3, 1, 8), (1, 2), [(1, 1)] * 2, (2, 1), 4, "depthwise"),  # channel multiplier 2
    ((2, 5, 6, 8), (3, 3, 8, 4), (1, 1), [(1, 1)] * 2, (1, 1), 1, "patch_matmul"),
    ((2, 9, 9, 3), (3, 3, 3, 4), (2, 2), [(1, 1)] * 2, (2, 2), 1, "patch_matmul"),
    ((2, 16, 16, 3), (3, 3, 3, 4), (1, 1), [(1, 1)] * 2, (1, 1), 1, "xla"),  # 256 outputs: XLA's conv
    ((2, 9, 11, 6), (3, 3, 2, 6), (1, 1), [(1, 1)] * 2, (1, 1), 3, "grouped"),
    ((2, 10, 8, 18), (3, 3, 9, 8), (2, 2), [(1, 1)] * 2, (1, 1), 2, "grouped"),  # ACmix's dep_conv, smaller
    ((2, 9, 11, 6), (1, 3, 3, 4), (1, 2), [(0, 0), (2, 1)], (1, 2), 2, "grouped"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[-1]}-{i}" for i, c in enumerate(CASES)])
def test_conv_matches_conv_general_dilated(case):
    shape, kshape, strides, pads, dilation, groups, _ = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(kshape), jnp.float32)
    want, want_vjp = jax.vjp(lambda x, w: _reference(x, w, strides, pads, dilation, groups), x, w)
    got, got_vjp = jax.vjp(lambda x, w: conv_ops.conv(x, w, strides, pads, dilation, groups), x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ct = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    for g, r in zip(got_vjp(ct), want_vjp(ct)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the dense routes are CPU-only")
@pytest.mark.parametrize("case", CASES, ids=[f"{c[-1]}-{i}" for i, c in enumerate(CASES)])
def test_cpu_route_leaves_xla_convolution(case):
    shape, kshape, strides, pads, dilation, groups, route = case
    x = jnp.zeros(shape, jnp.float32)
    w = jnp.zeros(kshape, jnp.float32)

    def loss(x, w):
        return conv_ops.conv(x, w, strides, pads, dilation, groups).sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    if route == "grouped":  # one dense conv: no feature-grouped convolution forwards or backwards
        counts = re.findall(r"(?:feature|batch)_group_count = (\d+)", hlo)
        assert counts and set(counts) == {"1"}, counts
    else:
        assert ("stablehlo.convolution" in hlo) == (route == "xla"), route


def test_bfloat16_stays_bfloat16():
    x = jnp.ones((2, 5, 5, 4), jnp.bfloat16)
    for kshape, groups in (((1, 1, 4, 3), 1), ((3, 3, 1, 4), 4), ((3, 3, 4, 2), 1)):
        y = conv_ops.conv(
            x, jnp.ones(kshape, jnp.bfloat16), (1, 1), [(1, 1)] * 2 if kshape[0] == 3 else [(0, 0)] * 2, (1, 1), groups
        )
        assert y.dtype == jnp.bfloat16
