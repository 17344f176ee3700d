"""Fused criss-cross Pallas kernel vs the XLA reference: interpret mode on CPU, compiled on GPU/TPU.

Both lowerings' kernels run here in the Pallas interpreter: the Triton (GPU) variant with
``interpret=True`` and the Mosaic (TPU) variant in TPU interpret mode
(``pltpu.InterpretParams(detect_races=True)``). Shapes stay tiny because the interpreter is slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

from flax_attn.kernels import BlockSizes, criss_cross_attention_pallas
from flax_attn.ops.criss_cross import criss_cross_attention

BACKENDS = {
    "triton": True,
    "mosaic_tpu": pltpu.InterpretParams(detect_races=True),
}


def _inputs(shape, cqk, cv, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q, k = (jnp.asarray(r.standard_normal((*shape, cqk)), dtype) for _ in range(2))
    v = jnp.asarray(r.standard_normal((*shape, cv)), dtype)
    ct = jnp.asarray(r.standard_normal((*shape, cv)), jnp.float32)
    return q, k, v, ct


def _value_and_grads(fn, q, k, v, ct):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _reference(q, k, v, ct):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return _value_and_grads(lambda *a: criss_cross_attention(*a, implementation="xla"), *f32, ct)


def _assert_close(got, want, atol, rtol, what):
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=rtol, err_msg=what
    )


# (B, H, W), Cqk, Cv: odd sizes that need spatial and channel padding on both backends.
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interpret_matches_reference(backend, dtype):
    q, k, v, ct = _inputs((2, 5, 9), 3, 5, jnp.dtype(dtype), seed=1)
    out, grads = _value_and_grads(
        lambda *a: criss_cross_attention_pallas(*a, backend=backend, interpret=BACKENDS[backend]), q, k, v, ct
    )
    ref_out, ref_grads = _reference(q, k, v, ct)
    assert out.dtype == q.dtype and out.shape == v.shape
    # float32: 1e-5. bfloat16 against the float32 reference: 5e-2 (bf16 inputs, P cast to bf16 for P @ V).
    tol = 1e-5 if dtype == "float32" else 5e-2
    _assert_close(out, ref_out, tol, tol, "output")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype
        _assert_close(g, rg, tol, tol, f"d{name}")


def test_interpret_exact_tiling_and_other_tiles():
    # H, W exact multiples of a non-default tile: no padding path, a 2 x 2 grid of pixel tiles.
    q, k, v, ct = _inputs((1, 16, 16), 4, 8, seed=2)
    ref_out, ref_grads = _reference(q, k, v, ct)
    out, grads = _value_and_grads(
        lambda *a: criss_cross_attention_pallas(
            *a, backend="mosaic_tpu", interpret=True, block_sizes=BlockSizes(block_h=8, block_w=8)
        ),
        q,
        k,
        v,
        ct,
    )
    _assert_close(out, ref_out, 1e-5, 1e-5, "output")
    for name, g, rg in zip("qkv", grads, ref_grads):
        _assert_close(g, rg, 1e-5, 1e-5, f"d{name}")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_one_row_image_and_channel_blocks(backend):
    # H = 1: the column pass has no key at all (only the centre, which the row counts), so its
    # log-sum-exp must drop out of the merge; 40 value channels in blocks of 16 (Triton: padded to
    # 64, four blocks) / 128-multiples or whole (Mosaic) exercise the channel tiling of P @ V and dV.
    blocks = BlockSizes(block_h=16, block_w=16, block_c=16 if backend == "triton" else None)
    fn = lambda *a: criss_cross_attention_pallas(  # noqa: E731
        *a, backend=backend, interpret=BACKENDS[backend], block_sizes=blocks
    )
    for shape, cv in (((2, 1, 7), 5), ((1, 6, 3), 40)):
        q, k, v, ct = _inputs(shape, 3, cv, seed=5)
        out, grads = _value_and_grads(fn, q, k, v, ct)
        ref_out, ref_grads = _reference(q, k, v, ct)
        _assert_close(out, ref_out, 1e-5, 1e-5, f"output {shape}")
        for name, g, rg in zip("qkv", grads, ref_grads):
            _assert_close(g, rg, 1e-5, 1e-5, f"d{name} {shape}")


def test_custom_vjp_check_grads():
    q, k, v, _ = _inputs((1, 3, 4), 2, 3, seed=3)
    fn = lambda q, k, v: criss_cross_attention_pallas(q, k, v, backend="triton", interpret=True)  # noqa: E731
    check_grads(fn, (q, k, v), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_bad_arguments():
    q, k, v, _ = _inputs((1, 3, 4), 2, 3)
    with pytest.raises(ValueError, match=r"`backend` must be one of \('triton', 'mosaic_tpu'\), got 'cuda'"):
        criss_cross_attention_pallas(q, k, v, backend="cuda", interpret=True)
    with pytest.raises(ValueError, match=r"Triton block sizes must be powers of two >= 16, got BlockSizes\(block_h=8"):
        criss_cross_attention_pallas(
            q, k, v, backend="triton", interpret=True, block_sizes=BlockSizes(block_h=8, block_w=12)
        )
    with pytest.raises(ValueError, match="`v` must share"):
        criss_cross_attention_pallas(q, k, v[:, :2], backend="triton", interpret=True)
    with pytest.raises(ValueError, match="`block_sizes.block_windows` is not used by this kernel"):
        criss_cross_attention_pallas(q, k, v, interpret=True, block_sizes=BlockSizes(block_windows=2))


def _compiled_case(dtype):
    q, k, v, ct = _inputs((2, 97, 97), 64, 512 if dtype == "float32" else 96, jnp.dtype(dtype), seed=4)
    out, grads = jax.jit(lambda *a: _value_and_grads(criss_cross_attention_pallas, *a))(q, k, v, ct)
    ref_out, ref_grads = jax.jit(_reference)(q, k, v, ct)
    tol = 2e-2 if dtype == "float32" else 5e-2  # float32 matmuls run at the platform default (TF32 / bf16 passes)
    _assert_close(out, ref_out, tol, tol, "output")
    for name, g, rg in zip("qkv", grads, ref_grads):
        _assert_close(g, rg, tol * 4, tol, f"d{name}")


@pytest.mark.parametrize(
    "hardware", [pytest.param("gpu", marks=pytest.mark.gpu), pytest.param("tpu", marks=pytest.mark.tpu)]
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled(dtype, hardware):
    """The compiled kernel on a GPU or a TPU (each case skips on other hardware, see conftest.py)."""
    _compiled_case(dtype)
