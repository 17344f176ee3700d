"""Fused 2-D neighbourhood attention in Pallas: forward and backward (``jax.custom_vjp``).

Implements :func:`flax_attn.ops.neighborhood_attention` (the XLA function there is the reference
these kernels are tested against) for both borders (``"reflect"``: ACmix, ``"clamp"``: NATTEN),
any odd window size (tested up to 13) and dilation.

Layout and tiling
-----------------
The wrapper moves heads next to batch, ``(B * heads, H, W, D)``, and pads the keys/values once:
reflection-padded by ``P = (k // 2) * dilation`` for ``"reflect"`` (so every window offset is a plain
shift), zero-padded by ``P = (k - 1) * dilation`` for ``"clamp"`` (the union of all clamped windows
of a query is the ``2k - 1`` shifts around it; a per-query mask keeps the ``k`` that NATTEN's rule
selects). Each program handles a tile of ``block_rows`` query rows across the full (padded) width.
A program's keys/values block is the whole padded image of its (batch, head); on TPU it is copied
into VMEM once per (batch, head) (consecutive row tiles map to the same block, so the pipeline does
not re-fetch it) and every window offset is a slice of that on-chip copy. On GPU (backend ``"triton"``, the Pallas
Triton lowering), blocks
are global-memory windows: the ``k^2`` shifted tile loads overlap, so the halo of a tile comes from
HBM once and is then served from L1/L2.

The body is one portable function: window offsets are a ``fori_loop`` over row shifts (a dynamic
offset on an untiled leading axis) and a static loop over column shifts (a static offset on the
sublane axis), with an online (flash-style) softmax across offsets in float32.

Shapes that do not fit the tiling are padded inside the wrapper, never rejected: on GPU every
loaded block dimension must be a power of two (Triton), so width and head dim are padded to powers
of two; on TPU blocks span the full width and head dim (allowed by the (8, 128) rule) and the row
tile is a multiple of 8.

Backward: ``dq`` with the query-centric loop of the forward; ``dk``/``dv`` with a key-centric loop
over the *padded* keys (key ``u`` receives from query ``u - offset``), so no program writes another
program's output (no atomics) and the reflection/clamp bookkeeping is the adjoint of the padding,
applied by XLA afterwards. Both recompute probabilities from the saved log-sum-exp.

``stride > 1`` (ACmix's strided unfold) runs the stride-1 kernel with the queries scattered onto
the full-resolution grid (zeros elsewhere) and keeps every ``stride``-th output: exact (unused
positions get zero cotangents) at ``stride^2`` times the stride-1 work.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flax_attn.kernels._common import (
    MASK_VALUE,
    BlockSizes,
    compiler_params,
    cost_estimate,
    next_pow2,
    resolve_backend,
    resolve_interpret,
    round_up,
)
from flax_attn.kernels.checks import check_neighborhood_args

__all__ = ["neighborhood_attention_pallas"]

_WHERE = "neighborhood_attention_pallas"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static geometry of one call (hashable: it is a ``custom_vjp`` non-differentiable argument)."""

    backend: str  # "triton" or "mosaic_tpu" (tiling rules), independent of where it runs
    interpret: Any
    kernel_size: int
    dilation: int
    border: str
    scale: float
    h: int
    w: int
    d: int
    block_rows: int  # query rows per forward / dq program
    block_keys: int  # padded key rows per dk/dv program
    hp: int  # padded query rows
    wp: int  # padded query width
    dp: int  # padded head dim
    pad: int  # P: halo on each side of the keys
    hk: int  # padded key rows (multiple of block_keys)
    wk: int  # padded key width

    @property
    def n_off(self) -> int:
        return self.kernel_size if self.border == "reflect" else 2 * self.kernel_size - 1


def _make_plan(backend, interpret, kernel_size, dilation, border, scale, h, w, d, block_rows=None) -> _Plan:
    pad = (kernel_size // 2) * dilation if border == "reflect" else (kernel_size - 1) * dilation
    if backend == "triton":
        wp, dp = next_pow2(w), next_pow2(d)
        wk = next_pow2(wp + 2 * pad)
        # ~4K float32 elements per live (rows, width, head_dim) tile keeps 4 warps in registers.
        budget = 4096
        th = block_rows or max(1, min(next_pow2(h), next_pow2(max(1, budget // (wp * dp)) + 1) // 2))
        tu = block_rows or max(1, min(next_pow2(h + 2 * pad), next_pow2(max(1, budget // (wk * dp)) + 1) // 2))
    else:
        # TPU: full-width/full-head-dim blocks satisfy the (8, 128) rule; row tiles are multiples of 8
        # because the (rows, width) log-sum-exp block puts rows on the sublane axis.
        wp, dp = w, d
        wk = wp + 2 * pad
        th = block_rows or 8
        tu = block_rows or 8
        if th % 8:
            raise ValueError(f"{_WHERE}: Mosaic TPU `block_sizes.block_h` must be a multiple of 8, got {th}")
    hp = round_up(h, th)
    hk = round_up(hp + 2 * pad, tu)
    return _Plan(
        backend,
        interpret,
        kernel_size,
        dilation,
        border,
        float(scale),
        h,
        w,
        d,
        th,
        tu,
        hp,
        wp,
        dp,
        pad,
        hk,
        wk,
    )


# --------------------------------------------------------------------------- in-kernel helpers


def _window_valid(plan: _Plan, x, length: int, t):
    """Clamp border: whether shift index ``t`` (key = x + t * dilation - P) is in query x's window.

    ``x`` is an int32 array of query coordinates; float arithmetic keeps it to ops that lower on
    both Triton and Mosaic (no vector integer division).
    """
    k, dil = plan.kernel_size, plan.dilation
    r = k // 2
    xf = jnp.clip(x, 0, length - 1).astype(jnp.float32)
    if dil == 1:
        m, group_len = xf, float(length)
    else:
        m = jnp.floor((xf + 0.5) / dil)
        g = xf - m * dil
        group_len = jnp.floor((length - 1 - g + 0.5) / dil) + 1.0
    start = jnp.clip(m - r, 0.0, group_len - k)
    t0 = start - m + (k - 1)
    tf = jnp.asarray(t, jnp.int32).astype(jnp.float32)
    return (tf >= t0) & (tf <= t0 + (k - 1))


def _cost(per_offset: int, positions: int, plan: _Plan, inputs, outputs):
    """Cost estimate of a call: ``per_offset`` flops per head-dim element, window offset and position."""
    offsets = plan.n_off * plan.n_off
    return cost_estimate(per_offset * positions * offsets * plan.dp, positions * offsets, inputs, outputs)


def _params(plan: _Plan):
    # Mosaic: the key-centric dk/dv kernel holds whole padded images of q, dO and their statistics
    # plus the unrolled window loop's temporaries: 18.2 MiB in float32 at [32, 56, 56, 8 x 32],
    # over v5e's default 16 MiB scoped VMEM (v5e and v6e have 128 MiB of VMEM).
    return compiler_params(plan.backend, 2, num_stages=1, vmem_limit_bytes=48 * 2**20)


# --------------------------------------------------------------------------- kernels


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, plan: _Plan):
    th, wp, dil = plan.block_rows, plan.wp, plan.dilation
    i0 = pl.program_id(1) * th
    q = q_ref[...].astype(jnp.float32) * plan.scale
    rows = i0 + jax.lax.broadcasted_iota(jnp.int32, (th, wp), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (th, wp), 1)

    def body(a, carry):
        m, l, acc = carry
        logits, values = [], []
        for b in range(plan.n_off):
            ks = k_ref[pl.ds(i0 + a * dil, th), pl.ds(b * dil, wp), :].astype(jnp.float32)
            s = jnp.sum(q * ks, axis=-1)
            if plan.border == "clamp":
                ok = _window_valid(plan, rows, plan.h, a) & _window_valid(plan, cols, plan.w, b)
                s = jnp.where(ok, s, MASK_VALUE)
            logits.append(s)
            values.append(b)
        m_new = functools.reduce(jnp.maximum, logits, m)
        alpha = jnp.exp(m - m_new)
        l = l * alpha
        acc = acc * alpha[..., None]
        for s, b in zip(logits, values):
            p = jnp.exp(s - m_new)
            l = l + p
            vs = v_ref[pl.ds(i0 + a * dil, th), pl.ds(b * dil, wp), :].astype(jnp.float32)
            acc = acc + p[..., None] * vs
        return m_new, l, acc

    init = (
        jnp.full((th, wp), MASK_VALUE, jnp.float32),
        jnp.zeros((th, wp), jnp.float32),
        jnp.zeros((th, wp, plan.dp), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, plan.n_off, body, init)
    o_ref[...] = (acc / l[..., None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan: _Plan):
    th, wp, dil = plan.block_rows, plan.wp, plan.dilation
    i0 = pl.program_id(1) * th
    q = q_ref[...].astype(jnp.float32) * plan.scale
    do = do_ref[...].astype(jnp.float32)
    lse = lse_ref[...]
    delta = delta_ref[...]
    rows = i0 + jax.lax.broadcasted_iota(jnp.int32, (th, wp), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (th, wp), 1)

    def body(a, dq):
        for b in range(plan.n_off):
            ks = k_ref[pl.ds(i0 + a * dil, th), pl.ds(b * dil, wp), :].astype(jnp.float32)
            vs = v_ref[pl.ds(i0 + a * dil, th), pl.ds(b * dil, wp), :].astype(jnp.float32)
            p = jnp.exp(jnp.sum(q * ks, axis=-1) - lse)
            if plan.border == "clamp":
                ok = _window_valid(plan, rows, plan.h, a) & _window_valid(plan, cols, plan.w, b)
                p = jnp.where(ok, p, 0.0)
            ds = p * (jnp.sum(do * vs, axis=-1) - delta)
            dq = dq + ds[..., None] * ks
        return dq

    dq = jax.lax.fori_loop(0, plan.n_off, body, jnp.zeros((th, wp, plan.dp), jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, plan: _Plan):
    tu, wk, dil, halo = plan.block_keys, plan.wk, plan.dilation, 2 * plan.pad
    u0 = pl.program_id(1) * tu
    k = k_ref[...].astype(jnp.float32)
    v = v_ref[...].astype(jnp.float32)
    # Padded-key coordinates of this tile; query x = u - shift * dilation (query arrays carry a
    # zero halo of 2P rows/cols at the top/left so the loads below never start before 0).
    urow = u0 + jax.lax.broadcasted_iota(jnp.int32, (tu, wk), 0)
    ucol = jax.lax.broadcasted_iota(jnp.int32, (tu, wk), 1)

    def body(a, carry):
        dk, dv = carry
        xr = urow - a * dil
        ok_r = (xr >= 0) & (xr < plan.h)
        if plan.border == "clamp":
            ok_r = ok_r & _window_valid(plan, xr, plan.h, a)
        for b in range(plan.n_off):
            r0, c0 = u0 + halo - a * dil, halo - b * dil
            q = q_ref[pl.ds(r0, tu), pl.ds(c0, wk), :].astype(jnp.float32) * plan.scale
            do = do_ref[pl.ds(r0, tu), pl.ds(c0, wk), :].astype(jnp.float32)
            lse = lse_ref[pl.ds(r0, tu), pl.ds(c0, wk)]
            delta = delta_ref[pl.ds(r0, tu), pl.ds(c0, wk)]
            xc = ucol - b * dil
            ok = ok_r & (xc >= 0) & (xc < plan.w)
            if plan.border == "clamp":
                ok = ok & _window_valid(plan, xc, plan.w, b)
            p = jnp.where(ok, jnp.exp(jnp.sum(q * k, axis=-1) - lse), 0.0)
            dv = dv + p[..., None] * do
            ds = p * (jnp.sum(do * v, axis=-1) - delta)
            dk = dk + ds[..., None] * q
        return dk, dv

    zeros = jnp.zeros((tu, wk, plan.dp), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, plan.n_off, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------- wrappers


def _to_bh(x):
    b, h, w, n, d = x.shape
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(b * n, h, w, d)


def _from_bh(x, b, n):
    bn, h, w, d = x.shape
    return jnp.transpose(x.reshape(b, n, h, w, d), (0, 2, 3, 1, 4))


def _pad_keys(plan: _Plan, x):
    """(BH, H, W, D) -> the padded key/value image (BH, hk, wk, dp) the kernels read."""
    p = plan.pad
    if plan.border == "reflect":
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
        lo = 0
    else:
        lo = p
    return jnp.pad(x, ((0, 0), (lo, plan.hk - x.shape[1] - lo), (lo, plan.wk - x.shape[2] - lo), (0, plan.dp - plan.d)))


def _pad_queries(plan: _Plan, x):
    return jnp.pad(x, ((0, 0), (0, plan.hp - plan.h), (0, plan.wp - plan.w), (0, plan.dp - plan.d)))


def _halo_queries(plan: _Plan, x):
    """Query-side arrays for the key-centric dk/dv kernel: a zero halo of 2P at the top/left."""
    halo = 2 * plan.pad
    rows, cols = plan.hk + halo, plan.wk + halo
    pads = [(0, 0), (halo, rows - halo - x.shape[1]), (halo, cols - halo - x.shape[2])]
    if x.ndim == 4:
        pads.append((0, plan.dp - x.shape[3]))
    return jnp.pad(x, pads)


def _forward(plan: _Plan, qb, kb, vb):
    bh = qb.shape[0]
    qp, kp, vp = _pad_queries(plan, qb), _pad_keys(plan, kb), _pad_keys(plan, vb)
    th = plan.block_rows
    tile = pl.BlockSpec((None, th, plan.wp, plan.dp), lambda i, j: (i, j, 0, 0))
    whole = pl.BlockSpec((None, plan.hk, plan.wk, plan.dp), lambda i, j: (i, 0, 0, 0))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        grid=(bh, plan.hp // th),
        in_specs=[tile, whole, whole],
        out_specs=[tile, pl.BlockSpec((None, th, plan.wp), lambda i, j: (i, j, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(qp.shape, qb.dtype),
            jax.ShapeDtypeStruct((bh, plan.hp, plan.wp), jnp.float32),
        ],
        compiler_params=_params(plan),
        interpret=plan.interpret,
        name="neighborhood_attention_fwd",
        cost_estimate=_cost(
            4,
            bh * plan.hp * plan.wp,
            plan,
            (qp, kp, vp),
            [qp, jax.ShapeDtypeStruct((bh, plan.hp, plan.wp), jnp.float32)],
        ),
    )(qp, kp, vp)
    return out[:, : plan.h, : plan.w, : plan.d], lse


def _backward(plan: _Plan, qb, kb, vb, ob, lse, dob):
    bh = qb.shape[0]
    th, tu = plan.block_rows, plan.block_keys
    delta = jnp.sum(ob.astype(jnp.float32) * dob.astype(jnp.float32), axis=-1)
    delta_p = jnp.pad(delta, ((0, 0), (0, plan.hp - plan.h), (0, plan.wp - plan.w)))
    lse_real = lse[:, : plan.h, : plan.w]
    qp, dop = _pad_queries(plan, qb), _pad_queries(plan, dob)
    kp, vp = _pad_keys(plan, kb), _pad_keys(plan, vb)

    tile = pl.BlockSpec((None, th, plan.wp, plan.dp), lambda i, j: (i, j, 0, 0))
    tile2 = pl.BlockSpec((None, th, plan.wp), lambda i, j: (i, j, 0))
    whole_k = pl.BlockSpec((None, plan.hk, plan.wk, plan.dp), lambda i, j: (i, 0, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=(bh, plan.hp // th),
        in_specs=[tile, whole_k, whole_k, tile, tile2, tile2],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(qp.shape, qb.dtype),
        compiler_params=_params(plan),
        interpret=plan.interpret,
        name="neighborhood_attention_dq",
        cost_estimate=_cost(6, bh * plan.hp * plan.wp, plan, (qp, kp, vp, dop, lse, delta_p), [qp]),
    )(qp, kp, vp, dop, lse, delta_p)

    qh, doh = _halo_queries(plan, qb), _halo_queries(plan, dob)
    lseh, deltah = _halo_queries(plan, lse_real), _halo_queries(plan, delta)
    ktile = pl.BlockSpec((None, tu, plan.wk, plan.dp), lambda i, j: (i, j, 0, 0))
    rows, cols = qh.shape[1], qh.shape[2]
    whole_q = pl.BlockSpec((None, rows, cols, plan.dp), lambda i, j: (i, 0, 0, 0))
    whole_s = pl.BlockSpec((None, rows, cols), lambda i, j: (i, 0, 0))
    dkp, dvp = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid=(bh, plan.hk // tu),
        in_specs=[ktile, ktile, whole_q, whole_q, whole_s, whole_s],
        out_specs=[ktile, ktile],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, jnp.float32)] * 2,
        compiler_params=_params(plan),
        interpret=plan.interpret,
        name="neighborhood_attention_dkv",
        cost_estimate=_cost(
            8,
            bh * plan.hk * plan.wk,
            plan,
            (kp, vp, qh, doh, lseh, deltah),
            [jax.ShapeDtypeStruct(kp.shape, jnp.float32)] * 2,
        ),
    )(kp, vp, qh, doh, lseh, deltah)

    # The padding is linear: its adjoint folds reflected/halo gradients back onto the image.
    _, pad_vjp = jax.vjp(functools.partial(_pad_keys, plan), jnp.zeros(kb.shape, jnp.float32))
    (dk,) = pad_vjp(dkp)
    (dv,) = pad_vjp(dvp)
    return dq[:, : plan.h, : plan.w, : plan.d], dk.astype(kb.dtype), dv.astype(vb.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _na_bh(plan: _Plan, qb, kb, vb):
    return _forward(plan, qb, kb, vb)[0]


def _na_bh_fwd(plan, qb, kb, vb):
    out, lse = _forward(plan, qb, kb, vb)
    return out, (qb, kb, vb, out, lse)


def _na_bh_bwd(plan, res, dout):
    qb, kb, vb, out, lse = res
    return _backward(plan, qb, kb, vb, out, lse, dout)


_na_bh.defvjp(_na_bh_fwd, _na_bh_bwd)


def neighborhood_attention_pallas(
    q,
    k,
    v,
    *,
    kernel_size: int,
    dilation: int = 1,
    stride: int = 1,
    border: str = "reflect",
    scale: float | None = None,
    backend: str | None = None,
    interpret: Any = None,
    block_sizes: BlockSizes | None = None,
):
    """Pallas neighbourhood attention: arguments and result of :func:`flax_attn.ops.neighborhood_attention`.

    Differentiable (custom VJP with fused backward kernels). The kernel contract shared with
    :mod:`flax_attn.kernels.criss_cross` and :mod:`flax_attn.kernels.window`:

    Args:
      backend: ``"triton"`` (GPU) or ``"mosaic_tpu"`` (TPU): the tiling rules; default: the local
        platform's lowering (Triton rules on CPU, where only interpret mode runs).
      interpret: run in the Pallas interpreter; ``None`` = exactly when the local platform has no
        Pallas lowering (CPU). For ``"mosaic_tpu"``, ``True`` is TPU interpret mode with race
        detection; an ``InterpretParams`` is passed through.
      block_sizes: ``BlockSizes(block_h=...)``: query rows per program (and padded key rows per
        dk/dv program); default per backend.
    """
    check_neighborhood_args(q, k, v, kernel_size, dilation, stride, border, where=_WHERE)
    backend = resolve_backend(_WHERE, backend)
    blocks = block_sizes or BlockSizes()
    blocks.check(_WHERE, ("block_h",))
    b, h, w, n, d = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    plan = _make_plan(
        backend, resolve_interpret(backend, interpret), kernel_size, dilation, border, scale, h, w, d, blocks.block_h
    )
    if stride > 1:
        q = jnp.zeros(k.shape, q.dtype).at[:, ::stride, ::stride].set(q)
    out = _from_bh(_na_bh(plan, _to_bh(q), _to_bh(k), _to_bh(v)), b, n)
    if stride > 1:
        out = out[:, ::stride, ::stride]
    return out
