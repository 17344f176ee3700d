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

from flax_attn.kernels.neighborhood import neighborhood_attention_pallas
from flax_attn.ops import neighborhood_attention


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
