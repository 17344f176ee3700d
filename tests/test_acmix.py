"""ACmix and Swin WindowAttention: official-semantics parity, options, init, conversion, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import catalogue  # noqa: E402
from flax_attn.acmix import ACmix, WindowAttention  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.ops.window import relative_position_index, shift_attention_mask  # noqa: E402
from flax_attn.testing.parity import check_parity  # noqa: E402
from flax_attn.testing.torch_ref import acmix as ref  # noqa: E402


# ACmix has no BatchNorm/dropout, so the catalogue marks it train_mode=False and the generic test
# (eval, both catalogue entries) skips train; train=True is run here and must change nothing.
def test_acmix_stride2_parity_train():
    check_parity(catalogue.get("acmix_stride2"), train=True)


def test_acmix_parity_other_config_train():
    """A 5x5 attention window with 2 heads of width 6 on a 9x11 map (reflect pad 2 < 9)."""
    entry = catalogue.get("acmix")
    rng = np.random.default_rng(0)
    check_parity(
        entry,
        config=dict(in_planes=5, out_planes=12, kernel_att=5, head=2),
        train=True,
        inputs={"x": rng.standard_normal((2, 9, 11, 5), dtype=np.float32)},
    )


def test_acmix_pallas_matches_xla():
    """The block through the Pallas kernel (interpret mode on CPU) equals the XLA path."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 6, 7, 4)), jnp.float32)
    m = ACmix(in_planes=4, out_planes=4, kernel_att=3, head=2)
    variables = m.init(jax.random.PRNGKey(0), x)
    out = m.clone(implementation="pallas").apply(variables, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(m.apply(variables, x)), atol=1e-5, rtol=1e-5)


def test_acmix_init_matches_official_reset_parameters():
    x = jnp.zeros((1, 8, 8, 6))
    m = ACmix(in_planes=6, out_planes=8, head=2)
    sd = to_torch(m, m.init(jax.random.PRNGKey(0), x), x)
    t = ref.ACmix(6, 8, head=2).state_dict()
    for key in ("dep_conv.weight", "dep_conv.bias", "rate1", "rate2"):
        np.testing.assert_array_equal(sd[key], t[key].numpy(), err_msg=key)
    assert sorted(sd) == sorted(t)  # the official key set, nothing more, nothing less


def test_acmix_bfloat16():
    entry = catalogue.get("acmix")
    tmod = entry.build_torch()
    x = np.random.default_rng(2).standard_normal((3, 13, 17, 8)).astype(np.float32)
    want = tmod(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).detach().permute(0, 2, 3, 1).numpy()
    m = ACmix(**entry.config, dtype=jnp.bfloat16)
    variables = from_torch(m, tmod.state_dict(), x)
    out = m.apply(variables, jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", ["acmix", "window_attention"])
def test_round_trip(name):
    entry = catalogue.get(name)
    tmod = entry.build_torch()
    sd = {k: v.numpy() for k, v in tmod.state_dict().items()}
    inputs = entry.inputs(np.random.default_rng(0))
    m = entry.build_flax()
    back = to_torch(m, from_torch(m, sd, **inputs), **inputs)
    sd.pop("relative_position_index", None)  # a buffer the Flax block recomputes (Ignore rule)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        (dict(in_planes=8, out_planes=16), (2, 9, 9, 6), "8 channels"),
        (dict(in_planes=8, out_planes=16), (9, 9, 8), "4-D"),
        (dict(in_planes=8, out_planes=18, head=4), (2, 9, 9, 8), "divisible by `head`"),
        (dict(in_planes=8, out_planes=16, stride=2), (2, 9, 10, 8), "multiples of `stride`"),
        (dict(in_planes=8, out_planes=16), (2, 3, 10, 8), "reflection padding 3"),
        (dict(in_planes=8, out_planes=16, dilation=2), (2, 9, 9, 8), "dilation"),
        (dict(in_planes=8, out_planes=16, kernel_conv=5), (2, 9, 9, 8), "kernel_conv"),
        (dict(in_planes=8, out_planes=16, kernel_att=6), (2, 9, 9, 8), "odd"),
    ],
)
def test_acmix_bad_input(kwargs, shape, match):
    m = ACmix(**kwargs)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda x: m.init(jax.random.PRNGKey(0), x), jax.ShapeDtypeStruct(shape, jnp.float32))


# --------------------------------------------------------------------------- window attention


def test_window_parity_without_shift():
    entry = catalogue.get("window_attention")
    rng = np.random.default_rng(3)
    check_parity(
        entry,
        config=dict(dim=8, window_size=4, num_heads=2, shift_size=0),
        inputs={"x": rng.standard_normal((2, 8, 12, 8), dtype=np.float32)},
    )


def test_window_relative_index_and_mask_match_swin():
    t = ref.WindowAttention(8, 5, 2)
    np.testing.assert_array_equal(relative_position_index((5, 5)), t.relative_position_index.numpy())
    np.testing.assert_array_equal(shift_attention_mask(10, 15, 5, 2), ref.shift_attn_mask(10, 15, 5, 2).numpy())


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        (dict(dim=8, window_size=4, num_heads=2), (2, 8, 10, 8), "multiples of `window_size`"),
        (dict(dim=8, window_size=4, num_heads=3), (2, 8, 8, 8), "divisible by `num_heads`"),
        (dict(dim=8, window_size=4, num_heads=2, shift_size=4), (2, 8, 8, 8), "shift_size"),
        (dict(dim=8, window_size=4, num_heads=2), (2, 8, 8, 6), "8 channels"),
    ],
)
def test_window_bad_input(kwargs, shape, match):
    m = WindowAttention(**kwargs)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda x: m.init(jax.random.PRNGKey(0), x), jax.ShapeDtypeStruct(shape, jnp.float32))
