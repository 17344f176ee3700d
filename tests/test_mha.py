"""MultiheadAttention and ProjectedMultiHeadAttention against torch (all mask kinds, kdim, weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn import MultiheadAttention, ProjectedMultiHeadAttention, catalogue
from flax_attn.convert import from_torch, to_torch

torch = pytest.importorskip("torch")
from flax_attn.testing.parity import check_parity  # noqa: E402

ENTRY = catalogue.get("multihead_attention")
B, L, S, E, NH = 3, 5, 9, 16, 4


def _inputs(rng, kdim=E, vdim=E, **extra):
    out = {
        "query": rng.standard_normal((B, L, E), dtype=np.float32),
        "key": rng.standard_normal((B, S, kdim), dtype=np.float32),
        "value": rng.standard_normal((B, S, vdim), dtype=np.float32),
    }
    out.update(extra)
    return out


def _mask(rng, shape, p=0.3):
    m = rng.random(shape) < p
    m[..., 0] = False  # torch (True = masked) would give NaN for fully masked rows
    return m


CASES = {
    "plain": (dict(embed_dim=E, num_heads=NH), {}, {}),
    "no_bias": (dict(embed_dim=E, num_heads=NH, bias=False), {}, {}),
    "kdim_vdim": (dict(embed_dim=E, num_heads=NH, kdim=7, vdim=11), dict(kdim=7, vdim=11), {}),
    "bias_kv_zero_attn": (dict(embed_dim=E, num_heads=NH, add_bias_kv=True, add_zero_attn=True), {}, "kpm_attn"),
    "attn_mask_bool_2d": (dict(embed_dim=E, num_heads=NH), {}, "attn2d"),
    "attn_mask_float_2d": (dict(embed_dim=E, num_heads=NH), {}, "attn2d_float"),
    "attn_mask_bool_3d": (dict(embed_dim=E, num_heads=NH), {}, "attn3d"),
    "key_padding_bool": (dict(embed_dim=E, num_heads=NH), {}, "kpm"),
    "key_padding_float": (dict(embed_dim=E, num_heads=NH), {}, "kpm_float"),
    "both_masks": (dict(embed_dim=E, num_heads=NH, kdim=6, vdim=6), dict(kdim=6, vdim=6), "kpm_attn"),
}


def _extra(kind, rng):
    if kind == "attn2d":
        return {"attn_mask": _mask(rng, (L, S))}
    if kind == "attn2d_float":
        return {"attn_mask": rng.standard_normal((L, S)).astype(np.float32)}
    if kind == "attn3d":
        return {"attn_mask": _mask(rng, (B * NH, L, S))}
    if kind == "kpm":
        return {"key_padding_mask": _mask(rng, (B, S))}
    if kind == "kpm_float":
        return {"key_padding_mask": np.where(_mask(rng, (B, S)), -np.inf, 0.0).astype(np.float32)}
    if kind == "kpm_attn":
        return {"key_padding_mask": _mask(rng, (B, S)), "attn_mask": _mask(rng, (L, S))}
    return {}


@pytest.mark.parametrize("average", [True, False], ids=["avg_weights", "per_head_weights"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_mha_matches_torch(case, average):
    config, dims, kind = CASES[case]
    rng = np.random.default_rng(0)
    inputs = _inputs(rng, **dims, **(_extra(kind, rng) if kind else {}))
    entry = ENTRY
    import dataclasses

    entry = dataclasses.replace(ENTRY, call_kwargs=dict(need_weights=True, average_attn_weights=average))
    check_parity(entry, config=config, inputs=inputs)


def test_mha_need_weights_false_and_causal():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, L, E), dtype=np.float32)
    tm = torch.nn.MultiheadAttention(E, NH, batch_first=True)
    m = MultiheadAttention(E, NH)
    v = from_torch(m, tm.state_dict(), x, x, x)
    out, w = m.apply(v, x, x, x, need_weights=False)
    assert w is None
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    tx = torch.from_numpy(x)
    want = tm(tx, tx, tx, attn_mask=causal, is_causal=True, need_weights=False)[0].detach().numpy()
    got, _ = m.apply(v, x, x, x, is_causal=True, need_weights=False)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    got_mask, _ = m.apply(v, x, x, x, attn_mask=causal.numpy(), need_weights=False)
    np.testing.assert_allclose(np.asarray(got_mask), want, atol=1e-5)


def test_fully_padded_sample_is_finite_not_nan():
    rng = np.random.default_rng(0)
    m = MultiheadAttention(E, NH)
    q = rng.standard_normal((B, L, E), dtype=np.float32)
    kv = rng.standard_normal((B, S, E), dtype=np.float32)
    kpm = np.zeros((B, S), bool)
    kpm[1] = True  # sample 1 is all padding
    v = m.init(jax.random.PRNGKey(0), q, kv, kv)

    def loss(params, q):
        out, _ = m.apply({"params": params}, q, kv, kv, key_padding_mask=kpm)
        return jnp.sum(out**2)

    val, (gp, gq) = jax.value_and_grad(loss, argnums=(0, 1))(v["params"], q)
    assert np.isfinite(val)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves((gp, gq)))
    out, w = m.apply(v, q, kv, kv, key_padding_mask=kpm)
    np.testing.assert_array_equal(np.asarray(w)[1], 0.0)
    # the padded sample's output is out_proj(0) = its bias
    np.testing.assert_allclose(np.asarray(out)[1], np.broadcast_to(np.asarray(v["params"]["out_proj"]["bias"]), (L, E)))


def test_dropout_only_in_train_mode():
    m = MultiheadAttention(E, NH, dropout=0.5)
    x = np.random.default_rng(0).standard_normal((B, L, E), dtype=np.float32)
    v = m.init(jax.random.PRNGKey(0), x, x, x)
    ev1, _ = m.apply(v, x, x, x)
    ev2, _ = m.apply(v, x, x, x, train=False)
    np.testing.assert_array_equal(np.asarray(ev1), np.asarray(ev2))
    tr1, _ = m.apply(v, x, x, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    tr2, _ = m.apply(v, x, x, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(np.asarray(tr1), np.asarray(ev1))
    assert not np.allclose(np.asarray(tr1), np.asarray(tr2))


@pytest.mark.parametrize("kdim", [E, 7])
def test_state_dict_round_trip_loads_into_torch(kdim):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, L, E), dtype=np.float32)
    kv = rng.standard_normal((B, S, kdim), dtype=np.float32)
    m = MultiheadAttention(E, NH, kdim=kdim, vdim=kdim, add_bias_kv=True)
    v = m.init(jax.random.PRNGKey(0), x, kv, kv)
    sd = to_torch(m, v, x, kv, kv, return_tensors="pt")
    fused = kdim == E
    assert ("in_proj_weight" in sd) == fused and ("q_proj_weight" in sd) != fused
    tm = torch.nn.MultiheadAttention(E, NH, kdim=kdim, vdim=kdim, add_bias_kv=True, batch_first=True)
    tm.load_state_dict(sd, strict=True)
    want = tm(torch.from_numpy(x), torch.from_numpy(kv), torch.from_numpy(kv))[0].detach().numpy()
    got, _ = m.apply(v, x, kv, kv)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    back = from_torch(m, sd, x, kv, kv)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(v)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mha_bad_input():
    m = MultiheadAttention(10, 3)
    x = jnp.ones((2, 4, 10))
    with pytest.raises(ValueError, match=r"`embed_dim`=10 must be divisible by `num_heads`=3"):
        m.init(jax.random.PRNGKey(0), x, x, x)
    m = MultiheadAttention(12, 3, kdim=5)
    with pytest.raises(ValueError, match=r"`key` must have 5 features .* got shape \(2, 4, 12\)"):
        m.init(jax.random.PRNGKey(0), jnp.ones((2, 4, 12)), jnp.ones((2, 4, 12)), jnp.ones((2, 4, 12)))
    with pytest.raises(ValueError, match=r"`key_padding_mask` of shape \(2, 3\) does not broadcast to \(2, 4\)"):
        MultiheadAttention(12, 3).init(
            jax.random.PRNGKey(0), jnp.ones((2, 4, 12)), key_padding_mask=np.ones((2, 3), bool)
        )


def test_projected_mha_mask_and_errors():
    rng = np.random.default_rng(0)
    entry = catalogue.get("projected_multi_head_attention")
    inputs = dict(entry.inputs(rng))
    mask = rng.random((3, 13, 17)) > 0.3
    mask[..., 0] = True
    inputs["mask"] = mask
    check_parity(entry, inputs=inputs)
    m = ProjectedMultiHeadAttention(2, 4, 6, 4, 5, 3)
    with pytest.raises(ValueError, match=r"`v` must have 5 features"):
        m.init(jax.random.PRNGKey(0), jnp.ones((1, 2, 6)), jnp.ones((1, 2, 6)), jnp.ones((1, 2, 6)))
