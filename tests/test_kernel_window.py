"""Fused Swin window-attention Pallas kernel vs the XLA reference: interpret mode on CPU.

Both tiling rule sets run here: the Triton (GPU) kernels with ``interpret=True`` and the Mosaic
(TPU) kernels in the TPU interpreter (``pltpu.InterpretParams(detect_races=True)``). Lowering for
CUDA (Triton) and TPU (Mosaic) is checked with ``jax.export`` (no device needed); compiled runs
are marked gpu/tpu. Gradients cover q, k, v and the relative position bias table.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

from flax_attn import catalogue
from flax_attn.acmix import WindowAttention
from flax_attn.kernels import BlockSizes, window_attention_pallas
from flax_attn.ops.window import window_attention

BACKENDS = {"triton": True, "mosaic_tpu": pltpu.InterpretParams(detect_races=True)}


def _inputs(shape, window_size, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.standard_normal(shape), dtype) for _ in range(3))
    table = jnp.asarray(r.standard_normal(((2 * window_size - 1) ** 2, shape[3])), jnp.float32)
    ct = jnp.asarray(r.standard_normal(shape), jnp.float32)
    return q, k, v, table, ct


def _value_and_grads(fn, q, k, v, table, ct):
    """Output and the gradients of ``sum(out * ct)`` for q, k, v and the bias table, compiled once."""

    @jax.jit
    def run(q, k, v, table, ct):
        def loss(q, k, v, table):
            out = fn(q, k, v, table)
            return jnp.sum(out.astype(jnp.float32) * ct), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, table)
        return out, grads

    return run(q, k, v, table, ct)


def _reference(q, k, v, table, ct, **kw):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    fn = lambda q, k, v, t: window_attention(q, k, v, bias_table=t, implementation="xla", **kw)  # noqa: E731
    return _value_and_grads(fn, *f32, table, ct)


def _assert_close(got, want, atol, rtol, what):
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=rtol, err_msg=what
    )


# Odd window counts (15, 3, 2x6 = 12 with 5-window tiles), head dims that are not powers of two
# (3, 5, 24), windows of 3, 4 and 7 (N = 9, 16, 49: padded to 16/64 on Triton, 16/56 on Mosaic),
# every shift kind, both dtypes, both tiling rule sets.
CASES = [  # backend, dtype, window_size, shift_size, (B, H, W, heads, D), block_windows
    ("triton", "float32", 3, 0, (1, 9, 15, 2, 3), None),
    ("triton", "float32", 3, 1, (1, 9, 15, 2, 3), None),
    ("triton", "bfloat16", 4, 2, (2, 8, 12, 1, 5), 2),
    ("triton", "float32", 7, 3, (1, 7, 21, 1, 24), None),
    ("mosaic_tpu", "float32", 3, 2, (1, 9, 15, 2, 3), None),
    ("mosaic_tpu", "bfloat16", 3, 0, (2, 6, 9, 2, 5), 5),
    ("mosaic_tpu", "float32", 4, 1, (2, 8, 12, 1, 5), 5),
]


@pytest.mark.parametrize(
    "backend,dtype,ws,shift,shape,tw",
    CASES,
    ids=[f"{c[0]}-{c[1]}-ws{c[2]}-s{c[3]}-d{c[4][-1]}" for c in CASES],
)
def test_interpret_matches_reference(backend, dtype, ws, shift, shape, tw):
    q, k, v, table, ct = _inputs(shape, ws, jnp.dtype(dtype), seed=ws + shift)
    kw = dict(window_size=ws, shift_size=shift)
    fn = lambda q, k, v, t: window_attention_pallas(  # noqa: E731
        q,
        k,
        v,
        bias_table=t,
        backend=backend,
        interpret=BACKENDS[backend],
        block_sizes=BlockSizes(block_windows=tw),
        **kw,
    )
    out, grads = _value_and_grads(fn, q, k, v, table, ct)
    ref_out, ref_grads = _reference(q, k, v, table, ct, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    # bf16 inputs against the float32 reference: 5e-2 (bf16 P and dS in the matmuls).
    tol = 1e-5 if dtype == "float32" else 5e-2
    _assert_close(out, ref_out, tol, tol, "output")
    for name, g, r in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3]):
        assert g.dtype == q.dtype, name
        _assert_close(g, r, tol, tol, name)
    assert grads[3].dtype == jnp.float32
    _assert_close(grads[3], ref_grads[3], tol, tol, "d bias_table")


def test_without_bias_and_custom_scale():
    q, k, v, table, ct = _inputs((1, 6, 6, 2, 4), 3, seed=5)
    kw = dict(window_size=3, shift_size=1, scale=0.3)
    fn = lambda q, k, v, t: window_attention_pallas(q, k, v, backend="mosaic_tpu", interpret=True, **kw)  # noqa: E731
    out, grads = _value_and_grads(fn, q, k, v, table, ct)
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v, t: window_attention(q, k, v, implementation="xla", **kw), q, k, v, table, ct
    )
    _assert_close(out, ref_out, 1e-5, 1e-5, "output")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(g, r, 1e-5, 1e-5, name)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_check_grads_custom_vjp(backend):
    q, k, v, table, _ = _inputs((1, 4, 6, 1, 2), 2, seed=7)
    fn = jax.jit(
        lambda q, k, v, t: window_attention_pallas(
            q, k, v, window_size=2, shift_size=1, bias_table=t, backend=backend, interpret=BACKENDS[backend]
        )
    )
    check_grads(fn, (q, k, v, table), order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-3)


def test_op_dispatch():
    q, k, v, table, _ = _inputs((1, 6, 9, 2, 3), 3, seed=8)
    kw = dict(window_size=3, shift_size=1, bias_table=table)
    out = window_attention(q, k, v, implementation="pallas", **kw)
    ref = window_attention(q, k, v, implementation="xla", **kw)
    _assert_close(out, ref, 1e-5, 1e-5, "output")
    jaxpr = str(jax.make_jaxpr(lambda q: window_attention(q, k, v, **kw))(q))
    assert "pallas_call" not in jaxpr  # nothing is verified: the default is the XLA path everywhere
    # Attention dropout has no kernel: None falls back to XLA, "pallas" refuses.
    drop = dict(dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda q: window_attention(q, k, v, **kw, **drop))(q))
    with pytest.raises(ValueError, match="no attention dropout"):
        window_attention(q, k, v, implementation="pallas", **kw, **drop)
    with pytest.raises(ValueError, match=r"`implementation` must be one of \(None, 'xla', 'pallas'"):
        window_attention(q, k, v, implementation="cuda", **kw)


def test_bad_arguments():
    q, k, v, table, _ = _inputs((1, 6, 9, 2, 3), 3)
    with pytest.raises(ValueError, match=r"`backend` must be one of \('triton', 'mosaic_tpu'\), got 'gpu'"):
        window_attention_pallas(q, k, v, window_size=3, backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="Triton `block_sizes.block_windows` must be a power of two"):
        window_attention_pallas(
            q, k, v, window_size=3, backend="triton", interpret=True, block_sizes=BlockSizes(block_windows=3)
        )
    with pytest.raises(ValueError, match="window_attention_pallas: height and width must be multiples"):
        window_attention_pallas(q, k, v, window_size=4, interpret=True)
    with pytest.raises(ValueError, match=r"`bias_table` must have shape \(25, 2\)"):
        window_attention_pallas(q, k, v, window_size=3, bias_table=table[:, :1], interpret=True)


def test_module_pallas_matches_xla():
    """WindowAttention with implementation="pallas" vs "xla": output, input and parameter gradients."""
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 6, 9, 12)), jnp.float32)
    make = lambda impl: WindowAttention(dim=12, window_size=3, num_heads=3, shift_size=1, implementation=impl)  # noqa: E731
    variables = jax.jit(make("xla").init)(jax.random.PRNGKey(0), x)
    # A non-trivial table (the init is std 0.02) so that its effect and gradient are not tiny.
    table = jax.random.normal(jax.random.PRNGKey(1), variables["params"]["relative_position_bias_table"].shape)
    variables = {"params": {**variables["params"], "relative_position_bias_table": table}}

    def value_and_grads(impl):
        loss = lambda p, x: jnp.sum(jnp.sin(make(impl).apply({"params": p}, x)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], x)

    (val, (gp, gx)), (ref_val, (ref_gp, ref_gx)) = value_and_grads("pallas"), value_and_grads("xla")
    _assert_close(val, ref_val, 1e-5, 1e-5, "loss")
    _assert_close(gx, ref_gx, 1e-5, 1e-5, "dx")
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(gp), jax.tree_util.tree_leaves(ref_gp)
    for (path, g), r in zip(flat, ref_flat):
        _assert_close(g, r, 1e-5, 1e-5, jax.tree_util.keystr(path))
    assert float(jnp.max(jnp.abs(gp["relative_position_bias_table"]))) > 1e-3


def test_module_pallas_parity_with_torch():
    """The catalogue entry with implementation="pallas" against the official-semantics torch reference."""
    pytest.importorskip("torch")
    from flax_attn.testing.parity import check_parity

    # The entry's config and inputs feed both factories; only the Flax factory gains the kernel
    # (the torch reference takes Swin's arguments, which have no `implementation`).
    entry = catalogue.get("window_attention")
    entry = dataclasses.replace(entry, flax=functools.partial(entry.flax, implementation="pallas"))
    check_parity(entry)


@pytest.mark.parametrize(
    "backend,platform,marker", [("triton", "cuda", "__gpu$xla.gpu.triton"), ("mosaic_tpu", "tpu", "tpu_custom_call")]
)
def test_lowers_for_device(backend, platform, marker):
    """Forward and backward lower to Triton (CUDA) / Mosaic (TPU) at Swin-T stage-1 geometry, bf16."""

    def grads(q, k, v, table):
        def f(q, k, v, table):
            kw = dict(window_size=7, shift_size=3, backend=backend, interpret=False)
            return window_attention_pallas(q, k, v, bias_table=table, **kw)

        return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))(q, k, v, table)

    x = jax.ShapeDtypeStruct((2, 56, 56, 3, 32), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((169, 3), jnp.float32)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(jax.jit(grads), platforms=[platform], disabled_checks=checks)(x, x, x, table)
    assert exported.mlir_module().count(marker) >= 2  # forward, backward


def _compiled_case(dtype):
    # Swin-T stage 1 geometry at batch 2 (window 7 -> 49 tokens, head dim 32), shifted.
    q, k, v, table, ct = _inputs((2, 56, 56, 3, 32), 7, jnp.dtype(dtype), seed=10)
    kw = dict(window_size=7, shift_size=3)
    fn = lambda q, k, v, t: window_attention(q, k, v, bias_table=t, implementation="pallas", **kw)  # noqa: E731
    out, grads = _value_and_grads(fn, q, k, v, table, ct)
    with jax.default_matmul_precision("highest"):
        ref_out, ref_grads = _reference(q, k, v, table, ct, **kw)
    tol = 2e-2 if dtype == "float32" else 5e-2  # float32 matmuls run at the platform default (TF32 / bf16 passes)
    _assert_close(out, ref_out, tol, tol, "output")
    for name, g, r in zip(("dq", "dk", "dv", "d bias_table"), grads, ref_grads):
        _assert_close(g, r, tol * 4, tol, name)


@pytest.mark.parametrize(
    "hardware", [pytest.param("gpu", marks=pytest.mark.gpu), pytest.param("tpu", marks=pytest.mark.tpu)]
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled(dtype, hardware):
    """The compiled kernel on a GPU or a TPU (each case skips on other hardware, see conftest.py)."""
    _compiled_case(dtype)


def test_mosaic_gpu_route_data_movement(monkeypatch):
    """The Mosaic GPU port's wrapper (roll, partition, folded bias and shift mask, padding) and its
    XLA backward, with the kernel body swapped for the same math in XLA: Pallas cannot interpret
    Mosaic GPU kernels, whose body is compile-checked by benchmarks/compile_check.py instead."""
    from flax_attn.kernels import window_mosaic_gpu

    monkeypatch.setattr(window_mosaic_gpu, "_forward", window_mosaic_gpu._dense_windows)
    for shape, ws, shift in (((2, 6, 9, 2, 5), 3, 1), ((1, 8, 8, 3, 24), 4, 0)):
        q, k, v, table, ct = _inputs(shape, ws, jnp.bfloat16, seed=11)
        kw = dict(window_size=ws, shift_size=shift)
        fn = lambda q, k, v, t, kw=kw: window_attention_pallas(q, k, v, bias_table=t, backend="mosaic_gpu", **kw)  # noqa: E731
        out, grads = _value_and_grads(fn, q, k, v, table, ct)
        ref_out, ref_grads = _reference(q, k, v, table, ct, **kw)
        _assert_close(out, ref_out, 5e-2, 5e-2, "output")
        for name, g, r in zip(("dq", "dk", "dv", "d bias_table"), grads, ref_grads):
            _assert_close(g, r, 1e-1, 5e-2, name)


def test_mosaic_gpu_limits():
    q, k, v, table, _ = _inputs((1, 12, 12, 1, 8), 12)
    with pytest.raises(ValueError, match="inputs must be bfloat16 or float16 \\(wgmma operands\\), got float32"):
        window_attention_pallas(q, k, v, window_size=3, backend="mosaic_gpu")
    qb = q.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="windows of at most 128 tokens .* got 144 tokens"):
        window_attention_pallas(qb, qb, qb, window_size=12, backend="mosaic_gpu")
    with pytest.raises(ValueError, match="backend='mosaic_gpu' has no Pallas interpreter"):
        window_attention_pallas(qb, qb, qb, window_size=3, backend="mosaic_gpu", interpret=True)
