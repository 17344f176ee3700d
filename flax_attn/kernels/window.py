"""Fused Swin window attention in Pallas: forward and backward, for GPU (Triton) and TPU (Mosaic).

Implements :func:`flax_attn.ops.window.window_attention` (its XLA path is the reference these kernels
are tested against): attention inside non-overlapping ``M x M`` windows, optional cyclic shift with
Swin's ``-100`` mask, and the learned relative position bias, with gradients for q, k, v and the
``((2M - 1)^2, heads)`` bias table.

Layout and tiling
-----------------
The wrapper does the cheap data movement in XLA: roll by ``-shift``, partition into windows, move
heads next to the window axis, ``(windows, heads, N, D)`` with ``N = M * M``, and pad. A grid step
``(head, tile)`` owns ``T`` consecutive windows of one head (``block_windows``) and loops over them;
per window the whole ``(N, N)`` attention fits on chip, so every step is a plain 2-D problem:
``S = Q K^T * scale + bias (+ mask)``, a float32 softmax, ``O = P V``. Only the output and the
float32 log-sum-exp per token are written; the ``(windows, heads, N, N)`` probabilities that the
XLA reference materialises (twice, with the broadcast bias) never reach HBM.

* Relative position bias: gathered once by the wrapper into a ``(heads, Np, Np)`` float32 table
  (a plain differentiable gather, so JAX's own scatter-add carries the gradient back to the
  ``((2M - 1)^2, heads)`` parameter). The grid runs heads outermost, so consecutive steps reuse the
  same bias block (TPU skips the re-fetch; on GPU it stays in L2). Padded key columns of this table
  hold a large negative value: that is how padded keys are masked, no in-kernel iota needed.
* Shift mask: Swin's mask is ``-100`` between tokens of different regions of the rolled map. Each
  window's tokens get a region code (float32, constant per call, from
  :func:`flax_attn.kernels.layout.shift_regions`); the kernel compares the
  query codes ``(Np, 1)`` with the key codes ``(1, Np)``. This costs ``2 * Np`` floats per window
  instead of an ``(Np, Np)`` mask per window.

Shapes that do not fit the tiling are padded inside the wrapper, never rejected: on GPU every block
dimension must be a power of two and ``tl.dot`` needs dimensions >= 16, so ``N`` (49 for M = 7) is
padded to 64 and the head dim (24, 32, ...) to a power of two >= 16; on TPU the last two block
dimensions are the full (padded) ``(Np, D)``, with ``Np`` a multiple of 8 (16 for 16-bit dtypes).
The number of windows is padded to a multiple of ``T`` (odd window counts are fine); padded windows
and tokens are zero, give finite statistics, and are sliced off.

Backward: one kernel per ``(head, tile)`` recomputes ``P`` from the saved log-sum-exp
(flash-attention style) and produces ``dQ``, ``dK``, ``dV`` for its windows (a window's keys only
see that window's queries, so no other program writes them: no atomics) and the tile's partial
bias gradient ``sum_windows dS``, ``(heads, tiles, Np, Np)`` float32, summed over tiles by XLA.

Precision: logits, softmax statistics and all accumulations are float32; probabilities and
``dS`` are cast to the input dtype before their matmuls (as flash attention does), so bfloat16
inputs use bfloat16 matmuls with float32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from flax_attn.kernels import window_mosaic_gpu
from flax_attn.kernels._common import (
    MASK_VALUE,
    BlockSizes,
    compiler_params,
    cost_estimate,
    dot,
    dot_nt,
    flash_vjp,
    next_pow2,
    resolve_backend,
    resolve_interpret,
    round_up,
)
from flax_attn.kernels.checks import check_window_args
from flax_attn.kernels.layout import relative_position_index, shift_regions, window_partition, window_reverse

__all__ = ["default_block_windows", "window_attention_pallas"]

_WHERE = "window_attention_pallas"
# Swin's value for tokens of different regions after the cyclic shift (not -inf: part of its semantics).
_SHIFT_MASK = -100.0


def default_block_windows(backend: str) -> int:
    """Windows per grid step: enough work per step to amortise its overhead (untuned)."""
    # Mosaic: ~0.35 us per grid step is worth amortising over 8 windows. Triton: 4 keeps the number
    # of programs (heads * windows / 4) well above the SM count at Swin sizes, while the backward's
    # partial bias gradients stay a fraction of the q/k/v size.
    return 8 if backend == "mosaic_tpu" else 4


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static geometry of one call (hashable: a ``custom_vjp`` non-differentiable argument)."""

    backend: str  # "triton" or "mosaic_tpu": tiling rules, independent of where it runs
    interpret: Any
    shifted: bool
    scale: float
    heads: int
    n: int  # tokens per window, M * M
    d: int
    np_: int  # padded tokens per window
    dp: int  # padded head dim
    t: int  # windows per grid step
    windows: int  # real windows, B * nW
    windows_p: int  # padded to a multiple of t


def _make_plan(backend, interpret, shifted, scale, heads, n, d, itemsize, windows, block_windows) -> _Plan:
    t = block_windows or default_block_windows(backend)
    if t < 1:
        raise ValueError(f"{_WHERE}: `block_sizes.block_windows` must be >= 1, got {t}")
    if backend == "triton":
        if t & (t - 1):
            raise ValueError(f"{_WHERE}: Triton `block_sizes.block_windows` must be a power of two, got {t}")
        np_, dp = max(16, next_pow2(n)), max(16, next_pow2(d))
    else:
        # Sublane multiple of the dtype's packing (8 rows of 32-bit, 16 of 16-bit), so that the
        # (T, Np, D) -> (Np, D) window slices never split a packed tile.
        np_, dp = round_up(n, 8 if itemsize >= 4 else 16), d
    return _Plan(backend, interpret, shifted, float(scale), heads, n, d, np_, dp, t, windows, round_up(windows, t))


# --------------------------------------------------------------------------- kernel bodies


def _logits(plan: _Plan, q, k, bias, codes, i):
    s = dot_nt(q, k) * plan.scale + bias
    if plan.shifted:
        cq_ref, ck_ref = codes
        s = s + jnp.where(cq_ref[i] != ck_ref[i], _SHIFT_MASK, 0.0)
    return s


def _split(plan: _Plan, refs, n_in):
    """(q, k, v, bias, [codes], extra inputs..., outputs...) -> named groups."""
    q_ref, k_ref, v_ref, bias_ref = refs[:4]
    rest = refs[4:]
    codes = None
    if plan.shifted:
        codes, rest = rest[:2], rest[2:]
    return q_ref, k_ref, v_ref, bias_ref, codes, rest[:n_in], rest[n_in:]


def _fwd_kernel(*refs, plan: _Plan):
    q_ref, k_ref, v_ref, bias_ref, codes, _, (o_ref, lse_ref) = _split(plan, refs, 0)
    bias = bias_ref[...]

    def body(i, carry):
        q, k, v = q_ref[i], k_ref[i], v_ref[i]
        s = _logits(plan, q, k, bias, codes, i)
        m = jnp.max(s, axis=1, keepdims=True)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=1, keepdims=True)
        o_ref[i] = (dot(p.astype(v.dtype), v) / l).astype(o_ref.dtype)
        lse_ref[i] = m + jnp.log(l)
        return carry

    lax.fori_loop(0, plan.t, body, 0)


def _bwd_kernel(*refs, plan: _Plan):
    q_ref, k_ref, v_ref, bias_ref, codes, (do_ref, lse_ref, delta_ref), outs = _split(plan, refs, 3)
    dq_ref, dk_ref, dv_ref, dbias_ref = outs
    bias = bias_ref[...]

    def body(i, dbias):
        q, k, v, do = q_ref[i], k_ref[i], v_ref[i], do_ref[i]
        p = jnp.exp(_logits(plan, q, k, bias, codes, i) - lse_ref[i])
        ds = p * (dot_nt(do, v) - delta_ref[i])
        dv_ref[i] = dot(p.T.astype(do.dtype), do).astype(dv_ref.dtype)
        dq_ref[i] = (dot(ds.astype(k.dtype), k) * plan.scale).astype(dq_ref.dtype)
        dk_ref[i] = (dot(ds.T.astype(q.dtype), q) * plan.scale).astype(dk_ref.dtype)
        return dbias + ds

    dbias_ref[...] = lax.fori_loop(0, plan.t, body, jnp.zeros((plan.np_, plan.np_), jnp.float32))


# --------------------------------------------------------------------------- pallas_call plumbing


def _specs(plan: _Plan):
    sq = pl.squeezed
    tile = pl.BlockSpec((plan.t, sq, plan.np_, plan.dp), lambda h, i: (i, h, 0, 0))
    stat = pl.BlockSpec((plan.t, sq, plan.np_, 1), lambda h, i: (i, h, 0, 0))
    bias = pl.BlockSpec((sq, plan.np_, plan.np_), lambda h, i: (h, 0, 0))
    codes = [
        pl.BlockSpec((plan.t, plan.np_, 1), lambda h, i: (i, 0, 0)),
        pl.BlockSpec((plan.t, 1, plan.np_), lambda h, i: (i, 0, 0)),
    ]
    return tile, stat, bias, codes if plan.shifted else []


def _call(kernel, plan: _Plan, name, in_specs, out_specs, out_shape, *args, matmuls: int = 2):
    """``matmuls``: ``(Np, Np, Dp)`` products per window and head, for the cost estimate."""
    pairs = plan.windows_p * plan.heads * plan.np_ * plan.np_
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        grid=(plan.heads, plan.windows_p // plan.t),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        # The (Np, Np) float32 logits live in registers: 8 warps once they pass 64 x 64 (window > 8).
        compiler_params=compiler_params(plan.backend, 2, num_warps=4 if plan.np_ <= 64 else 8),
        interpret=plan.interpret,
        name=name,
        cost_estimate=cost_estimate(2 * matmuls * pairs * plan.dp, pairs, args, out_shape),
    )(*args)


def _forward(plan: _Plan, q, k, v, bias, codes):
    tile, stat, bias_spec, code_specs = _specs(plan)
    return _call(
        _fwd_kernel,
        plan,
        "window_attention_fwd",
        [tile, tile, tile, bias_spec, *code_specs],
        [tile, stat],
        [
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((*q.shape[:3], 1), jnp.float32),
        ],
        q,
        k,
        v,
        bias,
        *codes,
    )


def _backward(plan: _Plan, q, k, v, bias, codes, out, lse, dout):
    tile, stat, bias_spec, code_specs = _specs(plan)
    # D_i = dO_i . O_i, the softmax-backward correction per query (zero on padded queries).
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1, keepdims=True)
    n_tiles = plan.windows_p // plan.t
    partial = pl.BlockSpec((pl.squeezed, pl.squeezed, plan.np_, plan.np_), lambda h, i: (h, i, 0, 0))
    dq, dk, dv, dbias = _call(
        _bwd_kernel,
        plan,
        "window_attention_bwd",
        [tile, tile, tile, bias_spec, *code_specs, tile, stat, stat],
        [tile, tile, tile, partial],
        [
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((plan.heads, n_tiles, plan.np_, plan.np_), jnp.float32),
        ],
        q,
        k,
        v,
        bias,
        *codes,
        dout,
        lse,
        delta,
        matmuls=5,  # Q K^T, dO V^T, P^T dO, dS K, dS^T Q
    )
    return dq, dk, dv, jnp.sum(dbias, axis=1)


# ``_wa(plan, q, k, v, bias, codes)``: differentiable in q, k, v and bias; the region codes are
# constants of the geometry.
_wa = flash_vjp(_forward, _backward)


# --------------------------------------------------------------------------- wrapper


def window_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window_size: int,
    shift_size: int = 0,
    bias_table: jax.Array | None = None,
    scale: float | None = None,
    backend: str | None = None,
    interpret: Any = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Fused window attention: arguments and result of :func:`flax_attn.ops.window.window_attention`.

    Differentiable in ``q``, ``k``, ``v`` and ``bias_table`` (custom VJP with a fused backward
    kernel). No attention dropout: the op routes dropout to its XLA path. Arguments are validated
    as by the op; call it through ``window_attention(..., implementation="pallas")`` unless testing.

    Args:
      backend: ``"triton"`` (GPU) or ``"mosaic_tpu"`` (TPU): the tiling rules; default: the local
        platform's lowering (Triton rules on CPU, where only interpret mode runs). Also
        ``"mosaic_gpu"``: the forward-only Mosaic GPU port of
        :mod:`flax_attn.kernels.window_mosaic_gpu` (16-bit inputs, compile-checked, not yet run on
        a GPU; no interpreter, so never the default).
      interpret: run in the Pallas interpreter; ``None`` = exactly when the local platform has no
        Pallas lowering (CPU). For ``"mosaic_tpu"``, ``True`` is TPU interpret mode with race
        detection; an ``InterpretParams`` is passed through.
      block_sizes: ``BlockSizes(block_windows=...)``: windows per program (default
        :func:`default_block_windows`).

    Returns:
      ``(B, H, W, heads, D)`` in the inputs' result dtype.
    """
    check_window_args(_WHERE, q, k, v, window_size, shift_size, bias_table)
    if backend == "mosaic_gpu":
        if interpret:
            raise ValueError(
                f"{_WHERE}: backend='mosaic_gpu' has no Pallas interpreter; it compiles for a GPU only "
                f"(got interpret={interpret!r})"
            )
        blocks = block_sizes or BlockSizes()
        blocks.check(_WHERE, ())
        return _mosaic_gpu(q, k, v, window_size, shift_size, bias_table, scale)
    backend = resolve_backend(_WHERE, backend)
    interpret = resolve_interpret(backend, interpret)
    blocks = block_sizes or BlockSizes()
    blocks.check(_WHERE, ("block_windows",))
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    b, h, w, heads, d = q.shape
    ws, shift = window_size, shift_size
    n, nw = ws * ws, (h // ws) * (w // ws)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    plan = _make_plan(
        backend, interpret, bool(shift), scale, heads, n, d, jnp.dtype(dtype).itemsize, b * nw, blocks.block_windows
    )
    pad_w, pad_n, pad_d = plan.windows_p - plan.windows, plan.np_ - n, plan.dp - d

    def to_windows(x):  # (B, H, W, heads, D) -> (windows_p, heads, Np, Dp)
        if shift:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
        x = jnp.swapaxes(window_partition(x, ws).reshape(b * nw, n, heads, d), 1, 2)
        return jnp.pad(x, ((0, pad_w), (0, 0), (0, pad_n), (0, pad_d)))

    if bias_table is None:
        bias = jnp.zeros((heads, n, n), jnp.float32)
    else:
        rel = bias_table.astype(jnp.float32)[relative_position_index((ws, ws)).reshape(-1)]
        bias = jnp.transpose(rel.reshape(n, n, heads), (2, 0, 1))
    key_ok = np.arange(plan.np_) < n
    bias = jnp.where(key_ok, jnp.pad(bias, ((0, 0), (0, pad_n), (0, pad_n))), MASK_VALUE)

    codes = ()
    if shift:
        c = jnp.tile(jnp.asarray(shift_regions(h, w, ws, shift)), (b, 1))
        c = jnp.pad(c, ((0, pad_w), (0, pad_n)))
        codes = (c[:, :, None], c[:, None, :])

    out = _wa(plan, to_windows(q), to_windows(k), to_windows(v), bias, codes)
    out = jnp.swapaxes(out[: plan.windows, :, :n, :d], 1, 2).reshape(b, nw, n, heads, d)
    out = window_reverse(out, ws, h, w)
    if shift:
        out = jnp.roll(out, (shift, shift), axis=(1, 2))
    return out


def _mosaic_gpu(q, k, v, window_size, shift_size, bias_table, scale):
    """The Mosaic GPU route: Swin's data movement here, the kernel in :mod:`window_mosaic_gpu`."""
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    b, h, w, heads, d = q.shape
    ws, shift = window_size, shift_size
    n, nw = ws * ws, (h // ws) * (w // ws)
    np_, dp = window_mosaic_gpu.padded_sizes(n, d, dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    def to_windows(x):  # (B, H, W, heads, D) -> (B * nW, heads, Np, Dp)
        x = x.astype(dtype)
        if shift:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
        x = jnp.swapaxes(window_partition(x, ws).reshape(b * nw, n, heads, d), 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, np_ - n), (0, dp - d)))

    bias = jnp.zeros((1, heads, n, n), jnp.float32)
    if bias_table is not None:
        rel = bias_table.astype(jnp.float32)[relative_position_index((ws, ws)).reshape(-1)]
        bias = jnp.transpose(rel.reshape(n, n, heads), (2, 0, 1))[None]
    if shift:
        regions = shift_regions(h, w, ws, shift)  # (nW, N)
        bias = bias + np.where(regions[:, :, None] != regions[:, None, :], _SHIFT_MASK, 0.0)[:, None]
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, np_ - n), (0, np_ - n)))
    bias = jnp.where(np.arange(np_) < n, bias, MASK_VALUE)  # padded keys
    out = window_mosaic_gpu.window_attention_windows(to_windows(q), to_windows(k), to_windows(v), bias, scale)
    out = jnp.swapaxes(out[:, :, :n, :d], 1, 2).reshape(b, nw, n, heads, d)
    out = window_reverse(out, ws, h, w)
    if shift:
        out = jnp.roll(out, (shift, shift), axis=(1, 2))
    return out
