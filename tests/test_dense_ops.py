"""The dense forms that replace gathers and select_and_scatter: exact against their definitions."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from flax_attn.ops import interpolate, max_pool
from flax_attn.ops.neighborhood import _static_take, neighborhood_indices
from flax_attn.ops.non_local import _relu_pair_sum
from flax_attn.ops.relative_logits import skew
from flax_attn.ops.sampling import corner_pack
from flax_attn.ops.window import relative_position_bias, relative_position_index
from flax_attn.testing.hlo import SERIAL_OPS, count_ops

RNG = np.random.default_rng(0)


def _grad_hlo(f, x):
    return jax.jit(jax.grad(lambda t: jnp.sum(f(t)))).lower(x).as_text()


@pytest.mark.parametrize(
    "shape,args",
    [
        ((3, 13, 17, 4), (3, 2, 1)),
        ((2, 9, 11, 5), (2, None, 0)),
        ((2, 8, 10, 3), ((2, 3), (1, 2), (1, 1))),
        ((2, 7, 6, 5, 3), (2, None, 0)),
        ((2, 11, 3), (3, 1, 1)),
    ],
)
def test_max_pool_matches_torch_with_ties(shape, args):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional  # noqa: N806  (PyTorch's own alias)
    # ReLU'd and quantised: most windows hold several equal maxima (all zero, or equal halves).
    x = np.round(np.maximum(RNG.standard_normal(shape), 0) * 2).astype(np.float32) / 2
    k, s, p = args
    y, vjp = jax.vjp(jax.jit(lambda t: max_pool(t, k, s, p)), jnp.asarray(x))
    cot = RNG.standard_normal(y.shape).astype(np.float32)
    pool = {3: F.max_pool1d, 4: F.max_pool2d, 5: F.max_pool3d}[len(shape)]
    tx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).requires_grad_()
    ty = pool(tx, k, k if s is None else s, p)
    (tg,) = torch.autograd.grad((ty * torch.from_numpy(np.ascontiguousarray(np.moveaxis(cot, -1, 1)))).sum(), tx)
    np.testing.assert_array_equal(np.asarray(y), np.moveaxis(ty.detach().numpy(), 1, -1))
    # Exact: each output's gradient goes to the first maximum of its window, as in torch.
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(cot))[0]), np.moveaxis(tg.numpy(), 1, -1))


def test_max_pool_gradient_is_dense_and_differentiable_twice():
    x = jnp.asarray(RNG.standard_normal((2, 9, 8, 3)), jnp.float32)
    counts = count_ops(_grad_hlo(lambda t: max_pool(t, 3, 2, 1), x), SERIAL_OPS)
    assert counts == {"stablehlo.scatter": 0, "stablehlo.select_and_scatter": 0}
    check_grads(lambda t: max_pool(t, 3, 2, 1), (x,), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


def test_max_pool_rejects_bad_arguments():
    x = jnp.zeros((1, 5, 5, 2))
    with pytest.raises(ValueError, match="max_pool: kernel_size and stride must be positive"):
        max_pool(x, 2, 0)
    with pytest.raises(ValueError, match="max_pool: `x` must be floating point"):
        max_pool(jnp.zeros((1, 5, 5, 2), jnp.int32), 2)


@pytest.mark.parametrize(
    "kw",
    [
        dict(scale_factor=2, mode="nearest"),
        dict(size=(7, 5), mode="nearest"),
        dict(scale_factor=1.7, mode="nearest"),
        dict(size=(20, 11), mode="bilinear", align_corners=False),
        dict(size=(20, 11), mode="bilinear", align_corners=True),
        dict(scale_factor=0.6, mode="bilinear", align_corners=False),
    ],
)
def test_interpolate_lowers_without_gather(kw):
    x = jnp.asarray(RNG.standard_normal((2, 13, 17, 3)), jnp.float32)
    text = _grad_hlo(lambda t: interpolate(t, **kw), x)
    assert count_ops(text, ["stablehlo.gather", "stablehlo.scatter"]) == {"stablehlo.gather": 0, "stablehlo.scatter": 0}


@pytest.mark.parametrize("length", [1, 2, 5, 8])
def test_skew_is_relative_to_absolute(length):
    rel = RNG.standard_normal((3, 2 * length - 1, 4)).astype(np.float32)
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    np.testing.assert_array_equal(np.asarray(skew(jnp.asarray(rel), length, axis=1)), rel[:, j - i + length - 1])
    with pytest.raises(ValueError, match=r"skew: axis 0 of `rel` must have 2 \* 3 - 1 entries"):
        skew(jnp.zeros((4, 2)), 3)


@pytest.mark.parametrize("m", [1, 2, 7])
def test_relative_position_bias_matches_swin_index(m):
    table = RNG.standard_normal(((2 * m - 1) ** 2, 3)).astype(np.float32)
    want = table[relative_position_index((m, m)).reshape(-1)].reshape(m * m, m * m, 3).transpose(2, 0, 1)
    np.testing.assert_array_equal(np.asarray(relative_position_bias(jnp.asarray(table), m)), want)


@pytest.mark.parametrize(
    "length,k,dilation,stride,border",
    [(13, 3, 1, 1, "clamp"), (13, 5, 2, 1, "clamp"), (20, 5, 3, 2, "clamp"), (17, 7, 1, 2, "reflect")],
)
def test_static_take_is_take(length, k, dilation, stride, border):
    x = RNG.standard_normal((2, length, 3)).astype(np.float32)
    for row in neighborhood_indices(length, k, dilation, stride, border):
        np.testing.assert_array_equal(np.asarray(_static_take(jnp.asarray(x), row, axis=1)), x[:, row])


def test_relu_pair_sum_matches_the_dense_matrix():
    a = RNG.standard_normal((2, 11)).astype(np.float32)
    b = RNG.standard_normal((2, 7)).astype(np.float32)
    b[0, 2] = -a[0, 3]  # an exact zero of relu: no gradient through it, as jax.nn.relu
    g = RNG.standard_normal((2, 7, 3)).astype(np.float32)
    ct = RNG.standard_normal((2, 11, 3)).astype(np.float32)

    def dense(a, b, g):
        return jnp.einsum("bnm,bmc->bnc", jax.nn.relu(a[:, :, None] + b[:, None, :]), g)

    y, vjp = jax.vjp(_relu_pair_sum, a, b, g)
    y_ref, vjp_ref = jax.vjp(dense, a, b, g)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(vjp(ct), vjp_ref(ct)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    text = jax.jit(jax.grad(lambda *t: jnp.sum(_relu_pair_sum(*t)), argnums=(0, 1, 2))).lower(a, b, g).as_text()
    assert count_ops(text, SERIAL_OPS) == {"stablehlo.scatter": 0, "stablehlo.select_and_scatter": 0}


def test_corner_pack_rows_are_the_four_corners():
    n, h, w, c = 2, 4, 5, 3
    x = RNG.standard_normal((n, h, w, c)).astype(np.float32)
    packed = np.asarray(corner_pack(jnp.asarray(x)))

    def px(y, xx):
        return x[:, y, xx] if 0 <= y < h and 0 <= xx < w else np.zeros((n, c), np.float32)

    for y, xx in itertools.product(range(-1, h), range(-1, w)):
        row = packed[:, (y + 1) * (w + 1) + (xx + 1)]
        want = np.stack([px(y, xx), px(y, xx + 1), px(y + 1, xx), px(y + 1, xx + 1)], axis=1)
        np.testing.assert_array_equal(row, want)


@pytest.mark.parametrize(
    "shape,ks,strides,pads,dilation",
    [
        ((3, 2, 3, 16), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
        ((2, 8, 7, 8), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),
        ((2, 5, 6, 4), (3, 2), (1, 2), ((2, 0), (1, 1)), (2, 1)),
        ((1, 1, 1, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ],
)
def test_patch_matmul_conv_matches_conv(shape, ks, strides, pads, dilation):
    from flax_attn.ops.conv import patch_matmul_conv

    x = jnp.asarray(RNG.standard_normal(shape), jnp.float32)
    w = jnp.asarray(RNG.standard_normal((*ks, shape[-1], 5)), jnp.float32)

    def conv(x, w):
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        return jax.lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation, dimension_numbers=dn)

    y, vjp = jax.vjp(lambda x, w: patch_matmul_conv(x, w, strides, pads, dilation), x, w)
    y_ref, vjp_ref = jax.vjp(conv, x, w)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    cot = jnp.asarray(RNG.standard_normal(y.shape), jnp.float32)
    for got, want in zip(vjp(cot), vjp_ref(cot)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_conv_on_a_tiny_map_is_one_matmul_on_cpu():
    from flax_attn.layers import Conv

    if jax.default_backend() != "cpu":
        pytest.skip("the patch-matmul path is CPU-only")
    conv = Conv(8, 3, padding=1)
    for hw, want_conv in ((4, False), (13, True)):  # 4x4 -> one matmul; 13x13 (169 outputs) keeps the conv
        x = jnp.zeros((2, hw, hw, 4))
        v = conv.init(jax.random.PRNGKey(0), x)
        text = jax.jit(jax.grad(lambda v, x: jnp.sum(conv.apply(v, x)))).lower(v, x).as_text()
        assert (count_ops(text, ["stablehlo.convolution"])["stablehlo.convolution"] > 0) == want_conv, hw
