"""PyTorch-exact resize, adaptive pooling and the torch-semantics layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn import layers
from flax_attn.convert import from_torch, to_torch
from flax_attn.ops import adaptive_avg_pool2d, adaptive_max_pool2d, interpolate

torch = pytest.importorskip("torch")
F = torch.nn.functional

X = np.random.default_rng(0).standard_normal((3, 13, 17, 4)).astype(np.float32)


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_()


def _compare(jax_fn, torch_fn, x=X, atol=1e-5):
    cot = np.random.default_rng(1).standard_normal(np.shape(jax_fn(x))).astype(np.float32)
    out, vjp = jax.vjp(jax_fn, jnp.asarray(x))
    tx = _t(x)
    tout = torch_fn(tx)
    (tg,) = torch.autograd.grad((tout * torch.from_numpy(cot.transpose(0, 3, 1, 2))).sum(), tx)
    np.testing.assert_allclose(np.asarray(out), tout.detach().numpy().transpose(0, 2, 3, 1), atol=atol, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(vjp(jnp.asarray(cot))[0]), tg.numpy().transpose(0, 2, 3, 1), atol=atol, rtol=1e-5
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(size=(26, 34), mode="nearest"),
        dict(scale_factor=2, mode="nearest"),
        dict(size=(7, 5), mode="nearest"),
        dict(scale_factor=1.7, mode="nearest"),
        dict(size=(20, 11), mode="bilinear", align_corners=False),
        dict(size=(20, 11), mode="bilinear", align_corners=True),
        dict(scale_factor=3, mode="bilinear", align_corners=False),
        dict(scale_factor=0.6, mode="bilinear", align_corners=False),
        dict(size=(1, 1), mode="bilinear", align_corners=True),
    ],
)
def test_interpolate_matches_torch(kw):
    _compare(lambda x: interpolate(x, **kw), lambda t: F.interpolate(t, **kw))


@pytest.mark.parametrize("size", [1, (3, 5), (5, 7), (13, 17), (None, 1), (4, None), (9, 12)])
def test_adaptive_pooling_matches_torch_bins(size):
    tsize = size
    _compare(lambda x: adaptive_avg_pool2d(x, size), lambda t: F.adaptive_avg_pool2d(t, tsize))
    _compare(lambda x: adaptive_max_pool2d(x, size), lambda t: F.adaptive_max_pool2d(t, tsize))


def test_ops_bad_input():
    with pytest.raises(ValueError, match=r"interpolate: `x` must be 4-D .* got shape \(13, 17, 4\)"):
        interpolate(X[0], size=3)
    with pytest.raises(ValueError, match="exactly one of"):
        interpolate(X, size=3, scale_factor=2)
    with pytest.raises(ValueError, match="align_corners"):
        interpolate(X, size=3, align_corners=True)
    with pytest.raises(ValueError, match="positive"):
        adaptive_avg_pool2d(X, 0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 5), padding=(1, 2), dilation=(2, 1)),
        dict(kernel_size=3, padding=2, padding_mode="reflect", groups=2),
        dict(kernel_size=3, padding=1, padding_mode="replicate"),
        dict(kernel_size=3, padding=1, padding_mode="circular", bias=False),
        dict(kernel_size=1, groups=4),
    ],
)
def test_conv2d_matches_torch(kw):
    tkw = dict(kw)
    tconv = torch.nn.Conv2d(4, 8, **tkw)
    fkw = {("use_bias" if k == "bias" else k): v for k, v in kw.items()}
    conv = layers.Conv(8, **fkw)
    v = from_torch(conv, tconv.state_dict(), X)
    _compare(lambda x: conv.apply(v, x), tconv)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv_1d_3d(dims):
    rng = np.random.default_rng(0)
    shape = (2, 9, 3) if dims == 1 else (2, 5, 6, 7, 3)
    x = rng.standard_normal(shape).astype(np.float32)
    tconv = (torch.nn.Conv1d if dims == 1 else torch.nn.Conv3d)(3, 5, 3, padding=1, stride=2)
    conv = layers.Conv(5, 3, padding=1, stride=2, spatial_dims=dims)
    v = from_torch(conv, tconv.state_dict(), x)
    want = tconv(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).detach().numpy()
    np.testing.assert_allclose(np.asarray(conv.apply(v, x)), np.moveaxis(want, 1, -1), atol=1e-5)


def test_batchnorm_train_updates_like_torch():
    tbn = torch.nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        tbn.running_mean.normal_()
        tbn.running_var.uniform_(0.5, 2)
        tbn.weight.normal_()
        tbn.bias.normal_()
    bn = layers.BatchNorm(momentum=0.3)
    v = from_torch(bn, tbn.state_dict(), X)
    out, state = bn.apply(v, X, train=True, mutable=["batch_stats"])
    tbn.train()
    want = tbn(_t(X)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)
    sd = to_torch(bn, {**v, **state}, X)
    np.testing.assert_allclose(sd["running_var"], tbn.running_var.numpy(), rtol=1e-6)  # unbiased update
    np.testing.assert_allclose(sd["running_mean"], tbn.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    tbn.eval()
    v2 = from_torch(bn, tbn.state_dict(), X)
    np.testing.assert_allclose(
        np.asarray(bn.apply(v2, X)), tbn(_t(X)).detach().numpy().transpose(0, 2, 3, 1), atol=1e-5
    )


def test_layernorm_groupnorm_match_torch():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5, 8)) * 3 + 10).astype(np.float32)  # offset stresses the variance formula
    tln = torch.nn.LayerNorm(8)
    ln = layers.LayerNorm()
    v = from_torch(ln, tln.state_dict(), x)
    np.testing.assert_allclose(np.asarray(ln.apply(v, x)), tln(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    tgn = torch.nn.GroupNorm(2, 4)
    gn = layers.GroupNorm(num_groups=2)
    v = from_torch(gn, tgn.state_dict(), X)
    np.testing.assert_allclose(np.asarray(gn.apply(v, X)), tgn(_t(X)).detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_linear_default_init_is_torch_like():
    lin = layers.Linear(64)
    k = lin.init(jax.random.PRNGKey(0), jnp.ones((1, 100)))["params"]["kernel"]
    bound = 1 / np.sqrt(100)
    assert float(jnp.max(jnp.abs(k))) <= bound
    assert float(jnp.max(jnp.abs(k))) > 0.9 * bound  # uniform over the whole range


def test_conv_bad_input():
    with pytest.raises(ValueError, match=r"Conv\(.*\): input must be 4-D .* got shape \(13, 17, 4\)"):
        layers.Conv(3, 3).init(jax.random.PRNGKey(0), X[0])
    with pytest.raises(ValueError, match="not divisible by groups=3"):
        layers.Conv(3, 3, groups=3).init(jax.random.PRNGKey(0), X)
    with pytest.raises(ValueError, match="reflect padding 13 must be smaller than the input size 13"):
        layers.Conv(3, 3, padding=13, padding_mode="reflect").init(jax.random.PRNGKey(0), X)


def test_dtype_follows_input_and_param_dtype():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.BatchNorm()(layers.Conv(4, 3, padding=1)(x))

    x = jnp.asarray(X, jnp.bfloat16)
    v = M().init(jax.random.PRNGKey(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(v))
    assert M().apply(v, x).dtype == jnp.bfloat16


def test_max_pool_is_differentiable_under_jit():
    from flax_attn.ops.max_pool import max_pool

    g = jax.jit(jax.grad(lambda x: jnp.sum(max_pool(x, 3, 2, 1))))(jnp.asarray(X))
    tx = _t(X)
    (tg,) = torch.autograd.grad(F.max_pool2d(tx, 3, 2, 1).sum(), tx)
    np.testing.assert_array_equal(np.asarray(g), tg.numpy().transpose(0, 2, 3, 1))
