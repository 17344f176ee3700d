"""Pallas neighbourhood-attention kernels against the XLA reference: interpret mode on CPU.

Both tiling rule sets run here: the GPU kernels with ``interpret=True`` and the TPU kernels in the
TPU interpreter (``pltpu.InterpretParams(detect_races=True)``). Lowering for CUDA (Triton) and TPU
(Mosaic) is checked with ``jax.export`` (no device needed); compiled runs are marked gpu/tpu.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from flax_attn.kernels import BlockSizes
from flax_attn.kernels.neighborhood import na2d_pallas, neighborhood_attention_pallas
from flax_attn.ops import neighborhood_attention
from flax_attn.testing.neighborhood_ref import dense_neighborhood_attention


def _inputs(shape, stride, dtype, seed=0):
    rng = np.random.default_rng(seed)
    b, h, w, n, d = shape
    k = jnp.asarray(rng.standard_normal(shape), dtype)
    v = jnp.asarray(rng.standard_normal(shape), dtype)
    q = jnp.asarray(rng.standard_normal((b, -(-h // stride), -(-w // stride), n, d)), dtype)
    return q, k, v


def _fwd_and_grads(fn, q, k, v, ct):
    """Output and the input cotangents for output cotangent ``ct``, compiled once."""

    @jax.jit
    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))

    return run(q, k, v, ct)


# Each backend's tiling rules meet both borders, both dtypes, dilation 1 and 2 and stride 2, on odd
# shapes (widths and head dims that are not powers of two, heights that are not tile multiples).
CASES = [  # backend, dtype, border, kernel_size, dilation, stride, (B, H, W, heads, D)
    ("triton", jnp.float32, "reflect", 3, 1, 1, (2, 5, 7, 1, 3)),
    ("triton", jnp.bfloat16, "clamp", 3, 2, 2, (1, 7, 8, 1, 5)),
    ("mosaic_tpu", jnp.float32, "clamp", 3, 2, 1, (1, 9, 7, 1, 3)),
    ("mosaic_tpu", jnp.bfloat16, "reflect", 5, 1, 2, (1, 6, 9, 1, 4)),
]


@pytest.mark.parametrize(
    "backend,dtype,border,ks,dil,stride,shape",
    CASES,
    ids=[f"{c[0]}-{jnp.dtype(c[1]).name}-{c[2]}-k{c[3]}-d{c[4]}-s{c[5]}" for c in CASES],
)
def test_interpret_matches_reference(backend, dtype, border, ks, dil, stride, shape):
    q, k, v = _inputs(shape, stride, dtype)
    kw = dict(kernel_size=ks, dilation=dil, border=border, stride=stride)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    f_pl = lambda q, k, v: neighborhood_attention_pallas(q, k, v, backend=backend, interpret=True, **kw)  # noqa: E731
    f_ref = lambda q, k, v: neighborhood_attention(q, k, v, implementation="xla", **kw)  # noqa: E731
    out, grads = _fwd_and_grads(f_pl, q, k, v, ct)
    # The reference always runs in float32: bf16 kernels are held to the bf16 tolerance against it.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_grads = _fwd_and_grads(f_ref, *f32, ct)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=tol, rtol=tol)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        # bf16 gradients sum k^2 bf16-rounded products per entry: 1e-1 absolute on O(1) values.
        np.testing.assert_allclose(
            np.asarray(g, np.float32),
            np.asarray(r),
            atol=tol if tol < 1e-2 else 1e-1,
            rtol=tol,
            err_msg=f"d{name}",
        )


def test_large_window_forward():
    """k = 13 (the largest window the kernels are meant for) with reflection on a 7x9 image."""
    q, k, v = _inputs((1, 7, 9, 1, 2), 1, jnp.float32)
    kw = dict(kernel_size=13, border="reflect")
    out = jax.jit(lambda *a: neighborhood_attention_pallas(*a, backend="triton", interpret=True, **kw))(q, k, v)
    ref = neighborhood_attention(q, k, v, implementation="xla", **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("border", ["reflect", "clamp"])
def test_check_grads_custom_vjp(border):
    q, k, v = _inputs((1, 3, 4, 1, 2), 1, jnp.float32, seed=3)
    f = jax.jit(
        lambda q, k, v: neighborhood_attention_pallas(
            q, k, v, kernel_size=3, border=border, backend="triton", interpret=True
        )
    )
    check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-3)


def test_op_dispatches_to_pallas():
    q, k, v = _inputs((1, 5, 6, 1, 2), 1, jnp.float32)
    out = neighborhood_attention(q, k, v, kernel_size=3, implementation="pallas")
    ref = neighborhood_attention(q, k, v, kernel_size=3, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "backend,platform,marker", [("triton", "cuda", "__gpu$xla.gpu.triton"), ("mosaic_tpu", "tpu", "tpu_custom_call")]
)
def test_lowers_for_device(backend, platform, marker):
    """Forward and backward lower to Triton (CUDA) / Mosaic (TPU) at the benchmark size, bf16."""

    def grads(q, k, v):
        f = lambda *a: neighborhood_attention_pallas(*a, kernel_size=7, backend=backend, interpret=False)  # noqa: E731
        return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    x = jax.ShapeDtypeStruct((2, 56, 56, 8, 32), jnp.bfloat16)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(jax.jit(grads), platforms=[platform], disabled_checks=checks)(x, x, x)
    assert exported.mlir_module().count(marker) >= 3  # forward, dq, dk/dv


@pytest.mark.parametrize(
    "backend,platform,marker", [("triton", "cuda", "__gpu$xla.gpu.triton"), ("mosaic_tpu", "tpu", "tpu_custom_call")]
)
def test_na2d_lowers_for_device(backend, platform, marker):
    """na2d with every option (causal rows, strided columns, dilation, rpb, key mask) lowers, bf16."""

    def grads(q, k, v, rpb, mask):
        def f(q, k, v, rpb):
            out = na2d_pallas(
                q,
                k,
                v,
                kernel_size=7,
                stride=(1, 2),
                dilation=(1, 2),
                is_causal=(True, False),
                rpb=rpb,
                key_mask=mask,
                backend=backend,
                interpret=False,
            )
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, rpb)

    x = jax.ShapeDtypeStruct((2, 56, 56, 2, 32), jnp.bfloat16)
    rpb = jax.ShapeDtypeStruct((2, 13, 13), jnp.float32)
    mask = jax.ShapeDtypeStruct((2, 56, 56), jnp.bool_)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(jax.jit(grads), platforms=[platform], disabled_checks=checks)(x, x, x, rpb, mask)
    assert exported.mlir_module().count(marker) >= 3  # forward, dq (+ rpb partials), dk/dv


def _device_check(backend):
    q, k, v = _inputs((2, 23, 30, 4, 32), 1, jnp.bfloat16)
    for border, dil in (("reflect", 1), ("clamp", 2)):
        kw = dict(kernel_size=7, dilation=dil, border=border)
        ct = jnp.ones(q.shape, jnp.float32)
        out, grads = _fwd_and_grads(
            lambda *a, kw=kw: neighborhood_attention_pallas(*a, backend=backend, **kw), q, k, v, ct
        )
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        with jax.default_matmul_precision("highest"):
            ref_out, ref_grads = _fwd_and_grads(
                lambda *a, kw=kw: neighborhood_attention(*a, implementation="xla", **kw), *f32, ct
            )
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=5e-2, rtol=5e-2)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=1e-1, rtol=5e-2)


@pytest.mark.gpu
def test_compiled_gpu():
    _device_check("triton")


@pytest.mark.tpu
def test_compiled_tpu():
    _device_check("mosaic_tpu")


# --------------------------------------------------------------------------- na2d_pallas (NATTEN semantics)
#
# REFERENCE: the library's dense masked attention (flax_attn.testing.neighborhood_ref: NATTEN's mask,
# NAT's rpb). `_natten_window` below is a second, loop-by-loop statement of NATTEN's rule that the
# kernel's window predicate is checked against (and that is itself checked against `natten`).


def _natten_window(size, k, stride, dilation, causal):
    """``allowed[x, y]``: whether query ``x`` attends key ``y`` along one axis (NATTEN 0.21's rule,
    as its Flex mask states it), and ``offset[x, y]``: NAT's bias index ``j - i + k - 1`` in
    dilation-group coordinates."""
    allowed = np.zeros((size, size), bool)
    for x in range(size):
        g, i = x % dilation, x // dilation
        n = len(range(g, size, dilation))  # positions in this dilation group
        if causal:
            leader = min((i // stride) * stride + stride - 1, n - 1)  # last query of the stride group
            keys = [j for j in range(n) if j <= i and leader - j < k]
        else:
            leader = min((i // stride) * stride + stride // 2, n - 1)  # centre query of the group
            left, right = k // 2, k // 2 + (k % 2 - 1)
            centre = min(max(leader, left), n - 1 - right)
            keys = range(centre - left, centre + right + 1)
        for j in keys:
            allowed[x, g + j * dilation] = True
    grp = np.arange(size) // dilation
    offset = np.clip(grp[None, :] - grp[:, None] + k - 1, 0, 2 * k - 2)
    return allowed, offset


def _pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _dense_na2d(q, k, v, *, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, key_mask=None):
    """The library's dense reference (:mod:`flax_attn.testing.neighborhood_ref`, itself checked
    against natten and against ``ops.na2d`` in tests/test_natten.py) at full matmul precision."""
    with jax.default_matmul_precision("highest"):
        return dense_neighborhood_attention(
            q, k, v, kernel_size, stride, dilation, is_causal, rpb=rpb, key_mask=key_mask
        )


def test_natten_window_rule_hand_cases():
    """The reference rule on cases worked out by hand from NATTEN's definition."""
    allowed, _ = _natten_window(7, 3, 1, 1, True)  # causal: the k keys ending at the query
    want = [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6]]
    assert [list(np.flatnonzero(r)) for r in allowed] == want
    allowed, _ = _natten_window(7, 3, 2, 1, False)  # stride groups [0,1] [2,3] [4,5] [6] share windows
    assert [list(np.flatnonzero(r)) for r in allowed] == [[0, 1, 2]] * 2 + [[2, 3, 4]] * 2 + [[4, 5, 6]] * 3
    allowed, offset = _natten_window(7, 2, 1, 2, False)  # dilation groups {0,2,4,6} and {1,3,5}
    assert list(np.flatnonzero(allowed[0])) == [0, 2] and list(np.flatnonzero(allowed[3])) == [1, 3]
    assert list(np.flatnonzero(allowed[6])) == [4, 6] and offset[6, 4] == 0 and offset[6, 6] == 1


@pytest.mark.parametrize(
    "shape,ks,st,dil,causal",
    [((1, 11, 13, 2, 8), (3, 5), (2, 3), (2, 1), (True, False)), ((1, 9, 12, 1, 8), 4, (1, 2), (2, 3), (False, True))],
)
def test_reference_matches_natten(shape, ks, st, dil, causal):
    """The dense reference against NATTEN itself (its Flex backend runs forwards on CPU)."""
    torch = pytest.importorskip("torch")
    natten = pytest.importorskip("natten")
    q, k, v = _inputs(shape, 1, jnp.float32, seed=5)
    want = natten.na2d(
        *(torch.from_numpy(np.array(x)) for x in (q, k, v)),
        kernel_size=ks,
        stride=st,
        dilation=dil,
        is_causal=causal,
    ).numpy()
    got = _dense_na2d(q, k, v, kernel_size=ks, stride=st, dilation=dil, is_causal=causal)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_reference_matches_clamp_op():
    """Stride 1, not causal: the reference is the existing op's NATTEN clamp border."""
    q, k, v = _inputs((1, 11, 13, 2, 3), 1, jnp.float32, seed=6)
    got = _dense_na2d(q, k, v, kernel_size=5, dilation=2)
    want = neighborhood_attention(q, k, v, kernel_size=5, dilation=2, border="clamp", implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def _na_inputs(shape, dtype, ks, with_rpb, with_mask, seed=0):
    q, k, v = _inputs(shape, 1, dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    kh, kw = _pair(ks)
    rpb = jnp.asarray(rng.standard_normal((shape[3], 2 * kh - 1, 2 * kw - 1)), jnp.float32) if with_rpb else None
    mask = jnp.asarray(rng.random(shape[:3]) > 0.3) if with_mask else None
    return q, k, v, rpb, mask


def _fwd_and_grads4(fn, q, k, v, rpb, ct):
    """Output and the (q, k, v, rpb) cotangents for output cotangent ``ct``."""

    @jax.jit
    def run(q, k, v, rpb, ct):
        out, vjp = jax.vjp(fn, q, k, v, rpb)
        return out, vjp(ct.astype(out.dtype))

    return run(q, k, v, rpb, ct)


# Odd, non-square maps; kernel sizes 3/5/7 (and an even one, which NATTEN allows); dilation 1/2;
# stride 1/2/3; causal on each axis; rpb; key mask; several heads; both tiling rule sets.
NA_CASES = [  # backend, dtype, (B, H, W, heads, D), kernel_size, stride, dilation, is_causal, rpb, key_mask, block_h
    ("triton", jnp.float32, (1, 11, 13, 2, 4), (3, 5), 1, 1, False, True, False, None),
    ("triton", jnp.float32, (1, 11, 13, 2, 4), 5, (2, 3), 1, False, True, True, None),
    # Several row tiles per image (block_h 4): the rpb gradient's per-program partials are summed.
    ("triton", jnp.float32, (2, 11, 13, 3, 3), (5, 3), (3, 2), (2, 1), (True, False), True, False, 4),
    ("triton", jnp.float32, (1, 11, 13, 1, 5), 3, (1, 3), 2, (False, True), False, True, None),
    ("triton", jnp.float32, (1, 8, 9, 2, 4), (4, 3), (2, 1), 1, (True, True), True, True, None),
    ("mosaic_tpu", jnp.float32, (1, 11, 13, 2, 4), 5, 2, (1, 2), (False, True), True, True, None),
    ("mosaic_tpu", jnp.bfloat16, (1, 11, 13, 2, 8), 7, (1, 2), 1, (True, False), True, False, None),
]


@pytest.mark.parametrize(
    "backend,dtype,shape,ks,st,dil,causal,with_rpb,with_mask,block_h",
    NA_CASES,
    ids=[f"{c[0]}-{jnp.dtype(c[1]).name}-k{c[3]}-s{c[4]}-d{c[5]}-c{c[6]}-b{int(c[7])}-m{int(c[8])}" for c in NA_CASES],
)
def test_na2d_matches_dense_reference(backend, dtype, shape, ks, st, dil, causal, with_rpb, with_mask, block_h):
    q, k, v, rpb, mask = _na_inputs(shape, dtype, ks, with_rpb, with_mask)
    kw = dict(kernel_size=ks, stride=st, dilation=dil, is_causal=causal, key_mask=mask)
    blocks = dict(block_sizes=BlockSizes(block_h=block_h)) if block_h else {}
    if rpb is None:  # differentiate w.r.t. a dummy so both paths share one harness
        rpb = jnp.zeros((1,), jnp.float32)
        f_pl = lambda q, k, v, r: na2d_pallas(q, k, v, backend=backend, interpret=True, **blocks, **kw)  # noqa: E731
        f_ref = lambda q, k, v, r: _dense_na2d(q, k, v, **kw)  # noqa: E731
    else:
        f_pl = lambda q, k, v, r: na2d_pallas(q, k, v, rpb=r, backend=backend, interpret=True, **blocks, **kw)  # noqa: E731
        f_ref = lambda q, k, v, r: _dense_na2d(q, k, v, rpb=r, **kw)  # noqa: E731
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    out, grads = _fwd_and_grads4(f_pl, q, k, v, rpb, ct)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_grads = _fwd_and_grads4(f_ref, *f32, rpb, ct)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=tol, rtol=tol)
    for name, g, r in zip(["dq", "dk", "dv", "drpb"], grads, ref_grads):
        # bf16 gradients sum k^2 bf16-rounded products per entry: 1e-1 absolute on O(1) values;
        # the bias gradient sums over every query of a head (~140 here), so its bound scales with that.
        atol = tol if tol < 1e-2 else (1e-1 if name != "drpb" else 1.0)
        if name == "drpb" and dtype == jnp.float32:
            atol = 1e-4  # a sum of ~140 float32 terms of O(1)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=atol, rtol=tol, err_msg=name)


def test_na2d_fully_masked_window_gives_zero_output_and_gradients():
    """Masking a 5x5 block of keys empties the 3x3 windows of the queries at its centre."""
    q, k, v, rpb, _ = _na_inputs((1, 9, 11, 2, 4), jnp.float32, 3, True, False, seed=7)
    mask = np.ones((1, 9, 11), bool)
    mask[:, 2:7, 3:8] = False
    mask = jnp.asarray(mask)
    kw = dict(kernel_size=3, key_mask=mask)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    f_pl = lambda q, k, v, r: na2d_pallas(q, k, v, rpb=r, backend="triton", interpret=True, **kw)  # noqa: E731
    out, (dq, dk, dv, drpb) = _fwd_and_grads4(f_pl, q, k, v, rpb, ct)
    empty = (slice(None), slice(3, 6), slice(4, 7))  # queries whose 3x3 window lies inside the block
    assert np.all(np.asarray(out)[empty] == 0.0) and np.all(np.asarray(dq)[empty] == 0.0)
    assert np.all(np.asarray(dk)[:, 2:7, 3:8] == 0.0) and np.all(np.asarray(dv)[:, 2:7, 3:8] == 0.0)
    assert np.all(np.isfinite(np.asarray(drpb)))
    ref_out, ref_grads = _fwd_and_grads4(lambda q, k, v, r: _dense_na2d(q, k, v, rpb=r, **kw), q, k, v, rpb, ct)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=1e-5)
    for name, g, r in zip(["dq", "dk", "dv", "drpb"], (dq, dk, dv, drpb), ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-5, err_msg=name)


def test_na2d_check_grads():
    """Numerical gradients of q, k, v and rpb through the custom VJP (causal rows, strided columns)."""
    q, k, v, rpb, mask = _na_inputs((1, 4, 5, 1, 2), jnp.float32, 3, True, True, seed=3)
    f = jax.jit(
        lambda q, k, v, r: na2d_pallas(
            q,
            k,
            v,
            kernel_size=3,
            stride=(1, 2),
            is_causal=(True, False),
            rpb=r,
            key_mask=mask,
            backend="triton",
            interpret=True,
        )
    )
    check_grads(f, (q, k, v, rpb), order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kernel_size=3, stride=4), "`stride` must be <= `kernel_size`"),
        (dict(kernel_size=(3, 7), dilation=(1, 2)), "`kernel_size \\* dilation` must be <= the input size"),
        (dict(kernel_size=1), "`kernel_size` must be >= 2"),
        (dict(kernel_size=(3, 3, 3)), "`q` must be 6-D"),
        (dict(kernel_size=3, is_causal=(True,)), "`is_causal` must be a bool or a tuple of 2 bools"),
        (dict(kernel_size=3, rpb=jnp.zeros((2, 3, 3))), r"`rpb` must have shape .* = \(2, 5, 5\), got \(2, 3, 3\)"),
        (dict(kernel_size=3, key_mask=jnp.ones((1, 7, 9))), "`key_mask` must be boolean"),
        (dict(kernel_size=3, key_mask=jnp.ones((1, 9, 7), bool)), r"`key_mask` must have shape \(batch, \*spatial\)"),
        (dict(kernel_size=3, scale="big"), "`scale` must be a float or None"),
    ],
)
def test_na2d_bad_arguments(kwargs, message):
    q, k, v = _inputs((1, 7, 9, 2, 4), 1, jnp.float32)
    with pytest.raises(ValueError, match=message):
        na2d_pallas(q, k, v, backend="triton", interpret=True, **kwargs)


def test_kernel_window_rule_matches_reference():
    """The kernel's in-kernel window predicate against the reference rule, exhaustively on small
    axes, and the claim its tiling rests on: every window lies within k - 1 group steps of its
    query (offsets <= 0 when causal), so 2k - 1 shifts (k when causal) cover it."""
    from flax_attn.kernels.neighborhood import _Axis, _window_valid

    for size in (13,):  # with dilation 2: dilation groups of 7 and 6 positions
        for k in range(2, 6):
            for st in range(1, k + 1):
                for dil in (1, 2):
                    for causal in (False, True):
                        if k * dil > size:
                            continue
                        want, _ = _natten_window(size, k, st, dil, causal)
                        ax = _Axis(size, k, dil, st, causal, "clamp")
                        x = np.arange(size)[:, None]
                        t = np.arange(ax.n_off)[None, :]
                        got = np.asarray(_window_valid(ax, jnp.asarray(x, jnp.int32), jnp.asarray(t)))
                        key = x + (t - (k - 1)) * dil  # the key shift t reads
                        inside = (key >= 0) & (key < size)
                        assert not np.any(got & ~inside), (size, k, st, dil, causal)
                        covered = np.zeros((size, size), bool)
                        rows, cols = np.nonzero(got)
                        covered[rows, key[rows, cols]] = True
                        np.testing.assert_array_equal(covered, want, err_msg=str((size, k, st, dil, causal)))


def test_na2d_kernel_contract_errors():
    """The shared kernel contract: backend vocabulary and BlockSizes fields, named in the error."""
    q, k, v = _inputs((1, 7, 9, 2, 4), 1, jnp.float32)
    backends = r"\('triton', 'mosaic_tpu'\)"
    with pytest.raises(ValueError, match=rf"na2d_pallas: `backend` must be one of {backends}, got 'gpu'"):
        na2d_pallas(q, k, v, kernel_size=3, backend="gpu")
    with pytest.raises(ValueError, match=r"na2d_pallas: `block_sizes.block_w` is not used by this kernel"):
        na2d_pallas(q, k, v, kernel_size=3, backend="triton", interpret=True, block_sizes=BlockSizes(block_w=4))
    with pytest.raises(ValueError, match="na2d_pallas: Mosaic TPU `block_sizes.block_h` must be a multiple of 8"):
        na2d_pallas(q, k, v, kernel_size=3, backend="mosaic_tpu", interpret=True, block_sizes=BlockSizes(block_h=4))
