"""CCNet family: the criss-cross op against the official CUDA semantics, the blocks' options,
conversion round trips, Dropout2d, bad input, and the reference's memory scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import catalogue  # noqa: E402
from flax_attn.ccnet import CrissCrossAttention, RCCAModule  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.ops import criss_cross_attention  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref import ccnet as ref  # noqa: E402


def _qkv(b=3, h=13, w=17, cqk=5, cv=7, seed=0):
    r = np.random.default_rng(seed)
    return (
        r.standard_normal((b, h, w, cqk)).astype(np.float32),
        r.standard_normal((b, h, w, cqk)).astype(np.float32),
        r.standard_normal((b, h, w, cv)).astype(np.float32),
    )


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def test_op_matches_official_ca_weight_softmax_ca_map():
    q, k, v = _qkv()
    out, weights = criss_cross_attention(q, k, v, return_weights=True)
    t_att = torch.softmax(ref.ca_weight(_nchw(q), _nchw(k)), 1)
    t_out = ref.ca_map(t_att, _nchw(v))
    np.testing.assert_allclose(weights, t_att.permute(0, 2, 3, 1).numpy(), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(out, t_out.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)


def test_official_cuda_semantics_agree_with_cc_py():
    # Cross-check of the reference itself: the CUDA-semantics ca_weight/ca_map and the later
    # pure-PyTorch cc.py formulation (column energy with -inf diagonal, then row) give one output.
    q, k, v = (_nchw(a) for a in _qkv(seed=1))
    a = ref.ca_map(torch.softmax(ref.ca_weight(q, k), 1), v)
    np.testing.assert_allclose(a.numpy(), ref.cc_py_attention(q, k, v).numpy(), atol=1e-5, rtol=1e-5)


def test_weight_layout_row_first_then_column_without_centre():
    # One pixel, brute force: official channel order is the W row entries, then the column skipping y.
    q, k, v = _qkv(1, 4, 5, 3, 2, seed=2)
    _, weights = criss_cross_attention(q, k, v, return_weights=True)
    y, x = 2, 3
    keys = [(y, i) for i in range(5)] + [(j, x) for j in range(4) if j != y]
    e = np.array([q[0, y, x] @ k[0, a, c] for a, c in keys])
    p = np.exp(e - e.max())
    np.testing.assert_allclose(weights[0, y, x], p / p.sum(), atol=1e-6, rtol=1e-5)


def test_op_gradients_match_torch():
    q, k, v = _qkv(2, 6, 9, 4, 3, seed=3)
    ct = np.random.default_rng(4).standard_normal(v.shape).astype(np.float32)
    grads = jax.grad(lambda *a: jnp.sum(criss_cross_attention(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    tq, tk, tv = (_nchw(a).requires_grad_(True) for a in (q, k, v))
    (ref.ca_map(torch.softmax(ref.ca_weight(tq, tk), 1), tv) * _nchw(ct)).sum().backward()
    for g, t in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(g, t.grad.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)


def test_op_bfloat16_softmax_in_float32():
    q, k, v = _qkv(seed=5)
    want = criss_cross_attention(q, k, v)
    got = criss_cross_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)


def test_op_bad_input():
    q, k, v = _qkv(1, 3, 4, 2, 3)
    with pytest.raises(ValueError, match="`implementation` must be one of"):
        criss_cross_attention(q, k, v, implementation="cuda")
    with pytest.raises(ValueError, match="`q` must be 4-D"):
        criss_cross_attention(q[0], k, v)
    with pytest.raises(ValueError, match="`q` and `k` must have the same shape"):
        criss_cross_attention(q, k[..., :1], v)
    with pytest.raises(ValueError, match="`v` must share"):
        criss_cross_attention(q, k, v[:, :2])


def test_reference_memory_scales_with_h_plus_w():
    # The compiled XLA reference never holds an (H*W)^2 buffer: at 40 x 40 the dense energy alone is
    # 2 * 1600^2 * 4 B = 20 MB, the criss-cross one 2 * 1600 * 80 * 4 B = 1 MB.
    b, h, w, c = 2, 40, 40, 8
    spec = [jax.ShapeDtypeStruct((b, h, w, c), jnp.float32)] * 3
    fwd_bwd = jax.jit(
        jax.grad(lambda q, k, v: jnp.sum(criss_cross_attention(q, k, v, implementation="xla")), argnums=(0, 1, 2))
    )
    mem = fwd_bwd.lower(*spec).compile().memory_analysis()
    if mem is None:
        pytest.skip("backend gives no memory analysis")
    dense_energy = b * (h * w) ** 2 * 4
    assert mem.temp_size_in_bytes < dense_energy / 4, mem


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_rcca_recurrence_variants(train):
    entry = catalogue.get("rcca_module")
    for recurrence in (0, 1):
        config = {**entry.config, "recurrence": recurrence}
        check_parity(entry, config=config, train=train)


def test_cca_return_weights_match_official_attention():
    entry = catalogue.get("criss_cross_attention")
    tmod = entry.build_torch()
    randomize_torch_module(tmod)
    x = np.random.default_rng(6).standard_normal((3, 13, 17, 16)).astype(np.float32)
    sd = {k_: v_.numpy() for k_, v_ in tmod.state_dict().items()}
    fmod = CrissCrossAttention(16)
    variables = from_torch(fmod, sd, x=x)
    out, weights = fmod.apply(variables, x, return_weights=True)
    tx = _nchw(x)
    with torch.no_grad():
        t_att = torch.softmax(ref.ca_weight(tmod.query_conv(tx), tmod.key_conv(tx)), 1)
        t_out = tmod(tx)
    np.testing.assert_allclose(weights, t_att.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out, t_out.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["criss_cross_attention", "rcca_module"])
def test_state_dict_round_trip_and_official_keys(name):
    entry = catalogue.get(name)
    tmod = entry.build_torch()
    randomize_torch_module(tmod)
    sd = {k_: v_.numpy() for k_, v_ in tmod.state_dict().items()}
    x = entry.inputs(np.random.default_rng(0))["x"]
    fmod = entry.build_flax()
    back = to_torch(fmod, from_torch(fmod, sd, x=x), x=x)
    expected = {k_ for k_ in sd if not k_.endswith("num_batches_tracked")}
    assert set(back) == expected
    for key in expected:
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
    if name == "rcca_module":
        assert {
            "conva.0.weight",
            "conva.1.running_var",
            "cca.gamma",
            "cca.query_conv.weight",
            "bottleneck.0.weight",
            "bottleneck.1.bias",
            "bottleneck.3.bias",
        } <= expected


def test_rcca_dropout2d_drops_whole_channels():
    m = RCCAModule(in_channels=32, out_channels=16, num_classes=3, dropout=0.5)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 5, 6, 32)), jnp.float32)
    variables = m.init(jax.random.PRNGKey(0), x)
    _, state = m.apply(
        variables,
        x,
        train=True,
        rngs={"dropout": jax.random.PRNGKey(1)},
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
    dropped = np.asarray(state["intermediates"]["bottleneck_2"]["__call__"][0])
    per_channel = (dropped == 0).reshape(2, 30, 16)
    assert per_channel.any() and not per_channel.all()
    assert np.all(per_channel.all(axis=1) == per_channel.any(axis=1))  # a channel is dropped everywhere or nowhere


def test_blocks_bad_input():
    x = jnp.ones((2, 5, 6, 16))
    with pytest.raises(ValueError, match="CrissCrossAttention: `x` must have 16 channels"):
        CrissCrossAttention(16).init(jax.random.PRNGKey(0), x[..., :8])
    with pytest.raises(ValueError, match="`in_dim`=4 must be at least 8"):
        CrissCrossAttention(4).init(jax.random.PRNGKey(0), x[..., :4])
    with pytest.raises(ValueError, match="CrissCrossAttention: `x` must be 4-D"):
        CrissCrossAttention(16).init(jax.random.PRNGKey(0), x[0])
    with pytest.raises(ValueError, match="RCCAModule: `in_channels`=16 must be at least 32"):
        RCCAModule(16, 8, 3).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="RCCAModule: `x` must have 32 channels"):
        RCCAModule(32, 8, 3).init(jax.random.PRNGKey(0), x)


def test_block_bfloat16_close_to_float32():
    m32 = CrissCrossAttention(16)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 7, 9, 16)), jnp.float32)
    variables = m32.init(jax.random.PRNGKey(0), x)
    variables = jax.tree_util.tree_map(lambda a: a + 0.5 if a.shape == (1,) else a, variables)  # gamma != 0
    want = m32.apply(variables, x)
    got = CrissCrossAttention(16, dtype=jnp.bfloat16).apply(variables, x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)
