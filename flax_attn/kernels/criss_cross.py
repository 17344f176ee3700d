"""Fused criss-cross attention in Pallas: forward and backward, for GPU (Triton) and TPU (Mosaic).

The op (see :mod:`flax_attn.ops.criss_cross`): pixel ``(y, x)`` attends to its row ``(y, :)`` and
its column ``(:, x)`` without the centre, one softmax over both, no scaling. The kernels never write
the ``(B, H, W, H + W - 1)`` energy: the forward pass keeps logits, the joint log-sum-exp and the
weighted sum of V on chip and writes only the output and the float32 log-sum-exp per pixel; the
backward pass recomputes the probabilities from that log-sum-exp (flash-attention style) in two
kernels, one over query tiles (dQ) and one over key tiles (dK, dV).

Tiling. A grid step owns a ``(TY, TX)`` tile of pixels (``N = TY * TX``, flattened). Its keys are
the ``TY`` full rows of the tile, a ``(TY, Wp, C)`` block, and the ``TX`` full columns, a
``(Hp, TX, C)`` block. Both are flattened and multiplied with the flattened queries as plain 2-D
matmuls, ``(N, C) x (C, TY * Wp)`` and ``(N, C) x (C, Hp * TX)``, and a mask keeps, for each query,
only its own row / its own column minus the centre (and drops padding). The masked products are
wasted work (a factor ``TY`` on the row part, ``TX`` on the column part) traded for a body made of
2-D dots, elementwise math, lane reductions and iotas only, which both Pallas lowerings accept:
the Triton lowering has no batched ``dot_general`` and Mosaic is happiest with 2-D matmuls.

Shapes that do not fit the tiling are padded inside the wrapper, never rejected: on GPU every block
dimension must be a power of two (Triton), so H, W and the channels are padded to powers of two;
on TPU the last two block dimensions must be multiples of (8, 128) or the full array dimension, so
the channel blocks span the full (unpadded) channels and H, W are padded to multiples of the tile
(``TX = 16`` keeps bfloat16 sublane packing aligned when blocks are flattened). Padded keys are
masked out, padded queries are sliced off.

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


def default_block_sizes(backend: str) -> BlockSizes:
    # Triton: a 64-query tile keeps the tensor-core M dimension >= 16. Mosaic: 8 sublanes by 16 so
    # that flattening bfloat16 blocks never splits a packed (16, 128) tile.
    return BlockSizes(block_h=8, block_w=8) if backend == "triton" else BlockSizes(block_h=8, block_w=16)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    backend: str
    interpret: Any
    h: int
    w: int
    ty: int
    tx: int
    hp: int
    wp: int
    cqk_p: int
    cv_p: int


def _geometry(backend, interpret, h, w, cqk, cv, blocks: BlockSizes) -> _Geometry:
    ty, tx = blocks.block_h, blocks.block_w
    if backend == "triton":
        if ty & (ty - 1) or tx & (tx - 1):
            raise ValueError(f"{_WHERE}: Triton tiles must be powers of two, got {blocks}")
        hp, wp = max(next_pow2(h), ty), max(next_pow2(w), tx)
        # tl.dot needs every matmul dimension >= 16.
        return _Geometry(backend, interpret, h, w, ty, tx, hp, wp, max(next_pow2(cqk), 16), max(next_pow2(cv), 16))
    if ty % 8 or tx % 8:
        raise ValueError(f"{_WHERE}: Mosaic TPU tiles must be multiples of 8, got {blocks}")
    return _Geometry(backend, interpret, h, w, ty, tx, round_up(h, ty), round_up(w, tx), cqk, cv)


# --------------------------------------------------------------------------- kernel bodies


def _iotas(shape):
    return lax.broadcasted_iota(jnp.int32, shape, 0), lax.broadcasted_iota(jnp.int32, shape, 1)


def _query_tile_masks(g: _Geometry, iy, ix):
    """Masks for a query tile (rows: its N pixels) against its row keys and its column keys."""
    n = g.ty * g.tx
    qi, kr = _iotas((n, g.ty * g.wp))
    row = (qi // g.tx == kr // g.wp) & (kr % g.wp < g.w)
    qi, kc = _iotas((n, g.hp * g.tx))
    key_y = kc // g.tx
    col = (qi % g.tx == kc % g.tx) & (key_y != iy * g.ty + qi // g.tx) & (key_y < g.h)
    return row, col


def _key_tile_masks(g: _Geometry, iy, ix):
    """Masks for the queries of a key tile's rows / columns (rows) against its N keys (columns)."""
    n = g.ty * g.tx

    def key_ok(ki):
        return (iy * g.ty + ki // g.tx < g.h) & (ix * g.tx + ki % g.tx < g.w)

    qr, ki = _iotas((g.ty * g.wp, n))
    row = (qr // g.wp == ki // g.tx) & (qr % g.wp < g.w) & (iy * g.ty + qr // g.wp < g.h) & key_ok(ki)
    qc, ki = _iotas((g.hp * g.tx, n))
    q_y = qc // g.tx
    col = (
        (qc % g.tx == ki % g.tx)
        & (q_y != iy * g.ty + ki // g.tx)
        & (q_y < g.h)
        & (ix * g.tx + qc % g.tx < g.w)
        & key_ok(ki)
    )
    return row, col


def _flat(ref):
    x = ref[...]
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def _fwd_kernel(q_ref, kr_ref, kc_ref, vr_ref, vc_ref, o_ref, lse_ref, *, g: _Geometry):
    iy, ix = pl.program_id(1), pl.program_id(2)
    q, kr, kc, vr, vc = (_flat(r) for r in (q_ref, kr_ref, kc_ref, vr_ref, vc_ref))
    mask_r, mask_c = _query_tile_masks(g, iy, ix)
    s_r = jnp.where(mask_r, dot_nt(q, kr), MASK_VALUE)
    s_c = jnp.where(mask_c, dot_nt(q, kc), MASK_VALUE)
    m = jnp.maximum(jnp.max(s_r, axis=1, keepdims=True), jnp.max(s_c, axis=1, keepdims=True))
    p_r, p_c = jnp.exp(s_r - m), jnp.exp(s_c - m)
    l = jnp.sum(p_r, axis=1, keepdims=True) + jnp.sum(p_c, axis=1, keepdims=True)
    acc = dot(p_r.astype(vr.dtype), vr) + dot(p_c.astype(vc.dtype), vc)
    o_ref[...] = (acc / l).reshape(o_ref.shape).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log(l)).reshape(lse_ref.shape)


def _dq_kernel(q_ref, kr_ref, kc_ref, vr_ref, vc_ref, do_ref, lse_ref, d_ref, dq_ref, *, g: _Geometry):
    iy, ix = pl.program_id(1), pl.program_id(2)
    q, kr, kc, vr, vc, do = (_flat(r) for r in (q_ref, kr_ref, kc_ref, vr_ref, vc_ref, do_ref))
    lse, d = _flat(lse_ref), _flat(d_ref)
    mask_r, mask_c = _query_tile_masks(g, iy, ix)
    p_r = jnp.exp(jnp.where(mask_r, dot_nt(q, kr), MASK_VALUE) - lse)
    p_c = jnp.exp(jnp.where(mask_c, dot_nt(q, kc), MASK_VALUE) - lse)
    ds_r = p_r * (dot_nt(do, vr) - d)
    ds_c = p_c * (dot_nt(do, vc) - d)
    dq = dot(ds_r.astype(kr.dtype), kr) + dot(ds_c.astype(kc.dtype), kc)
    dq_ref[...] = dq.reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(
    k_ref, v_ref, qr_ref, qc_ref, dor_ref, doc_ref, lser_ref, lsec_ref, dr_ref, dc_ref, dk_ref, dv_ref, *, g: _Geometry
):
    iy, ix = pl.program_id(1), pl.program_id(2)
    k, v, qr, qc, do_r, do_c = (_flat(r) for r in (k_ref, v_ref, qr_ref, qc_ref, dor_ref, doc_ref))
    lse_r, lse_c, d_r, d_c = (_flat(r) for r in (lser_ref, lsec_ref, dr_ref, dc_ref))
    mask_r, mask_c = _key_tile_masks(g, iy, ix)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for mask, qq, do, lse, d in ((mask_r, qr, do_r, lse_r, d_r), (mask_c, qc, do_c, lse_c, d_c)):
        # (queries, keys) orientation: the statistics are per-query column vectors.
        p = jnp.exp(jnp.where(mask, dot_nt(qq, k), MASK_VALUE) - lse)
        ds = p * (dot_nt(do, v) - d)
        dv = dv + dot(p.T.astype(do.dtype), do)
        dk = dk + dot(ds.T.astype(qq.dtype), qq)
    dk_ref[...] = dk.reshape(dk_ref.shape).astype(dk_ref.dtype)
    dv_ref[...] = dv.reshape(dv_ref.shape).astype(dv_ref.dtype)


# --------------------------------------------------------------------------- pallas_call plumbing


def _specs(g: _Geometry, c: int):
    """BlockSpecs of a (B, Hp, Wp, c) array: the pixel tile, its rows and its columns."""
    sq = pl.squeezed
    tile = pl.BlockSpec((sq, g.ty, g.tx, c), lambda b, i, j: (b, i, j, 0))
    rows = pl.BlockSpec((sq, g.ty, g.wp, c), lambda b, i, j: (b, i, 0, 0))
    cols = pl.BlockSpec((sq, g.hp, g.tx, c), lambda b, i, j: (b, 0, j, 0))
    return tile, rows, cols


def _call(kernel, g: _Geometry, batch: int, in_specs, out_specs, out_shape, *args):
    grid = (batch, g.hp // g.ty, g.wp // g.tx)
    params = compiler_params(g.backend, 3)
    return pl.pallas_call(
        functools.partial(kernel, g=g),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=g.interpret,
    )(*args)


def _pad(x, g: _Geometry, c: int):
    b, h, w, cx = x.shape
    if (h, w, cx) == (g.hp, g.wp, c):
        return x
    return jnp.pad(x, ((0, 0), (0, g.hp - h), (0, g.wp - w), (0, c - cx)))


def _forward(q, k, v, g: _Geometry):
    b = q.shape[0]
    qp, kp, vp = _pad(q, g, g.cqk_p), _pad(k, g, g.cqk_p), _pad(v, g, g.cv_p)
    q_tile, k_rows, k_cols = _specs(g, g.cqk_p)
    v_tile, v_rows, v_cols = _specs(g, g.cv_p)
    s_tile = _specs(g, 1)[0]
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    out, lse = _call(
        _fwd_kernel,
        g,
        b,
        [q_tile, k_rows, k_cols, v_rows, v_cols],
        [v_tile, s_tile],
        [
            jax.ShapeDtypeStruct((b, g.hp, g.wp, g.cv_p), out_dtype),
            jax.ShapeDtypeStruct((b, g.hp, g.wp, 1), jnp.float32),
        ],
        qp,
        kp,
        kp,
        vp,
        vp,
    )
    return out, lse


def _backward(q, k, v, out_p, lse, dout, g: _Geometry):
    b, h, w, cqk = q.shape
    cv = v.shape[-1]
    qp, kp, vp = _pad(q, g, g.cqk_p), _pad(k, g, g.cqk_p), _pad(v, g, g.cv_p)
    dop = _pad(dout, g, g.cv_p)
    # D_i = dO_i . O_i, the softmax-backward correction per query (zero on padded queries).
    d = jnp.sum(dop.astype(jnp.float32) * out_p.astype(jnp.float32), axis=-1, keepdims=True)
    q_tile, q_rows, q_cols = _specs(g, g.cqk_p)
    v_tile, v_rows, v_cols = _specs(g, g.cv_p)
    s_tile, s_rows, s_cols = _specs(g, 1)
    dq = _call(
        _dq_kernel,
        g,
        b,
        [q_tile, q_rows, q_cols, v_rows, v_cols, v_tile, s_tile, s_tile],
        q_tile,
        jax.ShapeDtypeStruct(qp.shape, q.dtype),
        qp,
        kp,
        kp,
        vp,
        vp,
        dop,
        lse,
        d,
    )
    dk, dv = _call(
        _dkv_kernel,
        g,
        b,
        [q_tile, v_tile, q_rows, q_cols, v_rows, v_cols, s_rows, s_cols, s_rows, s_cols],
        [q_tile, v_tile],
        [jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        kp,
        vp,
        qp,
        qp,
        dop,
        dop,
        lse,
        lse,
        d,
        d,
    )
    return dq[:, :h, :w, :cqk], dk[:, :h, :w, :cqk], dv[:, :h, :w, :cv]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cc(q, k, v, g):
    out, _ = _forward(q, k, v, g)
    return out[:, : g.h, : g.w, : v.shape[-1]]


def _cc_fwd(q, k, v, g):
    out, lse = _forward(q, k, v, g)
    return out[:, : g.h, : g.w, : v.shape[-1]], (q, k, v, out, lse)


def _cc_bwd(g, res, dout):
    q, k, v, out, lse = res
    return _backward(q, k, v, out, lse, dout, g)


_cc.defvjp(_cc_fwd, _cc_bwd)


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
      block_sizes: ``BlockSizes(block_h=..., block_w=...)``: the pixel tile per grid step
        (default :func:`default_block_sizes`).

    Returns:
      ``(B, H, W, Cv)`` in the inputs' result dtype.
    """
    check_criss_cross_args(_WHERE, q, k, v)
    backend = resolve_backend(_WHERE, backend)
    blocks = block_sizes or BlockSizes()
    blocks.check(_WHERE, ("block_h", "block_w"))
    default = default_block_sizes(backend)
    blocks = BlockSizes(block_h=blocks.block_h or default.block_h, block_w=blocks.block_w or default.block_w)
    _, h, w, cqk = q.shape
    g = _geometry(backend, resolve_interpret(backend, interpret), h, w, cqk, v.shape[-1], blocks)
    return _cc(q, k, v, g)
