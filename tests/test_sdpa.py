"""flax_attn.ops.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn.ops import scaled_dot_product_attention as sdpa

torch = pytest.importorskip("torch")
F = torch.nn.functional

B, L, S, H, D, DV = 3, 7, 11, 4, 8, 5


def _qkv(rng, l=L, s=S, dv=DV):
    q = rng.standard_normal((B, l, H, D), dtype=np.float32)
    k = rng.standard_normal((B, s, H, D), dtype=np.float32)
    v = rng.standard_normal((B, s, H, dv), dtype=np.float32)
    return q, k, v


def _torch_sdpa(q, k, v, cot, **kw):
    """Torch output and input gradients for cotangent `cot`; torch layout is (B, H, L, D)."""
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))).requires_grad_() for a in (q, k, v))
    out = F.scaled_dot_product_attention(tq, tk, tv, **kw)
    grads = torch.autograd.grad((out * torch.from_numpy(cot.transpose(0, 2, 1, 3))).sum(), (tq, tk, tv))
    back = lambda t: t.detach().numpy().transpose(0, 2, 1, 3)  # noqa: E731
    return back(out), [back(g) for g in grads]


def _jax_sdpa(q, k, v, cot, **kw):
    out, vjp = jax.vjp(lambda q, k, v: sdpa(q, k, v, **kw), q, k, v)
    return np.asarray(out), [np.asarray(g) for g in vjp(jnp.asarray(cot))]


def _check(q, k, v, jax_kw, torch_kw, atol=1e-5):
    rng = np.random.default_rng(1)
    cot = rng.standard_normal(q.shape[:3] + (v.shape[-1],), dtype=np.float32)
    jo, jg = _jax_sdpa(q, k, v, cot, **jax_kw)
    to, tg = _torch_sdpa(q, k, v, cot, **torch_kw)
    np.testing.assert_allclose(jo, to, atol=atol, rtol=1e-5)
    for a, b in zip(jg, tg):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5)


def test_plain_and_value_dim_and_scale():
    q, k, v = _qkv(np.random.default_rng(0))
    _check(q, k, v, {}, {})
    _check(q, k, v, {"scale": 0.3}, {"scale": 0.3})


@pytest.mark.parametrize("shape", [(L, S), (B, 1, L, S), (B, H, L, S), (1, H, 1, S)])
def test_bool_mask_broadcasts(shape):
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng)
    mask = rng.random(shape) > 0.3
    mask[..., 0] = True  # every row keeps one key: torch gives NaN otherwise
    jmask = mask if len(shape) == 4 else mask[None, None]
    _check(q, k, v, {"mask": jmask}, {"attn_mask": torch.from_numpy(mask)})


def test_float_mask_with_neg_inf_and_bias():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng)
    fmask = rng.standard_normal((B, H, L, S)).astype(np.float32)
    fmask[rng.random((B, H, L, S)) > 0.7] = -np.inf
    fmask[..., 0] = 0.0
    _check(q, k, v, {"mask": fmask}, {"attn_mask": torch.from_numpy(fmask)})
    bias = rng.standard_normal((1, H, L, S)).astype(np.float32)
    keep = rng.random((B, 1, L, S)) > 0.4
    keep[..., 0] = True
    torch_mask = torch.from_numpy(bias + np.where(keep, 0.0, -np.inf).astype(np.float32))
    _check(q, k, v, {"mask": keep, "bias": bias}, {"attn_mask": torch_mask})


@pytest.mark.parametrize("l,s", [(7, 11), (11, 7), (9, 9)])
def test_causal_is_top_left_aligned(l, s):
    q, k, v = _qkv(np.random.default_rng(0), l=l, s=s)
    _check(q, k, v, {"is_causal": True}, {"is_causal": True})


def test_fully_masked_rows_give_zeros_and_zero_grads():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng)
    mask = np.ones((B, H, L, S), bool)
    mask[1, :, 2, :] = False  # batch 1, query 2: nothing to attend
    fmask = np.where(mask, 0.0, -np.inf).astype(np.float32)
    for kw in ({"mask": mask}, {"mask": fmask}, {"bias": fmask}):
        out, vjp = jax.vjp(lambda q, k, v, kw=kw: sdpa(q, k, v, **kw), q, k, v)
        gq, gk, gv = vjp(jnp.ones_like(out))
        assert np.isfinite(np.asarray(out)).all()
        assert all(np.isfinite(np.asarray(g)).all() for g in (gq, gk, gv))
        np.testing.assert_array_equal(np.asarray(out)[1, 2], 0.0)
        np.testing.assert_array_equal(np.asarray(gq)[1, 2], 0.0)
        # the other rows are untouched: same as attending with a fully open mask there
        ref = np.asarray(sdpa(q, k, v))
        np.testing.assert_allclose(np.asarray(out)[0], ref[0], atol=1e-6)
    _, w = sdpa(q, k, v, mask=mask, return_weights=True)
    np.testing.assert_array_equal(np.asarray(w)[1, :, 2], 0.0)


def test_return_weights_match_torch_softmax():
    q, k, v = _qkv(np.random.default_rng(0))
    _, w = sdpa(q, k, v, return_weights=True)
    tq, tk = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))) for a in (q, k))
    want = torch.softmax(tq @ tk.transpose(-1, -2) / np.sqrt(D), dim=-1).numpy()
    np.testing.assert_allclose(np.asarray(w), want, atol=1e-6)


def test_bfloat16_runs_softmax_in_float32():
    q, k, v = _qkv(np.random.default_rng(0))
    ref = np.asarray(sdpa(q, k, v))
    out = sdpa(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2, rtol=5e-2)
    # large logits would overflow a bf16 softmax's exp sum; float32 statistics keep it finite
    big = sdpa(*(jnp.asarray(a * 30, jnp.bfloat16) for a in (q, k)), jnp.asarray(v, jnp.bfloat16))
    assert np.isfinite(np.asarray(big, np.float32)).all()


def test_dropout_drops_and_rescales_weights():
    q, k, v = _qkv(np.random.default_rng(0))
    _, w = sdpa(q, k, v, return_weights=True)
    rng = jax.random.PRNGKey(3)
    out_d, w_d = sdpa(q, k, v, dropout_rate=0.25, dropout_rng=rng, return_weights=True)
    w, w_d = np.asarray(w), np.asarray(w_d)
    dropped = w_d == 0
    assert 0.15 < dropped.mean() < 0.35
    np.testing.assert_allclose(w_d[~dropped], w[~dropped] / 0.75, rtol=1e-6)
    again = sdpa(q, k, v, dropout_rate=0.25, dropout_rng=rng)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out_d))
    # without an rng, dropout is off (deterministic inference)
    np.testing.assert_allclose(np.asarray(sdpa(q, k, v, dropout_rate=0.25)), np.asarray(sdpa(q, k, v)))


def test_bad_input_errors_name_the_argument():
    q, k, v = _qkv(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"`query` must be 4-D .* got shape \(3, 7, 32\)"):
        sdpa(q.reshape(B, L, H * D), k, v)
    with pytest.raises(ValueError, match=r"`key` shape \(3, 11, 4, 6\)"):
        sdpa(q, k[..., :6], v)
    with pytest.raises(ValueError, match=r"`value` shape \(3, 10, 4, 5\)"):
        sdpa(q, k, v[:, :10])
    with pytest.raises(ValueError, match=r"`mask` of shape \(5, 5\) does not broadcast .* \(3, 4, 7, 11\)"):
        sdpa(q, k, v, mask=np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="dropout_rate"):
        sdpa(q, k, v, dropout_rate=1.0)
