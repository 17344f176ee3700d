"""Fused 2-D neighbourhood attention in Pallas: forward and backward (``jax.custom_vjp``).

Two entry points on one set of kernels:

* :func:`neighborhood_attention_pallas` implements :func:`flax_attn.ops.neighborhood_attention`
  (the XLA function there is the reference it is tested against) for both borders
  (``"reflect"``: ACmix, ``"clamp"``: NATTEN), any odd window size (tested up to 13) and dilation,
  with ACmix's query stride.
* :func:`na2d_pallas` has NATTEN 0.21's semantics (``natten.na2d``): per-axis kernel size
  (``>= 2``, even allowed), dilation, NATTEN's stride (queries in a stride group share one window;
  the output keeps the input size) and causality, plus what NATTEN lacks: NAT/DiNAT's relative
  positional bias ``rpb`` (with its gradient) and a boolean key mask.

Layout and tiling
-----------------
The wrapper moves heads next to batch, ``(B * heads, H, W, D)``, and pads the keys/values once
per axis: reflection-padded by ``P = (k // 2) * dilation`` for ``"reflect"`` (so every window
offset is a plain shift), zero-padded by ``P = (k - 1) * dilation`` otherwise. Along a
non-reflect axis every window a query can get under NATTEN's rule lies within ``k - 1`` group
steps of it (``stride <= kernel_size`` guarantees that with stride too), so the ``2k - 1`` shifts
around a query (``k`` on a causal axis: offsets ``<= 0`` only) are the union of all its possible
windows, and a per-query mask, computed in the kernel from the query's coordinates
(:func:`_window_valid`: dilation group, stride-group leader, clamp or causal cut), keeps the
``k`` that NATTEN's rule selects. The stride-1 non-causal case of that rule is the ``"clamp"``
border. Each program handles a tile of ``block_rows`` query rows across the full (padded) width.
A program's keys/values block is the whole padded image of its (batch, head); on TPU it is copied
into VMEM once per (batch, head) (consecutive row tiles map to the same block, so the pipeline does
not re-fetch it) and every window offset is a slice of that on-chip copy. On GPU (backend ``"triton"``, the Pallas
Triton lowering), blocks
are global-memory windows: the shifted tile loads overlap, so the halo of a tile comes from
HBM once and is then served from L1/L2.

The body is one portable function: window offsets are a ``fori_loop`` over row shifts (a dynamic
offset on an untiled leading axis) and a static loop over column shifts (a static offset on the
sublane axis), with an online (flash-style) softmax across offsets in float32.

Bias and mask. Shift ``(a, b)`` is the key offset ``(a - (k0 - 1), b - (k1 - 1))`` in
dilation-group coordinates, which is exactly NAT's bias index, so the relative positional bias is
one scalar per (head, shift): each program reads its head's ``(row shifts, column shifts)`` table
(the rows of ``rpb`` a causal axis can reach) and adds entry ``(a, b)`` to that shift's logits;
the entry is picked with masked sums, not a dynamic scalar load, so the same code lowers on
Triton and Mosaic. The key mask (one per image, shared by its heads) is padded like the keys and
sliced like them; a query whose window is fully masked gets output 0 and log-sum-exp 0, and the
backward's masks give it zero probabilities, so zero gradients.

Shapes that do not fit the tiling are padded inside the wrapper, never rejected: on GPU every
loaded block dimension must be a power of two (Triton), so width, head dim and the bias table are
padded to powers of two; on TPU blocks span the full width and head dim (allowed by the (8, 128)
rule) and the row tile is a multiple of 8.

Backward: ``dq`` with the query-centric loop of the forward; ``dk``/``dv`` with a key-centric loop
over the *padded* keys (key ``u`` receives from query ``u - offset``), so no program writes another
program's output (no atomics) and the reflection/clamp bookkeeping is the adjoint of the padding,
applied by XLA afterwards. Both recompute probabilities from the saved log-sum-exp. The bias
gradient is a reduction over queries: the ``dq`` program also sums each shift's logit gradients
over its tile into a per-program ``(row shifts, column shifts)`` partial, and XLA sums the
partials over programs and batch (again no atomics).

``stride > 1`` of :func:`neighborhood_attention_pallas` (ACmix's strided unfold, a different
thing from NATTEN's stride) runs the stride-1 kernel with the queries scattered onto the
full-resolution grid (zeros elsewhere) and keeps every ``stride``-th output: exact (unused
positions get zero cotangents) at ``stride^2`` times the stride-1 work.

Neither entry point is picked by ``implementation=None`` anywhere: that needs a hardware run
recorded in :data:`flax_attn.kernels.VERIFIED`. ``benchmarks/compile_check.py`` compiles both for
an H100 (Triton) and TPU v5e/v6e (Mosaic) without the devices.
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
    flash_vjp,
    next_pow2,
    resolve_backend,
    resolve_interpret,
    round_up,
)
from flax_attn.kernels.checks import check_na_args, check_neighborhood_args

__all__ = ["na2d_pallas", "neighborhood_attention_pallas"]

_WHERE = "neighborhood_attention_pallas"
_WHERE_NA = "na2d_pallas"


@dataclasses.dataclass(frozen=True)
class _Axis:
    """Window geometry along one spatial axis (rows or columns)."""

    size: int  # image size along the axis
    k: int  # kernel size
    dilation: int
    stride: int  # NATTEN's stride: `stride` consecutive queries (of a dilation group) share a window
    causal: bool
    border: str

    @property
    def n_off(self) -> int:
        """Shifts per axis: the window offsets (reflect) or the union of all windows around a query."""
        if self.border == "reflect" or self.causal:
            return self.k
        return 2 * self.k - 1

    @property
    def pad(self) -> int:
        """Key halo on each side: shift ``t`` reads key ``x + t * dilation - pad``."""
        return (self.k // 2) * self.dilation if self.border == "reflect" else (self.k - 1) * self.dilation

    @property
    def halo(self) -> int:
        """Query halo of the key-centric dk/dv kernel: the largest shift distance."""
        return (self.n_off - 1) * self.dilation


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static geometry of one call (hashable: it is a ``custom_vjp`` non-differentiable argument)."""

    backend: str  # "triton" or "mosaic_tpu" (tiling rules), independent of where it runs
    interpret: Any
    rows: _Axis
    cols: _Axis
    scale: float
    d: int
    heads: int
    has_bias: bool
    has_mask: bool
    block_rows: int  # query rows per forward / dq program
    block_keys: int  # padded key rows per dk/dv program
    hp: int  # padded query rows
    wp: int  # padded query width
    dp: int  # padded head dim
    hk: int  # padded key rows (multiple of block_keys)
    wk: int  # padded key width
    nbh: int  # bias table rows (row shifts, padded to a power of two for Triton)
    nbw: int  # bias table columns

    @property
    def h(self) -> int:
        return self.rows.size

    @property
    def w(self) -> int:
        return self.cols.size

    @property
    def masked(self) -> bool:
        """Whether some shifts fall outside a query's window (every border but reflect)."""
        return self.rows.border != "reflect"


def _make_plan(where, backend, interpret, rows, cols, scale, d, heads, has_bias, has_mask, block_rows=None) -> _Plan:
    h, w = rows.size, cols.size
    ph, pw = rows.pad, cols.pad
    if backend == "triton":
        wp, dp = next_pow2(w), next_pow2(d)
        wk = next_pow2(wp + 2 * pw)
        # ~4K float32 elements per live (rows, width, head_dim) tile keeps 4 warps in registers.
        budget = 4096
        th = block_rows or max(1, min(next_pow2(h), next_pow2(max(1, budget // (wp * dp)) + 1) // 2))
        tu = block_rows or max(1, min(next_pow2(h + 2 * ph), next_pow2(max(1, budget // (wk * dp)) + 1) // 2))
        nbh, nbw = next_pow2(rows.n_off), next_pow2(cols.n_off)
    else:
        # TPU: full-width/full-head-dim blocks satisfy the (8, 128) rule; row tiles are multiples of 8
        # because the (rows, width) log-sum-exp block puts rows on the sublane axis.
        wp, dp = w, d
        wk = wp + 2 * pw
        th = block_rows or 8
        tu = block_rows or 8
        nbh, nbw = rows.n_off, cols.n_off
        if th % 8:
            raise ValueError(f"{where}: Mosaic TPU `block_sizes.block_h` must be a multiple of 8, got {th}")
    hp = round_up(h, th)
    hk = round_up(hp + 2 * ph, tu)
    return _Plan(
        backend,
        interpret,
        rows,
        cols,
        float(scale),
        d,
        heads,
        has_bias,
        has_mask,
        th,
        tu,
        hp,
        wp,
        dp,
        hk,
        wk,
        nbh,
        nbw,
    )


# --------------------------------------------------------------------------- in-kernel helpers


def _window_valid(ax: _Axis, x, t):
    """Whether shift ``t`` (key ``x + t * dilation - (k - 1) * dilation``) is in query ``x``'s window.

    NATTEN's rule along one axis (its reference kernels and Flex mask): a query belongs to the
    dilation group ``x % dilation`` and attends only inside it, at group coordinate ``i = x //
    dilation`` in a group of ``n`` positions. Queries come in stride groups of ``stride``; the
    group's leader is its centre query (the right one of the two for an even stride), or its last
    one if causal, cut at ``n - 1``. Non-causal: the ``k`` keys centred on the leader, the centre
    clamped into ``[k // 2, n - 1 - (k // 2 + k % 2 - 1)]`` so the window stays inside the group.
    Causal: the keys ``j`` with ``leader - k < j <= i``. Stride 1 and no causality is the plain
    clamped window (the ``"clamp"`` border).

    ``x`` is an int32 array of query coordinates (clipped into the image, so padded queries
    behave like real ones and never see an empty window); float arithmetic keeps it to ops that
    lower on both Triton and Mosaic (no vector integer division).
    """
    k, dil, st = ax.k, ax.dilation, ax.stride
    xf = jnp.clip(x, 0, ax.size - 1).astype(jnp.float32)
    if dil == 1:
        i, n = xf, float(ax.size)
    else:
        i = jnp.floor((xf + 0.5) / dil)
        g = xf - i * dil
        n = jnp.floor((ax.size - 1 - g + 0.5) / dil) + 1.0
    first = i if st == 1 else jnp.floor((i + 0.5) / st) * st
    if ax.causal:
        leader = jnp.minimum(first + (st - 1), n - 1.0)
        lo = jnp.maximum(leader - (k - 1), 0.0)
        hi = i
    else:
        left, right = k // 2, k // 2 + (k % 2 - 1)
        leader = jnp.minimum(first + st // 2, n - 1.0)
        lo = jnp.clip(leader, left, n - 1.0 - right) - left
        hi = lo + (k - 1)
    off = jnp.asarray(t, jnp.int32).astype(jnp.float32) - (k - 1)  # key - query, in group coordinates
    return (off >= lo - i) & (off <= hi - i)


def _and(a, b):
    if a is None:
        return b
    return a if b is None else a & b


def _bias_row(tab, a):
    """Row ``a`` (dynamic) of the ``(nbh, nbw)`` bias table as a ``(1, nbw)`` value (a masked sum:
    portable where a dynamic sublane slice or a scalar load is not)."""
    ri = jax.lax.broadcasted_iota(jnp.int32, tab.shape, 0)
    return jnp.sum(jnp.where(ri == a, tab, 0.0), axis=0, keepdims=True)


def _bias_at(row, b: int):
    """Entry ``b`` of a ``(1, nbw)`` bias row as a ``(1, 1)`` value."""
    li = jax.lax.broadcasted_iota(jnp.int32, row.shape, 1)
    return jnp.sum(jnp.where(li == b, row, 0.0), axis=1, keepdims=True)


def _extras(plan: _Plan, refs):
    """Split ``(bias?, key_mask?, *outputs)`` off a kernel's trailing refs."""
    refs = list(refs)
    bias = refs.pop(0) if plan.has_bias else None
    km = refs.pop(0) if plan.has_mask else None
    return bias, km, refs


def _call(plan: _Plan, kernel, name: str, grid, in_specs, out_specs, out_shape, args, *, cost):
    """``pallas_call`` of ``kernel(plan=plan)`` on ``args``, named ``neighborhood_attention_<name>``.

    ``cost``: ``(per_offset, positions)``, the kernel's flops per head-dim element, window offset
    and position, and the positions it covers, for the call's cost estimate.
    """
    per_offset, positions = cost
    offsets = plan.rows.n_off * plan.cols.n_off
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(plan),
        interpret=plan.interpret,
        name=f"neighborhood_attention_{name}",
        cost_estimate=cost_estimate(per_offset * positions * offsets * plan.dp, positions * offsets, args, out_shape),
    )(*args)


def _params(plan: _Plan):
    # Mosaic: the key-centric dk/dv kernel holds whole padded images of q, dO and their statistics
    # plus the unrolled window loop's temporaries: 18.2 MiB in float32 at [32, 56, 56, 8 x 32],
    # over v5e's default 16 MiB scoped VMEM (v5e and v6e have 128 MiB of VMEM).
    return compiler_params(plan.backend, 2, num_stages=1, vmem_limit_bytes=48 * 2**20)


# --------------------------------------------------------------------------- kernels


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, plan: _Plan):
    bias_ref, km_ref, (o_ref, lse_ref) = _extras(plan, refs)
    th, wp = plan.block_rows, plan.wp
    dh, dw = plan.rows.dilation, plan.cols.dilation
    i0 = pl.program_id(1) * th
    q = q_ref[...].astype(jnp.float32) * plan.scale
    rows = i0 + jax.lax.broadcasted_iota(jnp.int32, (th, wp), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (th, wp), 1)
    ok_cols = [_window_valid(plan.cols, cols, b) if plan.masked else None for b in range(plan.cols.n_off)]
    tab = bias_ref[...].astype(jnp.float32) if plan.has_bias else None

    def body(a, carry):
        m, l, acc = carry
        ok_r = _window_valid(plan.rows, rows, a) if plan.masked else None
        brow = _bias_row(tab, a) if plan.has_bias else None
        logits, oks = [], []
        for b in range(plan.cols.n_off):
            ks = k_ref[pl.ds(i0 + a * dh, th), pl.ds(b * dw, wp), :].astype(jnp.float32)
            s = jnp.sum(q * ks, axis=-1)
            if brow is not None:
                s = s + _bias_at(brow, b)
            ok = _and(ok_r, ok_cols[b])
            if km_ref is not None:
                ok = _and(ok, km_ref[pl.ds(i0 + a * dh, th), pl.ds(b * dw, wp)] > 0.5)
            if ok is not None:
                s = jnp.where(ok, s, MASK_VALUE)
            logits.append(s)
            oks.append(ok)
        m_new = functools.reduce(jnp.maximum, logits, m)
        alpha = jnp.exp(m - m_new)
        l = l * alpha
        acc = acc * alpha[..., None]
        for b, (s, ok) in enumerate(zip(logits, oks)):
            p = jnp.exp(s - m_new)
            if plan.has_mask:  # a masked key can be a row's only logit so far: exp(0) = 1 there
                p = jnp.where(ok, p, 0.0)
            l = l + p
            vs = v_ref[pl.ds(i0 + a * dh, th), pl.ds(b * dw, wp), :].astype(jnp.float32)
            acc = acc + p[..., None] * vs
        return m_new, l, acc

    init = (
        jnp.full((th, wp), MASK_VALUE, jnp.float32),
        jnp.zeros((th, wp), jnp.float32),
        jnp.zeros((th, wp, plan.dp), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, plan.rows.n_off, body, init)
    if plan.has_mask:
        # A query whose whole window is masked: output 0 (acc is 0) and log-sum-exp 0; the
        # backward's window mask then gives it zero probabilities, hence zero gradients.
        nonempty = l > 0.0
        l = jnp.where(nonempty, l, 1.0)
        o_ref[...] = (acc / l[..., None]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(nonempty, m + jnp.log(l), 0.0)
    else:
        o_ref[...] = (acc / l[..., None]).astype(o_ref.dtype)
        lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: _Plan):
    bias_ref, km_ref, outs = _extras(plan, refs)
    dq_ref = outs[0]
    th, wp = plan.block_rows, plan.wp
    dh, dw = plan.rows.dilation, plan.cols.dilation
    i0 = pl.program_id(1) * th
    q = q_ref[...].astype(jnp.float32) * plan.scale
    do = do_ref[...].astype(jnp.float32)
    lse = lse_ref[...]
    delta = delta_ref[...]
    rows = i0 + jax.lax.broadcasted_iota(jnp.int32, (th, wp), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (th, wp), 1)
    ok_cols = [_window_valid(plan.cols, cols, b) if plan.masked else None for b in range(plan.cols.n_off)]
    tab = bias_ref[...].astype(jnp.float32) if plan.has_bias else None
    if plan.has_bias:
        lanes = jax.lax.broadcasted_iota(jnp.int32, (1, plan.nbw), 1)
        table_rows = jax.lax.broadcasted_iota(jnp.int32, (plan.nbh, plan.nbw), 0)

    def body(a, carry):
        dq, db = carry
        ok_r = _window_valid(plan.rows, rows, a) if plan.masked else None
        brow = _bias_row(tab, a) if plan.has_bias else None
        db_row = None
        for b in range(plan.cols.n_off):
            ks = k_ref[pl.ds(i0 + a * dh, th), pl.ds(b * dw, wp), :].astype(jnp.float32)
            vs = v_ref[pl.ds(i0 + a * dh, th), pl.ds(b * dw, wp), :].astype(jnp.float32)
            s = jnp.sum(q * ks, axis=-1)
            if brow is not None:
                s = s + _bias_at(brow, b)
            p = jnp.exp(s - lse)
            ok = _and(ok_r, ok_cols[b])
            if km_ref is not None:
                ok = _and(ok, km_ref[pl.ds(i0 + a * dh, th), pl.ds(b * dw, wp)] > 0.5)
            if ok is not None:
                p = jnp.where(ok, p, 0.0)
            ds = p * (jnp.sum(do * vs, axis=-1) - delta)
            dq = dq + ds[..., None] * ks
            if plan.has_bias:
                # d(bias[a, b]) = the sum of this shift's logit gradients over the tile.
                total = jnp.sum(jnp.sum(ds, axis=1, keepdims=True), axis=0, keepdims=True)
                part = jnp.where(lanes == b, total, 0.0)
                db_row = part if db_row is None else db_row + part
        if plan.has_bias:
            db = db + jnp.where(table_rows == a, db_row, 0.0)
        return dq, db

    init = (
        jnp.zeros((th, wp, plan.dp), jnp.float32),
        jnp.zeros((plan.nbh, plan.nbw), jnp.float32) if plan.has_bias else None,
    )
    dq, db = jax.lax.fori_loop(0, plan.rows.n_off, body, init)
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)
    if plan.has_bias:
        outs[1][...] = db


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, plan: _Plan):
    bias_ref, km_ref, (dk_ref, dv_ref) = _extras(plan, refs)
    tu, wk = plan.block_keys, plan.wk
    dh, dw = plan.rows.dilation, plan.cols.dilation
    halo_h, halo_w = plan.rows.halo, plan.cols.halo
    u0 = pl.program_id(1) * tu
    k = k_ref[...].astype(jnp.float32)
    v = v_ref[...].astype(jnp.float32)
    # Padded-key coordinates of this tile; query x = u - shift * dilation (query arrays carry a
    # zero halo of the largest shift distance at the top/left so the loads below never start
    # before 0).
    urow = u0 + jax.lax.broadcasted_iota(jnp.int32, (tu, wk), 0)
    ucol = jax.lax.broadcasted_iota(jnp.int32, (tu, wk), 1)
    key_ok = km_ref[...] > 0.5 if km_ref is not None else None
    tab = bias_ref[...].astype(jnp.float32) if plan.has_bias else None

    def body(a, carry):
        dk, dv = carry
        xr = urow - a * dh
        ok_r = (xr >= 0) & (xr < plan.h)
        if plan.masked:
            ok_r = ok_r & _window_valid(plan.rows, xr, a)
        ok_r = _and(ok_r, key_ok)
        brow = _bias_row(tab, a) if plan.has_bias else None
        for b in range(plan.cols.n_off):
            r0, c0 = u0 + halo_h - a * dh, halo_w - b * dw
            q = q_ref[pl.ds(r0, tu), pl.ds(c0, wk), :].astype(jnp.float32) * plan.scale
            do = do_ref[pl.ds(r0, tu), pl.ds(c0, wk), :].astype(jnp.float32)
            lse = lse_ref[pl.ds(r0, tu), pl.ds(c0, wk)]
            delta = delta_ref[pl.ds(r0, tu), pl.ds(c0, wk)]
            xc = ucol - b * dw
            ok = ok_r & (xc >= 0) & (xc < plan.w)
            if plan.masked:
                ok = ok & _window_valid(plan.cols, xc, b)
            s = jnp.sum(q * k, axis=-1)
            if brow is not None:
                s = s + _bias_at(brow, b)
            p = jnp.where(ok, jnp.exp(s - lse), 0.0)
            dv = dv + p[..., None] * do
            ds = p * (jnp.sum(do * v, axis=-1) - delta)
            dk = dk + ds[..., None] * q
        return dk, dv

    zeros = jnp.zeros((tu, wk, plan.dp), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, plan.rows.n_off, body, (zeros, zeros))
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
    ph, pw = plan.rows.pad, plan.cols.pad
    if plan.rows.border == "reflect":
        x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode="reflect")
        lo_h = lo_w = 0
    else:
        lo_h, lo_w = ph, pw
    return jnp.pad(
        x, ((0, 0), (lo_h, plan.hk - x.shape[1] - lo_h), (lo_w, plan.wk - x.shape[2] - lo_w), (0, plan.dp - plan.d))
    )


def _pad_mask(plan: _Plan, m):
    """(B, H, W) key mask -> float32 (B, hk, wk) aligned with the padded keys (padding masked)."""
    ph, pw = plan.rows.pad, plan.cols.pad
    m = m.astype(jnp.float32)
    return jnp.pad(m, ((0, 0), (ph, plan.hk - plan.h - ph), (pw, plan.wk - plan.w - pw)))


def _pad_bias(plan: _Plan, rpb):
    """(heads, 2*k0 - 1, 2*k1 - 1) -> float32 (heads, nbh, nbw): entry [a, b] biases shift (a, b).

    Shift ``t`` is the key offset ``t - (k - 1)`` in dilation-group coordinates, which is NAT's
    bias index: a causal axis uses only its first ``k`` rows (offsets ``<= 0``).
    """
    nh, nw = plan.rows.n_off, plan.cols.n_off
    used = rpb[:, :nh, :nw].astype(jnp.float32)
    return jnp.pad(used, ((0, 0), (0, plan.nbh - nh), (0, plan.nbw - nw)))


def _pad_queries(plan: _Plan, x):
    return jnp.pad(x, ((0, 0), (0, plan.hp - plan.h), (0, plan.wp - plan.w), (0, plan.dp - plan.d)))


def _halo_queries(plan: _Plan, x):
    """Query-side arrays for the key-centric dk/dv kernel: a zero halo at the top/left."""
    hh, hw = plan.rows.halo, plan.cols.halo
    rows, cols = plan.hk + hh, plan.wk + hw
    pads = [(0, 0), (hh, rows - hh - x.shape[1]), (hw, cols - hw - x.shape[2])]
    if x.ndim == 4:
        pads.append((0, plan.dp - x.shape[3]))
    return jnp.pad(x, pads)


def _extra_inputs(plan: _Plan, rpb, km, key_tiles: bool):
    """Bias table and key mask operands with their block specs (``key_tiles``: the dk/dv grid)."""
    args, specs = [], []
    heads = plan.heads
    if plan.has_bias:
        args.append(_pad_bias(plan, rpb))
        specs.append(pl.BlockSpec((None, plan.nbh, plan.nbw), lambda i, j: (jax.lax.rem(i, heads), 0, 0)))
    if plan.has_mask:
        args.append(_pad_mask(plan, km))
        if key_tiles:
            specs.append(pl.BlockSpec((None, plan.block_keys, plan.wk), lambda i, j: (jax.lax.div(i, heads), j, 0)))
        else:
            specs.append(pl.BlockSpec((None, plan.hk, plan.wk), lambda i, j: (jax.lax.div(i, heads), 0, 0)))
    return args, specs


def _forward(plan: _Plan, qb, kb, vb, rpb, km):
    bh = qb.shape[0]
    qp, kp, vp = _pad_queries(plan, qb), _pad_keys(plan, kb), _pad_keys(plan, vb)
    extra, extra_specs = _extra_inputs(plan, rpb, km, key_tiles=False)
    th = plan.block_rows
    tile = pl.BlockSpec((None, th, plan.wp, plan.dp), lambda i, j: (i, j, 0, 0))
    whole = pl.BlockSpec((None, plan.hk, plan.wk, plan.dp), lambda i, j: (i, 0, 0, 0))
    out_shape = [
        jax.ShapeDtypeStruct(qp.shape, qb.dtype),
        jax.ShapeDtypeStruct((bh, plan.hp, plan.wp), jnp.float32),
    ]
    out, lse = _call(
        plan,
        _fwd_kernel,
        "fwd",
        (bh, plan.hp // th),
        [tile, whole, whole, *extra_specs],
        [tile, pl.BlockSpec((None, th, plan.wp), lambda i, j: (i, j, 0))],
        out_shape,
        (qp, kp, vp, *extra),
        cost=(4, bh * plan.hp * plan.wp),
    )
    return out[:, : plan.h, : plan.w, : plan.d], lse


def _backward(plan: _Plan, qb, kb, vb, rpb, km, ob, lse, dob):
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
    extra, extra_specs = _extra_inputs(plan, rpb, km, key_tiles=False)
    n_tiles = plan.hp // th
    out_specs, out_shape = [tile], [jax.ShapeDtypeStruct(qp.shape, qb.dtype)]
    if plan.has_bias:
        # Per-program partial sums of the bias gradient, reduced by XLA below (no atomics).
        out_specs.append(pl.BlockSpec((None, None, plan.nbh, plan.nbw), lambda i, j: (i, j, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((bh, n_tiles, plan.nbh, plan.nbw), jnp.float32))
    dq_out = _call(
        plan,
        _dq_kernel,
        "dq",
        (bh, n_tiles),
        [tile, whole_k, whole_k, tile, tile2, tile2, *extra_specs],
        out_specs,
        out_shape,
        (qp, kp, vp, dop, lse, delta_p, *extra),
        cost=(6, bh * plan.hp * plan.wp),
    )
    dq = dq_out[0]

    qh, doh = _halo_queries(plan, qb), _halo_queries(plan, dob)
    lseh, deltah = _halo_queries(plan, lse_real), _halo_queries(plan, delta)
    ktile = pl.BlockSpec((None, tu, plan.wk, plan.dp), lambda i, j: (i, j, 0, 0))
    rows, cols = qh.shape[1], qh.shape[2]
    whole_q = pl.BlockSpec((None, rows, cols, plan.dp), lambda i, j: (i, 0, 0, 0))
    whole_s = pl.BlockSpec((None, rows, cols), lambda i, j: (i, 0, 0))
    extra, extra_specs = _extra_inputs(plan, rpb, km, key_tiles=True)
    dkp, dvp = _call(
        plan,
        _dkv_kernel,
        "dkv",
        (bh, plan.hk // tu),
        [ktile, ktile, whole_q, whole_q, whole_s, whole_s, *extra_specs],
        [ktile, ktile],
        [jax.ShapeDtypeStruct(kp.shape, jnp.float32)] * 2,
        (kp, vp, qh, doh, lseh, deltah, *extra),
        cost=(8, bh * plan.hk * plan.wk),
    )

    # The padding is linear: its adjoint folds reflected/halo gradients back onto the image.
    _, pad_vjp = jax.vjp(functools.partial(_pad_keys, plan), jnp.zeros(kb.shape, jnp.float32))
    (dk,) = pad_vjp(dkp)
    (dv,) = pad_vjp(dvp)
    drpb = None
    if plan.has_bias:
        partial = dq_out[1].reshape(bh // plan.heads, plan.heads, n_tiles, plan.nbh, plan.nbw)
        _, bias_vjp = jax.vjp(functools.partial(_pad_bias, plan), jnp.zeros(rpb.shape, jnp.float32))
        (drpb,) = bias_vjp(jnp.sum(partial, axis=(0, 2)))
        drpb = drpb.astype(rpb.dtype)
    return dq[:, : plan.h, : plan.w, : plan.d], dk.astype(kb.dtype), dv.astype(vb.dtype), drpb


# ``_na_bh(plan, qb, kb, vb, rpb, key_mask)``: differentiable in q, k, v and rpb.
_na_bh = flash_vjp(_forward, _backward)


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
    rows = _Axis(h, kernel_size, dilation, 1, False, border)
    cols = _Axis(w, kernel_size, dilation, 1, False, border)
    interpret = resolve_interpret(backend, interpret)
    plan = _make_plan(_WHERE, backend, interpret, rows, cols, scale, d, n, False, False, blocks.block_h)
    if stride > 1:
        q = jnp.zeros(k.shape, q.dtype).at[:, ::stride, ::stride].set(q)
    out = _from_bh(_na_bh(plan, _to_bh(q), _to_bh(k), _to_bh(v), None, None), b, n)
    if stride > 1:
        out = out[:, ::stride, ::stride]
    return out


def na2d_pallas(
    q,
    k,
    v,
    *,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale: float | None = None,
    rpb=None,
    key_mask=None,
    backend: str | None = None,
    interpret: Any = None,
    block_sizes: BlockSizes | None = None,
):
    """Pallas 2-D neighbourhood attention with NATTEN's semantics (``natten.na2d`` of NATTEN 0.21),
    plus NAT/DiNAT's relative positional bias and a key mask.

    Differentiable in ``q``, ``k``, ``v`` and ``rpb`` (custom VJP with fused backward kernels).

    Args:
      q, k, v: ``(batch, height, width, heads, head_dim)``, one shape; the output has it too.
      kernel_size, stride, dilation: an int or a pair (rows, columns). NATTEN's meaning: a query
        attends to ``kernel_size`` keys per axis inside its dilation group (positions congruent
        modulo ``dilation``), the window clamped to stay inside the image; ``stride`` consecutive
        queries of a group share one window (the output keeps the input size). NATTEN's limits:
        ``2 <= kernel_size``, ``stride <= kernel_size``, ``kernel_size * dilation <= size``.
      is_causal: a bool or a pair: along a causal axis a query sees only keys at or before it.
      scale: the logit scale; ``None`` = ``head_dim ** -0.5``.
      rpb: optional additive relative positional bias ``(heads, 2*k0 - 1, 2*k1 - 1)`` in NAT's
        layout and indexing: the logit of query ``i`` and key ``j`` gets
        ``rpb[head, j0 - i0 + k0 - 1, j1 - i1 + k1 - 1]`` with coordinates counted inside the
        dilation group (NAT adds it after scaling).
      key_mask: optional boolean ``(batch, height, width)``, True where a key may be attended. A
        query whose whole window is masked outputs 0 and receives 0 gradients (and contributes
        nothing to the gradients of k, v and rpb).
      backend, interpret, block_sizes: the kernel contract of
        :func:`neighborhood_attention_pallas`.
    """
    ks, st, dil, causal = check_na_args(
        _WHERE_NA, q, k, v, kernel_size, stride, dilation, is_causal, rpb=rpb, key_mask=key_mask
    )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{_WHERE_NA}: `scale` must be a float or None (= head_dim ** -0.5), got {scale!r}")
    backend = resolve_backend(_WHERE_NA, backend)
    blocks = block_sizes or BlockSizes()
    blocks.check(_WHERE_NA, ("block_h",))
    b, h, w, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = _Axis(h, ks[0], dil[0], st[0], causal[0], "clamp")
    cols = _Axis(w, ks[1], dil[1], st[1], causal[1], "clamp")
    interpret = resolve_interpret(backend, interpret)
    plan = _make_plan(
        _WHERE_NA, backend, interpret, rows, cols, scale, d, n, rpb is not None, key_mask is not None, blocks.block_h
    )
    km = None if key_mask is None else key_mask.astype(jnp.float32)
    out = _na_bh(plan, _to_bh(q), _to_bh(k), _to_bh(v), rpb, km)
    return _from_bh(out, b, n)
