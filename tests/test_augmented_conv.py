"""Attention-augmented conv: relative logits (values and table gradients), strides, round trip, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import catalogue  # noqa: E402
from flax_attn.augmented_conv import AugmentedConv  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.ops.relative_logits import relative_logits_2d  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref.augmented_conv import AugmentedConv as TorchAugmentedConv  # noqa: E402

ENTRY = catalogue.get("augmented_conv_relative")


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize(
    "config,shape",
    [
        (
            dict(in_channels=5, out_channels=11, kernel_size=3, dk=12, dv=4, Nh=4, shape=9, relative=True),
            (2, 9, 9, 5),
        ),
        (
            dict(in_channels=5, out_channels=9, kernel_size=1, dk=6, dv=3, Nh=3, shape=0, relative=False, stride=2),
            (3, 11, 14, 5),
        ),
        (
            dict(in_channels=4, out_channels=8, kernel_size=5, dk=4, dv=2, Nh=1, shape=6, relative=True, stride=2),
            (1, 11, 12, 4),
        ),
    ],
    ids=["relative-stride1-4heads", "plain-stride2-k1", "relative-k5-1head"],
)
def test_variants(config, shape):
    check_parity(ENTRY, config=config, inputs={"x": _x(shape)})


def test_relative_table_gradients_match_reference():
    cfg = dict(in_channels=4, out_channels=10, kernel_size=3, dk=6, dv=4, Nh=2, shape=7, relative=True)
    t = TorchAugmentedConv(**cfg)
    randomize_torch_module(t)
    x = _x((2, 7, 7, 4))
    cot = _x((2, 7, 7, 10), seed=1)
    tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    (t(tx) * torch.from_numpy(np.moveaxis(cot, -1, 1).copy())).sum().backward()

    m = AugmentedConv(**cfg)
    variables = from_torch(m, {k: v.detach().numpy() for k, v in t.state_dict().items()}, jnp.asarray(x))
    grads = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, jnp.asarray(x)) * cot))(variables["params"])
    for name in ("key_rel_h", "key_rel_w"):
        np.testing.assert_allclose(grads[name], getattr(t, name).grad.numpy(), atol=1e-5, rtol=1e-5)


def test_relative_logits_definition():
    """rel_w[x, y, v] = q[x, y] . key_rel_w[v - y + W - 1] (and likewise for h), checked by brute force."""
    rng = np.random.default_rng(0)
    b, h, w, nh, d = 1, 3, 5, 2, 4
    q = rng.standard_normal((b, h, w, nh, d)).astype(np.float32)
    kh = rng.standard_normal((2 * h - 1, d)).astype(np.float32)
    kw = rng.standard_normal((2 * w - 1, d)).astype(np.float32)
    rel_h, rel_w = relative_logits_2d(jnp.asarray(q), jnp.asarray(kh), jnp.asarray(kw))
    assert rel_h.shape == (b, nh, h, w, h) and rel_w.shape == (b, nh, h, w, w)
    for x in range(h):
        for y in range(w):
            for n in range(nh):
                for u in range(h):
                    assert np.isclose(rel_h[0, n, x, y, u], q[0, x, y, n] @ kh[u - x + h - 1], atol=1e-5)
                for v in range(w):
                    assert np.isclose(rel_w[0, n, x, y, v], q[0, x, y, n] @ kw[v - y + w - 1], atol=1e-5)


def test_round_trip():
    t = TorchAugmentedConv(**ENTRY.config)
    sd = {k: v.detach().numpy() for k, v in t.state_dict().items()}
    assert {"key_rel_w", "key_rel_h", "qkv_conv.weight", "attn_out.bias"} <= set(sd)
    m = AugmentedConv(**ENTRY.config)
    x = jnp.ones((1, 25, 26, 6))
    back = to_torch(m, from_torch(m, sd, x), x)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_bad_input():
    k = jax.random.PRNGKey(0)
    x = jnp.ones((1, 8, 8, 3))
    base = dict(in_channels=3, out_channels=10, kernel_size=3, dk=8, dv=4, Nh=2)
    with pytest.raises(ValueError, match=r"AugmentedConv: `Nh`=0 must be at least 1"):
        AugmentedConv(**{**base, "Nh": 0}).init(k, x)
    with pytest.raises(ValueError, match=r"`dk`=8 must be a positive multiple of `Nh`=3"):
        AugmentedConv(**{**base, "Nh": 3, "dv": 6}).init(k, x)
    with pytest.raises(ValueError, match=r"`dv`=5 must be a positive multiple of `Nh`=2"):
        AugmentedConv(**{**base, "dv": 5}).init(k, x)
    with pytest.raises(ValueError, match=r"`stride` must be 1 or 2, got 3"):
        AugmentedConv(**{**base, "stride": 3}).init(k, x)
    with pytest.raises(ValueError, match=r"`out_channels`=4 must exceed `dv`=4"):
        AugmentedConv(**{**base, "out_channels": 4}).init(k, x)
    with pytest.raises(ValueError, match=r"relative=True needs `shape`"):
        AugmentedConv(**base, relative=True).init(k, x)
    with pytest.raises(ValueError, match=r"shape=8 needs a 8x8 output map, but input \(1, 8, 9, 3\) gives 8x9"):
        AugmentedConv(**base, relative=True, shape=8).init(k, jnp.ones((1, 8, 9, 3)))
    with pytest.raises(ValueError, match=r"shape=8 needs a 8x8 output map.*gives 4x4 \(stride 2\)"):
        AugmentedConv(**base, relative=True, shape=8, stride=2).init(k, x)
    with pytest.raises(ValueError, match=r"AugmentedConv: `x` must have 3 channels"):
        AugmentedConv(**base).init(k, jnp.ones((1, 8, 8, 4)))
