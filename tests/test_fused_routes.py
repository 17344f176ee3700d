"""The fused-attention routes (``implementation="cudnn"``) against the XLA reference.

cuDNN needs a GPU, so here ``jax.nn.dot_product_attention`` is wrapped to run its own XLA
implementation while recording that the route asked for cuDNN: what is tested is everything this
package does around the fused call (mask/bias splitting and broadcasting, fully masked rows,
window partitioning with Swin's bias and shift mask). The GPU-marked test runs cuDNN itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn import kernels
from flax_attn.kernels import _common
from flax_attn.ops import scaled_dot_product_attention as sdpa
from flax_attn.ops import window_attention


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kw):
        calls.append(implementation)
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    return calls


def _x(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _value_and_grads(fn, args, ct):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(ct)


def _assert_same(fn_a, fn_b, args, ct, tol=1e-5):
    out_a, g_a = _value_and_grads(fn_a, args, ct)
    out_b, g_b = _value_and_grads(fn_b, args, ct)
    np.testing.assert_allclose(np.asarray(out_a), np.asarray(out_b), atol=tol, rtol=tol)
    for a, b in zip(g_a, g_b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


B, L, S, H, D = 2, 5, 7, 3, 8


def _masks():
    rng = np.random.default_rng(3)
    bool_mask = rng.random((B, 1, L, S)) > 0.4
    bool_mask[0, 0, 2] = False  # a query row with no key at all
    float_mask = np.where(rng.random((L, S)) > 0.3, rng.standard_normal((L, S)), -np.inf).astype(np.float32)
    float_mask[1] = -np.inf
    bias = rng.standard_normal((1, H, L, S)).astype(np.float32)
    return {
        "plain": {},
        "bool mask, empty row": {"mask": jnp.asarray(bool_mask)},
        "float mask, -inf row": {"mask": jnp.asarray(float_mask)},
        "bias and causal": {"bias": jnp.asarray(bias), "is_causal": True},
        "2-D bool mask and bias": {"mask": jnp.asarray(bool_mask[1, 0]), "bias": jnp.asarray(bias), "scale": 0.2},
    }


@pytest.mark.parametrize("case", sorted(_masks()))
def test_sdpa_fused_route_matches_xla(case, fused_calls):
    kw = _masks()[case]
    q, k, v = _x((B, L, H, D), 0), _x((B, S, H, D), 1), _x((B, S, H, D), 2)
    ct = _x((B, L, H, D), 3)
    _assert_same(
        lambda q, k, v: sdpa(q, k, v, implementation="cudnn", **kw),
        lambda q, k, v: sdpa(q, k, v, implementation="xla", **kw),
        (q, k, v),
        ct,
    )
    assert fused_calls and set(fused_calls) == {"cudnn"}


def test_sdpa_fused_route_refuses_what_it_cannot_do():
    q, k, v = _x((B, L, H, D), 0), _x((B, S, H, D), 1), _x((B, S, H, D), 2)
    with pytest.raises(ValueError, match="implementation='cudnn' does not support attention dropout"):
        sdpa(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0), implementation="cudnn")
    with pytest.raises(ValueError, match="does not support return_weights=True"):
        sdpa(q, k, v, return_weights=True, implementation="cudnn")
    with pytest.raises(ValueError, match="does not support a value head dim 5 != the query head dim 8"):
        sdpa(q, k, v[..., :5], implementation="cudnn")
    with pytest.raises(ValueError, match=r"`implementation` must be one of \(None, 'xla', 'cudnn'\), got 'pallas'"):
        sdpa(q, k, v, implementation="pallas")
    with pytest.raises(ValueError, match=r"`mask` of shape \(4, 7\) does not broadcast"):
        sdpa(q, k, v, mask=jnp.ones((4, 7), bool), implementation="cudnn")


@pytest.mark.parametrize("shift", [0, 1])
def test_window_fused_route_matches_xla(shift, fused_calls):
    shape, ws = (2, 6, 9, 2, 4), 3
    q, k, v, ct = (_x(shape, s) for s in range(4))
    table = _x(((2 * ws - 1) ** 2, shape[3]), 5)
    kw = dict(window_size=ws, shift_size=shift)
    _assert_same(
        lambda q, k, v, t: window_attention(q, k, v, bias_table=t, implementation="cudnn", **kw),
        lambda q, k, v, t: window_attention(q, k, v, bias_table=t, implementation="xla", **kw),
        (q, k, v, table),
        ct,
    )
    assert set(fused_calls) == {"cudnn"}


def test_sdpa_default_follows_the_table(fused_calls, monkeypatch):
    q = _x((B, L, H, D), 0)
    monkeypatch.setattr(_common, "local_platform", lambda: "gpu")
    sdpa(q, q, q)
    assert fused_calls == []  # nothing verified: XLA
    record = kernels.VerifiedRecord("test device", jax.__version__, "2026-01-01", implementation="cudnn")
    monkeypatch.setitem(kernels.VERIFIED, ("sdpa", "gpu"), record)
    np.testing.assert_allclose(sdpa(q, q, q), sdpa(q, q, q, implementation="xla"), atol=1e-5, rtol=1e-5)
    assert fused_calls == ["cudnn"]
    # What the fused route cannot do still runs XLA by default.
    sdpa(q, q, q, return_weights=True)
    assert fused_calls == ["cudnn"]


@pytest.mark.gpu
def test_cudnn_on_gpu():
    q, k, v = (_x((2, 128, 4, 64), s).astype(jnp.bfloat16) for s in range(3))
    out = sdpa(q, k, v, implementation="cudnn", is_causal=True)
    ref = sdpa(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=5e-2, rtol=5e-2)
