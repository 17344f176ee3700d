"""Fused criss-cross attention in Pallas as two passes of dense attention merged by log-sum-exp.

The op (see :mod:`flax_attn.ops.criss_cross`): pixel ``(y, x)`` attends to its row ``(y, :)`` and
its column ``(:, x)`` without the centre, one softmax over both, no scaling. One softmax over the
union of two disjoint key sets is the log-sum-exp merge of a softmax over each set:

* the *row pass* is dense attention over each image row (``B * H`` sequences of length ``W``, the
  centre included);
* the *column pass* is dense attention over each image column (``B * W`` sequences of length
  ``H``) with the diagonal masked, which removes the centre exactly (it is counted once, in the row);
* with ``lse = logaddexp(lse_row, lse_col)``, the output is
  ``exp(lse_row - lse) * o_row + exp(lse_col - lse) * o_col``.

Both passes run one kernel, :func:`_sequence_attention`: flash-style dense attention over short
sequences that returns the output and the float32 log-sum-exp per query and takes cotangents for
both (``d lse_i / d s_ij = p_ij``, so the lse cotangent folds into the usual ``D_i = dO_i . O_i``
term). The merge is XLA elementwise math, differentiated by autodiff. Nothing of the size of the
``(B, H, W, H + W - 1)`` energy is written.

Tiling. A program owns ``block_h`` queries of one sequence and ``block_c`` value channels; it
walks the keys ``block_w`` at a time with an online softmax, so what is live on chip is a
``(block_h, C)`` query tile, a ``(block_w, C)`` key chunk and a ``(block_w, block_c)`` value chunk,
whatever the image size and channel count. (The previous design kept ``TY`` full rows and ``TX``
full columns of keys and values on chip per tile and asked for 2 MiB of shared memory at CCNet's
geometry, where an H100 has 227 KiB.) The backward pass has three kernels: dQ over query tiles,
dK over key tiles, dV over key tiles and value-channel blocks; each recomputes the probabilities
from the saved log-sum-exp and none writes another program's block (no atomics).

Shapes that do not fit the tiling are padded inside the wrapper, never rejected: on GPU every
block dimension must be a power of two and ``tl.dot`` dimensions >= 16 (Triton), so sequence
lengths and channels are padded to powers of two >= 16; on TPU the sequence length is padded to a
multiple of the tiles and channel blocks span the full channels (or multiples of 128). Padded keys
are masked out, padded queries and channels are sliced off.

Precision: logits, softmax statistics and all accumulations are float32; probabilities are cast
to the value dtype before the ``P @ V`` matmul (as flash attention does), so bfloat16 inputs use
bfloat16 matmuls with float32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flax_attn.kernels._common import (
    MASK_VALUE,
    BlockSizes,
    compiler_params,
    cost_estimate,
    dot,
    dot_nt,
    next_pow2,
    resolve_backend,
    resolve_interpret,
    round_up,
)
from flax_attn.kernels.checks import check_criss_cross_args

__all__ = ["criss_cross_attention_pallas", "default_block_sizes"]

_WHERE = "criss_cross_attention_pallas"


def default_block_sizes(backend: str, cv: int) -> BlockSizes:
    """Untuned defaults: 32-query tiles and 32-key steps (``tl.dot`` needs >= 16 on GPU), value
    channels in blocks of 128 on GPU (bounds shared memory) and whole on TPU (VMEM holds them)."""
    if backend == "triton":
        return BlockSizes(block_h=32, block_w=32, block_c=min(max(16, next_pow2(cv)), 128))
    return BlockSizes(block_h=32, block_w=32, block_c=cv)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static geometry of one pass (hashable: a ``custom_vjp`` non-differentiable argument)."""

    backend: str
    interpret: Any
    skip_diagonal: bool  # the column pass masks query == key (the centre, counted in the row pass)
    length: int  # real sequence length
    lp: int  # padded sequence length, a multiple of tq and tk
    tq: int
    tk: int
    tc: int
    cqk_p: int
    cv_p: int


def _plan(backend, interpret, skip_diagonal, length, cqk, cv, blocks: BlockSizes) -> _Plan:
    tq, tk, tc = blocks.block_h, blocks.block_w, blocks.block_c
    if backend == "triton":
        if any(t & (t - 1) or t < 16 for t in (tq, tk, tc)):
            raise ValueError(f"{_WHERE}: Triton block sizes must be powers of two >= 16, got {blocks}")
        cqk_p, cv_p = max(16, next_pow2(cqk)), max(16, next_pow2(cv), tc)
        # The key/value blocks span the whole (padded) sequence: a power of two on Triton.
        lp = max(next_pow2(length), tq, tk)
    else:
        if tq % 8 or tk % 8:
            raise ValueError(f"{_WHERE}: Mosaic TPU `block_h`/`block_w` must be multiples of 8, got {blocks}")
        if tc != cv and tc % 128:
            raise ValueError(
                f"{_WHERE}: Mosaic TPU `block_c` must be the value channels {cv} or a multiple of 128, got {tc}"
            )
        cqk_p, cv_p = cqk, round_up(cv, tc)
        lp = round_up(length, tq * tk // _gcd(tq, tk))
    return _Plan(backend, interpret, skip_diagonal, length, lp, tq, tk, tc, cqk_p, cv_p)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


# --------------------------------------------------------------------------- kernel bodies


def _mask(p: _Plan, q0, k0, shape):
    """Which (query, key) pairs of a (queries from q0, keys from k0) block take part."""
    qi = q0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    kj = k0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    ok = kj < p.length
    if p.skip_diagonal:
        ok = ok & (kj != qi)
    return ok


def _probs(p: _Plan, q, k, lse, q0, k0):
    """Recomputed probabilities ``exp(q k^T - lse)`` of a block, zero where masked."""
    s = dot_nt(q, k)
    ok = _mask(p, q0, k0, s.shape)
    return jnp.where(ok, jnp.exp(jnp.where(ok, s, MASK_VALUE) - lse), 0.0)


def _dp(p: _Plan, do_ref, do_rows, v_ref, v_rows):
    """``dO V^T`` of a block, summed over value-channel chunks so only ``tc`` channels are live."""
    acc = None
    for c in range(p.cv_p // p.tc):
        cols = pl.ds(c * p.tc, p.tc)
        part = dot_nt(do_ref[do_rows, cols], v_ref[v_rows, cols])
        acc = part if acc is None else acc + part
    return acc


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, p: _Plan):
    q0 = pl.program_id(1) * p.tq
    q = q_ref[...]

    def body(j, carry):
        m, l, acc = carry
        k0 = pl.multiple_of(j * p.tk, p.tk)
        k, v = k_ref[pl.ds(k0, p.tk), :], v_ref[pl.ds(k0, p.tk), :]
        s = dot_nt(q, k)
        ok = _mask(p, q0, k0, s.shape)
        s = jnp.where(ok, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        pr = jnp.where(ok, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        l = l * alpha + jnp.sum(pr, axis=1, keepdims=True)
        acc = acc * alpha + dot(pr.astype(v.dtype), v)
        return m_new, l, acc

    init = (
        jnp.full((p.tq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((p.tq, 1), jnp.float32),
        jnp.zeros((p.tq, p.tc), jnp.float32),
    )
    m, l, acc = lax.fori_loop(0, p.lp // p.tk, body, init)
    # A query with no key (the column pass of a one-row image) gets output 0 and lse = MASK_VALUE,
    # so the merge gives it weight exp(MASK_VALUE - lse) = 0.
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, MASK_VALUE, m + jnp.log(l_safe))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dq_ref, *, p: _Plan):
    q0 = pl.program_id(1) * p.tq
    q, lse, d = q_ref[...], lse_ref[...], d_ref[...]

    def body(j, dq):
        k0 = pl.multiple_of(j * p.tk, p.tk)
        k = k_ref[pl.ds(k0, p.tk), :]
        pr = _probs(p, q, k, lse, q0, k0)
        ds = pr * (_dp(p, do_ref, slice(None), v_ref, pl.ds(k0, p.tk)) - d)
        return dq + dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, p.lp // p.tk, body, jnp.zeros((p.tq, p.cqk_p), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dk_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, d_ref, dk_ref, *, p: _Plan):
    k0 = pl.program_id(1) * p.tk
    k = k_ref[...]

    def body(i, dk):
        q0 = pl.multiple_of(i * p.tq, p.tq)
        rows = pl.ds(q0, p.tq)
        q = q_ref[rows, :]
        pr = _probs(p, q, k, lse_ref[rows, :], q0, k0)
        ds = pr * (_dp(p, do_ref, rows, v_ref, slice(None)) - d_ref[rows, :])
        return dk + dot(ds.T.astype(q.dtype), q)

    dk = lax.fori_loop(0, p.lp // p.tq, body, jnp.zeros((p.tk, p.cqk_p), jnp.float32))
    dk_ref[...] = dk.astype(dk_ref.dtype)


def _dv_kernel(k_ref, q_ref, do_ref, lse_ref, dv_ref, *, p: _Plan):
    k0 = pl.program_id(1) * p.tk
    k = k_ref[...]

    def body(i, dv):
        q0 = pl.multiple_of(i * p.tq, p.tq)
        rows = pl.ds(q0, p.tq)
        pr = _probs(p, q_ref[rows, :], k, lse_ref[rows, :], q0, k0)
        do = do_ref[rows, :]
        return dv + dot(pr.T.astype(do.dtype), do)

    dv = lax.fori_loop(0, p.lp // p.tq, body, jnp.zeros((p.tk, p.tc), jnp.float32))
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------- pallas_call plumbing


def _call(kernel, p: _Plan, grid, in_specs, out_specs, out_shape, name, *args, work=(0, 0)):
    """``work``: (flops, transcendentals) of the whole call, for its cost estimate."""
    return pl.pallas_call(
        functools.partial(kernel, p=p),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(p.backend, len(grid)),
        interpret=p.interpret,
        name=name,
        cost_estimate=cost_estimate(*work, args, out_shape),
    )(*args)


def _forward(p: _Plan, q, k, v):
    s = q.shape[0]
    n_c = p.cv_p // p.tc
    grid = (s, p.lp // p.tq, n_c)
    in_specs = [
        pl.BlockSpec((None, p.tq, p.cqk_p), lambda b, i, c: (b, i, 0)),
        pl.BlockSpec((None, p.lp, p.cqk_p), lambda b, i, c: (b, 0, 0)),
        pl.BlockSpec((None, p.lp, p.tc), lambda b, i, c: (b, 0, c)),
    ]
    out_specs = [
        pl.BlockSpec((None, p.tq, p.tc), lambda b, i, c: (b, i, c)),
        # One log-sum-exp block per channel block (all equal): no two programs write one block.
        pl.BlockSpec((None, None, p.tq, 1), lambda b, i, c: (c, b, i, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct((s, p.lp, p.cv_p), v.dtype), jax.ShapeDtypeStruct((n_c, s, p.lp, 1), jnp.float32)]
    pairs = s * p.lp * p.lp  # (query, key) pairs; the logits are recomputed per value-channel block
    work = (2 * pairs * (p.cqk_p * n_c + p.cv_p), pairs * n_c)
    o, lse = _call(_fwd_kernel, p, grid, in_specs, out_specs, out_shape, "criss_cross_pass_fwd", q, k, v, work=work)
    return o, lse[0]


def _backward(p: _Plan, q, k, v, o, lse, do, dlse):
    s = q.shape[0]
    n_c = p.cv_p // p.tc
    # D_i = dO_i . O_i - dlse_i: the softmax-backward correction, with the lse cotangent folded in.
    d = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True) - dlse
    pairs = s * p.lp * p.lp
    work_qk = (2 * pairs * (2 * p.cqk_p + p.cv_p), pairs)  # logits, dO V^T, and dS K (or dS^T Q)
    seq = lambda c: pl.BlockSpec((None, p.lp, c), lambda b, i: (b, 0, 0))  # noqa: E731
    q_tile = pl.BlockSpec((None, p.tq, p.cqk_p), lambda b, i: (b, i, 0))
    dq = _call(
        _dq_kernel,
        p,
        (s, p.lp // p.tq),
        [
            q_tile,
            seq(p.cqk_p),
            seq(p.cv_p),
            pl.BlockSpec((None, p.tq, p.cv_p), lambda b, i: (b, i, 0)),
            pl.BlockSpec((None, p.tq, 1), lambda b, i: (b, i, 0)),
            pl.BlockSpec((None, p.tq, 1), lambda b, i: (b, i, 0)),
        ],
        q_tile,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        "criss_cross_pass_dq",
        q,
        k,
        v,
        do,
        lse,
        d,
        work=work_qk,
    )
    k_tile = pl.BlockSpec((None, p.tk, p.cqk_p), lambda b, j: (b, j, 0))
    dk = _call(
        _dk_kernel,
        p,
        (s, p.lp // p.tk),
        [k_tile, pl.BlockSpec((None, p.tk, p.cv_p), lambda b, j: (b, j, 0)), seq(p.cqk_p), seq(p.cv_p), seq(1), seq(1)],
        k_tile,
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        "criss_cross_pass_dk",
        k,
        v,
        q,
        do,
        lse,
        d,
        work=work_qk,
    )
    dv = _call(
        _dv_kernel,
        p,
        (s, p.lp // p.tk, n_c),
        [
            pl.BlockSpec((None, p.tk, p.cqk_p), lambda b, j, c: (b, j, 0)),
            pl.BlockSpec((None, p.lp, p.cqk_p), lambda b, j, c: (b, 0, 0)),
            pl.BlockSpec((None, p.lp, p.tc), lambda b, j, c: (b, 0, c)),
            pl.BlockSpec((None, p.lp, 1), lambda b, j, c: (b, 0, 0)),
        ],
        pl.BlockSpec((None, p.tk, p.tc), lambda b, j, c: (b, j, c)),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        "criss_cross_pass_dv",
        k,
        q,
        do,
        lse,
        work=(2 * pairs * (p.cqk_p * n_c + p.cv_p), pairs * n_c),
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sequence_attention(p: _Plan, q, k, v):
    """Dense attention over each padded sequence ``(S, Lp, C)``: output and lse ``(S, Lp, 1)``."""
    return _forward(p, q, k, v)


def _sequence_attention_fwd(p, q, k, v):
    o, lse = _forward(p, q, k, v)
    return (o, lse), (q, k, v, o, lse)


def _sequence_attention_bwd(p, res, cts):
    q, k, v, o, lse = res
    do, dlse = cts
    return _backward(p, q, k, v, o, lse, do, dlse)


_sequence_attention.defvjp(_sequence_attention_fwd, _sequence_attention_bwd)


def _pass(p: _Plan, q, k, v):
    """One pass over sequences ``(S, L, C)``: pads, runs the kernel, returns (out f32, lse)."""
    pad = lambda x, c: jnp.pad(x, ((0, 0), (0, p.lp - x.shape[1]), (0, c - x.shape[2])))  # noqa: E731
    o, lse = _sequence_attention(p, pad(q, p.cqk_p), pad(k, p.cqk_p), pad(v, p.cv_p))
    return o[:, : p.length, : v.shape[-1]].astype(jnp.float32), lse[:, : p.length, 0]


def criss_cross_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    backend: str | None = None,
    interpret: Any = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Fused criss-cross attention; differentiable (custom VJP with fused backward kernels).

    Args:
      q, k: ``(B, H, W, Cqk)``; v: ``(B, H, W, Cv)``. Any H, W, C (padded inside).
      backend: ``"triton"`` (GPU) or ``"mosaic_tpu"`` (TPU): the tiling rules; default: the local
        platform's lowering (Triton rules on CPU, where only interpret mode runs).
      interpret: run in the Pallas interpreter; ``None`` = exactly when the local platform has no
        Pallas lowering (CPU). For ``"mosaic_tpu"``, ``True`` is TPU interpret mode with race
        detection; an ``InterpretParams`` is passed through.
      block_sizes: ``BlockSizes(block_h=..., block_w=..., block_c=...)``: queries per program,
        keys per inner step and value channels per program, in both passes (defaults:
        :func:`default_block_sizes`).

    Returns:
      ``(B, H, W, Cv)`` in the inputs' result dtype.
    """
    check_criss_cross_args(_WHERE, q, k, v)
    backend = resolve_backend(_WHERE, backend)
    interpret = resolve_interpret(backend, interpret)
    b, h, w, cqk = q.shape
    cv = v.shape[-1]
    blocks = block_sizes or BlockSizes()
    blocks.check(_WHERE, ("block_h", "block_w", "block_c"))
    default = default_block_sizes(backend, cv)
    blocks = BlockSizes(*(getattr(blocks, f) or getattr(default, f) for f in ("block_h", "block_w", "block_c")))
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k, v = (x.astype(dtype) for x in (q, k, v))

    rows = lambda x: x.reshape(b * h, w, x.shape[-1])  # noqa: E731
    cols = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * w, h, x.shape[-1])  # noqa: E731
    o_r, lse_r = _pass(_plan(backend, interpret, False, w, cqk, cv, blocks), rows(q), rows(k), rows(v))
    o_c, lse_c = _pass(_plan(backend, interpret, True, h, cqk, cv, blocks), cols(q), cols(k), cols(v))
    o_r, lse_r = o_r.reshape(b, h, w, cv), lse_r.reshape(b, h, w)
    o_c = jnp.swapaxes(o_c.reshape(b, w, h, cv), 1, 2)
    lse_c = jnp.swapaxes(lse_c.reshape(b, w, h), 1, 2)
    lse = jnp.logaddexp(lse_r, lse_c)
    out = jnp.exp(lse_r - lse)[..., None] * o_r + jnp.exp(lse_c - lse)[..., None] * o_c
    return out.astype(dtype)
