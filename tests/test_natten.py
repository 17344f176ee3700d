"""ops.na1d/na2d/na3d against NATTEN itself (forwards) and a dense masked-attention reference
whose mask is NATTEN's window rule (gradients, rpb, key mask, weights)."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn.ops import na1d, na2d, na3d
from flax_attn.ops.neighborhood import natten_axis_plan
from flax_attn.testing.hlo import count_ops
from flax_attn.testing.neighborhood_ref import dense_neighborhood_attention, natten_mask

OPS = {1: na1d, 2: na2d, 3: na3d}

# (spatial, kernel_size, stride, dilation, is_causal): odd and even kernels, strides up to the
# kernel size, dilations whose groups have unequal lengths, causal on some axes only.
CASES = [
    ((13,), 3, 1, 1, False),
    ((13,), 4, 2, 2, False),
    ((13,), 5, 3, 2, True),
    ((16,), 3, 3, 3, False),
    ((17,), 2, 2, 4, True),
    ((9, 11), 3, 1, 1, False),
    ((9, 11), (3, 5), (2, 3), (2, 1), (True, False)),
    ((10, 7), (4, 3), (4, 1), (1, 2), (False, True)),
    ((12, 13), 5, (5, 2), (2, 2), True),
    ((5, 6, 7), (2, 3, 3), (1, 2, 3), (2, 1, 2), (True, False, False)),
    ((4, 6, 7), 3, (3, 1, 2), 1, (False, True, True)),
]


def _tup(x, n):
    return tuple(x) if isinstance(x, tuple) else (x,) * n


def _inputs(spatial, seed=0, heads=2, dim=8, batch=2):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((batch, *spatial, heads, dim)).astype(np.float32) for _ in range(3))


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("spatial,ks,st,dl,ca", CASES)
def test_forward_matches_natten(spatial, ks, st, dl, ca):
    torch = pytest.importorskip("torch")
    natten = pytest.importorskip("natten", reason="natten (pip install natten) runs its Flex backend on CPU")
    n = len(spatial)
    q, k, v = _inputs(spatial)
    with warnings.catch_warnings():  # flex_attention warns that it runs unfused without torch.compile
        warnings.simplefilter("ignore")
        fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[n]
        ref = fn(*(torch.from_numpy(x) for x in (q, k, v)), kernel_size=ks, stride=st, dilation=dl, is_causal=ca)
    out = jax.jit(lambda q, k, v: OPS[n](q, k, v, ks, st, dl, ca, implementation="xla"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-5, rtol=1e-5)


def test_forward_matches_natten_with_scale_and_bfloat16():
    torch = pytest.importorskip("torch")
    natten = pytest.importorskip("natten", reason="natten (pip install natten) runs its Flex backend on CPU")
    q, k, v = _inputs((9, 10), seed=3, dim=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = natten.na2d(*(torch.from_numpy(x) for x in (q, k, v)), kernel_size=5, dilation=(1, 2), scale=0.3)
    out = na2d(q, k, v, 5, dilation=(1, 2), scale=0.3)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-5, rtol=1e-5)
    out16 = na2d(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), 5, dilation=(1, 2), scale=0.3)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), ref.numpy(), atol=5e-2, rtol=5e-2)


def _rpb(spatial, ks, heads=2, seed=1):
    shape = (heads, *(2 * x - 1 for x in _tup(ks, len(spatial))))
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _key_mask(spatial, batch=2, seed=2):
    return np.random.default_rng(seed).random((batch, *spatial)) > 0.3


@pytest.mark.parametrize("spatial,ks,st,dl,ca", CASES)
def test_forward_weights_rpb_and_mask_match_dense_reference(spatial, ks, st, dl, ca):
    n = len(spatial)
    args = tuple(_tup(x, n) for x in (ks, st, dl, ca))
    q, k, v = _inputs(spatial)
    rpb = _rpb(spatial, ks)
    mask = _key_mask(spatial)
    out, w = OPS[n](q, k, v, ks, st, dl, ca, rpb=rpb, key_mask=mask, return_weights=True)
    ref, ref_w = dense_neighborhood_attention(q, k, v, *args, rpb=rpb, key_mask=mask, return_weights=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w), np.asarray(ref_w), atol=1e-5, rtol=1e-5)


GRAD_CASES = [
    ((11,), 4, 2, 2, True),
    ((7, 9), (3, 5), (3, 2), (2, 1), (False, True)),
    ((4, 5, 6), (2, 3, 3), (1, 3, 1), (2, 1, 2), (True, False, False)),
]


@pytest.mark.parametrize("spatial,ks,st,dl,ca", GRAD_CASES)
def test_gradients_match_dense_reference(spatial, ks, st, dl, ca):
    n = len(spatial)
    args = tuple(_tup(x, n) for x in (ks, st, dl, ca))
    q, k, v = _inputs(spatial, seed=4)
    rpb, mask = _rpb(spatial, ks), _key_mask(spatial, seed=5)
    ct = np.random.default_rng(6).standard_normal(q.shape).astype(np.float32)

    def loss(fn):
        return lambda q, k, v, rpb: jnp.sum(fn(q, k, v, rpb) * ct)

    ours = jax.grad(
        loss(lambda q, k, v, r: OPS[n](q, k, v, ks, st, dl, ca, rpb=r, key_mask=mask)), argnums=(0, 1, 2, 3)
    )
    theirs = jax.grad(
        loss(lambda q, k, v, r: dense_neighborhood_attention(q, k, v, *args, rpb=r, key_mask=mask)),
        argnums=(0, 1, 2, 3),
    )
    for name, a, b in zip("q k v rpb".split(), jax.jit(ours)(q, k, v, rpb), theirs(q, k, v, rpb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=name)


def test_fully_masked_query_gets_zeros_and_finite_gradients():
    q, k, v = _inputs((9,), seed=7)
    mask = np.ones((2, 9), bool)
    mask[0, :5] = False  # query 0's window (keys 0..2) and query 1..3's windows are fully masked
    out, w = na1d(q, k, v, 3, key_mask=mask, return_weights=True)
    np.testing.assert_array_equal(np.asarray(out[0, :4]), 0.0)
    np.testing.assert_array_equal(np.asarray(w[0, :4]), 0.0)
    np.testing.assert_allclose(np.asarray(w[0, 5:].sum(-1)), 1.0, rtol=1e-6)
    grads = jax.grad(lambda q, k, v: jnp.sum(na1d(q, k, v, 3, key_mask=mask) ** 2), argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[0][0, :4]), 0.0)
    ref = dense_neighborhood_attention(q, k, v, (3,), (1,), (1,), (False,), key_mask=mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_no_gather_or_scatter_in_forward_or_backward():
    ops = ("stablehlo.gather", "stablehlo.scatter", "stablehlo.select_and_scatter")
    for spatial, ks, st, dl, ca in [CASES[4], CASES[6], CASES[9]]:
        n = len(spatial)
        q, k, v = _inputs(spatial)
        rpb, mask = _rpb(spatial, ks), _key_mask(spatial)

        def loss(q, k, v, rpb, n=n, ks=ks, st=st, dl=dl, ca=ca, mask=mask):
            return jnp.sum(OPS[n](q, k, v, ks, st, dl, ca, rpb=rpb, key_mask=mask) ** 2)

        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, k, v, rpb).as_text()
        assert count_ops(text, ops) == dict.fromkeys(ops, 0), (spatial, count_ops(text, ops))


def _plan_mask(length, k, s, d, c):
    """The (query, key) pairs an AxisPlan lets through, as a dense boolean matrix."""
    p = natten_axis_plan(length, k, s, d, c)
    allowed = np.zeros((length, length), bool)
    pad = p.key_pad[0] // d
    for t, big, j, g in zip(*np.nonzero(p.valid)):
        allowed[(big * s + j) * d + g, (p.base[big] - pad + t) * d + g] = True
    return p, allowed


def test_plans_equal_nattens_mask_exhaustively():
    """Every axis length up to 20, kernel, stride <= kernel, dilation and causal flag NATTEN allows."""
    for length in range(2, 21):
        for k in range(2, 8):
            for d in range(1, length // k + 1):
                for s in range(1, k + 1):
                    for c in (False, True):
                        p, allowed = _plan_mask(length, k, s, d, c)
                        want = natten_mask((length,), (k,), (s,), (d,), (c,))
                        assert (allowed == want).all(), (length, k, s, d, c)
                        assert p.n_offsets <= k + 1
                        reach = np.abs(p.rel[p.valid.any(axis=-1)]).max(initial=0)
                        assert reach <= k - 1, "the rpb table covers every visible key"


def test_plan_window_rule_examples():
    # Hand-checked against NATTEN's rule: length 7, kernel 3, stride 2: stride groups {0,1}, {2,3},
    # {4,5}, {6}; leaders 1, 3, 5, 6 -> windows start at 0, 2, 4, 4.
    p = natten_axis_plan(7, 3, 2, 1, False)
    assert list(p.base) == [0, 2, 4, 4] and p.n_offsets == 3
    # causal, kernel 3, stride 1: query 0 sees only key 0, query 1 keys 0..1.
    p = natten_axis_plan(5, 3, 1, 1, True)
    assert p.valid[:, :2, 0, 0].T.tolist() == [[False, False, True], [False, True, True]]


BAD = [
    (dict(kernel_size=1), "`kernel_size` must be >= 2"),
    (dict(kernel_size=(3, 3)), "`kernel_size` must be an int or a tuple of 1"),
    (dict(kernel_size=3, stride=4), "`stride` must be <= `kernel_size`"),
    (dict(kernel_size=3, dilation=0), "`dilation` and `stride` must be >= 1"),
    (dict(kernel_size=5, dilation=3), "`kernel_size * dilation` must be <="),
    (dict(kernel_size=3, is_causal=1), "`is_causal` must be a bool"),
    (dict(kernel_size=3, scale="x"), "`scale` must be a float"),
    (dict(kernel_size=3, rpb=np.zeros((2, 4))), "`rpb` must have shape (heads, 2*k_1 - 1, ...) = (2, 5)"),
    (dict(kernel_size=3, key_mask=np.ones((2, 13))), "`key_mask` must be boolean"),
    (dict(kernel_size=3, implementation="pallas"), "`implementation` must be one of (None, 'xla')"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_arguments_name_the_argument(kwargs, message):
    q, k, v = _inputs((13,))
    with pytest.raises(ValueError, match=re.escape(message)):
        na1d(q, k, v, **kwargs)


def test_bad_tensors_name_the_tensor():
    q, k, v = _inputs((9, 10))
    with pytest.raises(ValueError, match="`q` must be 5-D"):
        na2d(q[0], k, v, 3)
    with pytest.raises(ValueError, match="same shape"):
        na2d(q, k[:, :8], v, 3)
    with pytest.raises(ValueError, match="floating point"):
        na2d(q.astype(np.int32), k, v, 3)


def test_pallas_without_the_2d_kernel_is_a_clear_error():
    from flax_attn.kernels import neighborhood as kernel_module

    if hasattr(kernel_module, "na2d_pallas"):
        pytest.skip("na2d_pallas exists: its tests live in tests/test_kernel_neighborhood.py")
    q, k, v = _inputs((9, 10))
    with pytest.raises(NotImplementedError, match="na2d_pallas"):
        na2d(q, k, v, 3, implementation="pallas")


def test_attention_dropout_is_unbiased_and_keyed():
    q, k, v = _inputs((9,), seed=8)
    clean = na1d(q, k, v, 3)

    def dropped(key):
        return na1d(q, k, v, 3, dropout_rate=0.5, dropout_rng=key)

    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    outs = jax.jit(jax.vmap(dropped))(keys)
    # same key, same mask (vmapped and plain calls round the last bit differently)
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(dropped(keys[0])), atol=1e-6, rtol=1e-6)
    assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[1]))
    # 1 / (1 - rate) scaling keeps the expectation: the mean of 400 draws is within ~4 sigma.
    np.testing.assert_allclose(np.asarray(outs.mean(0)), np.asarray(clean), atol=0.25)
    with pytest.raises(ValueError, match="`dropout_rate`=0.5 needs a `dropout_rng`"):
        na1d(q, k, v, 3, dropout_rate=0.5)
    with pytest.raises(ValueError, match=re.escape("`dropout_rate` must be a float in [0, 1)")):
        na1d(q, k, v, 3, dropout_rate=1.0, dropout_rng=keys[0])


def test_clamped_take_is_take():
    from flax_attn.ops.neighborhood import _clamped_take

    x = np.random.default_rng(9).standard_normal((2, 23, 3)).astype(np.float32)
    for length, k, s, d, c in [(23, 7, 1, 1, False), (23, 4, 3, 1, False), (23, 3, 2, 2, False), (23, 5, 1, 1, True)]:
        p = natten_axis_plan(length, k, s, d, c)
        idx = p.base[p.base < 23]
        np.testing.assert_array_equal(np.asarray(_clamped_take(jnp.asarray(x), idx, axis=1)), x[:, idx])
