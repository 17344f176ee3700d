"""Neighbourhood attention: every query attends to a window of keys around it, in 1, 2 or 3 dims.

One N-d XLA implementation (:func:`neighborhood_attention_nd`) driven by a static per-axis plan
(:class:`AxisPlan`) of which keys each query sees; two families of plans use it:

* :func:`na1d`, :func:`na2d`, :func:`na3d`: NATTEN 0.21's semantics (Hassani et al.,
  arXiv 2204.07143 / 2209.15001; ``natten.na1d/na2d/na3d``): kernel size, stride (queries in a
  stride group share one window), dilation and causal masking per axis; plus what NATTEN lacks,
  an additive relative positional bias (NAT/DiNAT's ``rpb``), a boolean key mask and the weights.
* :func:`neighborhood_attention`: the 2-D op with two border conventions, ``"reflect"`` (the
  window is centred on the query and positions outside the image are reflected back inside,
  ``torch.nn.ReflectionPad2d`` followed by ``nn.Unfold``, as ACmix, arXiv 2111.14556, does; a
  query near the border can see the same key twice) and ``"clamp"`` (NATTEN's rule: positions are
  split into ``dilation`` groups, ``index % dilation``; inside its group a query's window of ``k``
  keys is centred on it where possible and shifted inwards at the borders: group position ``m`` of
  a group with ``L_g`` members starts at ``clip(m - k // 2, 0, L_g - k)``), and ACmix's query
  stride (query ``i`` centred on key ``i * stride``, a smaller output).

Layout is ``(batch, *spatial, heads, head_dim)`` like :func:`jax.nn.dot_product_attention`. The
XLA path is the reference the Pallas kernels in :mod:`flax_attn.kernels.neighborhood` are tested
against. It never materialises unfolded ``(B, C * k^n, ...)`` tensors: a scan over the first
axis's window offsets cuts one slab of keys at a time out of the (padded) map (recomputed rather
than saved for the backward pass), builds ``(..., heads, k^n)`` logits, and accumulates the output
offset by offset. Every cut is a dynamic slice at the scanned offset followed by static strided
slices, and the bias is a one-hot matmul, never an index gather, so the gradient has no
scatter-add (a serial loop on XLA:CPU and TPU).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.kernels._common import MASK_VALUE
from flax_attn.kernels.checks import BORDERS, check_neighborhood_args, per_axis
from flax_attn.kernels.checks import check_na_args as _check_na_common
from flax_attn.kernels.dispatch import resolve_implementation
from flax_attn.kernels.neighborhood import neighborhood_attention_pallas

__all__ = [
    "AxisPlan",
    "centred_axis_plan",
    "check_na_args",
    "check_neighborhood_args",
    "na1d",
    "na2d",
    "na3d",
    "natten_axis_plan",
    "neighborhood_attention",
    "neighborhood_attention_nd",
    "neighborhood_indices",
]

_WHERE = "neighborhood_attention"


def _clamp_starts(length: int, kernel_size: int, dilation: int, centres: np.ndarray) -> np.ndarray:
    """NATTEN window starts for the given centre positions (see the module docstring)."""
    r = kernel_size // 2
    group = centres % dilation
    m = centres // dilation
    group_len = (length - group + dilation - 1) // dilation
    return np.clip(m - r, 0, group_len - kernel_size) * dilation + group


def neighborhood_indices(
    length: int, kernel_size: int, dilation: int = 1, stride: int = 1, border: str = "reflect"
) -> np.ndarray:
    """Key index along one axis for every (window offset, query): an int array ``(kernel_size, n_queries)``.

    Query ``i`` sits at key position ``i * stride``; ``n_queries = ceil(length / stride)``.
    """
    centres = np.arange(0, length, stride)
    t = np.arange(kernel_size)[:, None]
    if border == "reflect":
        pos = centres[None, :] + (t - kernel_size // 2) * dilation
        pos = np.where(pos < 0, -pos, pos)
        pos = np.where(pos > length - 1, 2 * (length - 1) - pos, pos)
        return pos.astype(np.int32)
    if border == "clamp":
        return (_clamp_starts(length, kernel_size, dilation, centres)[None, :] + t * dilation).astype(np.int32)
    raise ValueError(f"{_WHERE}: `border` must be one of {BORDERS}, got {border!r}")


def _arithmetic_runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """Split a static index vector into maximal runs ``(start, step, length)`` with ``step >= 0``."""
    runs, p = [], 0
    while p < len(idx):
        step = int(idx[p + 1] - idx[p]) if p + 1 < len(idx) else 1
        if step < 0:
            step = 1
            q = p + 1
        else:
            q = p + 1
            while q < len(idx) and idx[q] - idx[q - 1] == step:
                q += 1
        runs.append((int(idx[p]), step, q - p))
        p = q
    return runs


def _static_take(x: jax.Array, idx: np.ndarray, axis: int) -> jax.Array:
    """``jnp.take(x, idx, axis)`` for a static ``idx``, from strided slices and broadcasts.

    The window tables are piecewise arithmetic (one strided run for the reflect border; clamped
    runs at the borders for NATTEN's rule), so a handful of slices replaces the gather, and the
    gradient is pads and sums instead of a scatter-add.
    """
    parts = []
    for start, step, length in _arithmetic_runs(idx):
        if step == 0:
            one = jax.lax.slice_in_dim(x, start, start + 1, axis=axis)
            shape = list(one.shape)
            shape[axis] = length
            parts.append(jnp.broadcast_to(one, shape))
        else:
            parts.append(jax.lax.slice_in_dim(x, start, start + (length - 1) * step + 1, step, axis=axis))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _clamped_take(x: jax.Array, idx: np.ndarray, axis: int) -> jax.Array:
    """:func:`_static_take` for a clamped window table (a constant run, a strided run, a constant
    run) as one select over a strided slice of the zero-padded input, instead of joining
    broadcasts to a slice: XLA:CPU fuses the select into its consumer (2-D forward 1.5-3x faster
    measured side by side; on the scanned first axis it was slower, so that one keeps the join)."""
    runs = _arithmetic_runs(idx)
    if not (len(runs) == 3 and runs[0][1] == 0 and runs[2][1] == 0 and runs[1][1] >= 1):
        return _static_take(x, idx, axis)
    (first, _, n_first), (start, step, n_mid), (last, _, _) = runs
    n = len(idx)
    a = start - step * n_first  # the middle run's arithmetic sequence, extended over all n
    lo, hi = max(0, -a), max(0, a + step * (n - 1) + 1 - x.shape[axis])
    pads = [(0, 0, 0)] * x.ndim
    pads[axis] = (lo, hi, 0)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), pads) if lo or hi else x
    mid = jax.lax.slice_in_dim(xp, a + lo, a + lo + step * (n - 1) + 1, step, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = n
    i = np.arange(n).reshape(shape)
    head = jax.lax.slice_in_dim(x, first, first + 1, axis=axis)
    tail = jax.lax.slice_in_dim(x, last, last + 1, axis=axis)
    return jnp.where(i < n_first, head, jnp.where(i >= n_first + n_mid, tail, mid))


@dataclasses.dataclass(frozen=True, eq=False)
class AxisPlan:
    """Static geometry of one spatial axis: which keys every query of that axis may see.

    Queries are laid out as ``(n_blocks, block, groups)`` (query ``i = (G * block + j) * groups + g``,
    zero-padded up to ``n_blocks * block * groups``), keys as ``(key_len, groups)`` after padding the
    axis by ``key_pad`` (key ``i = u * groups + g``). Window offset ``t`` of every query in block
    ``G`` and group ``g`` reads key ``(base[G] + t * step, g)``: one dynamic offset plus static
    strided slices, never an index gather. ``valid`` (``None`` = all) says which (offset, query)
    pairs are in the query's window; ``rel`` is the key's offset from the query in window units
    (the relative-position-bias index is ``rel + kernel_size - 1``); ``shift`` is where the
    query's own ``kernel_size`` window starts among the ``n_offsets`` offsets.

    NATTEN's rule (:func:`natten_axis_plan`) uses ``groups = dilation`` and ``block = stride``:
    all queries of a stride group share one window. ACmix's centred windows
    (:func:`centred_axis_plan`) use ``groups = block = 1`` and ``step = dilation``.
    """

    length: int  # query positions on this axis (the output keeps it)
    kernel_size: int
    n_blocks: int
    block: int
    groups: int
    key_pad: tuple[int, int]
    pad_mode: str  # "constant" (padded keys are masked out) or "reflect" (they are real keys)
    key_len: int  # key positions per group after padding
    base: np.ndarray  # (n_blocks,) int
    n_offsets: int
    step: int
    valid: np.ndarray | None  # (n_offsets, n_blocks, block, groups) bool
    rel: np.ndarray | None  # (n_offsets, n_blocks, block) int
    shift: np.ndarray | None  # (n_blocks, block, groups) int in [0, n_offsets - kernel_size]

    @property
    def q_len(self) -> int:
        return self.n_blocks * self.block * self.groups


def natten_axis_plan(length: int, kernel_size: int, stride: int, dilation: int, causal: bool) -> AxisPlan:
    """NATTEN 0.21's window rule along one axis (its Flex-Attention mask, ``get_na_flex_mask``).

    Positions split into ``dilation`` groups (``i % dilation``); group ``g`` has
    ``L_g = ceil((length - g) / dilation)`` members, indexed by ``m = i // dilation``. Inside a group,
    queries form stride groups ``m // stride`` that share one window, placed by the group's leader:

    * non-causal: leader ``min(G * stride + stride // 2, L_g - 1)``; the window is the ``k`` keys
      ``[c - k // 2, c + (k - 1 - k // 2)]`` around ``c = clip(leader, k // 2, L_g - k + k // 2)``,
      i.e. it starts at ``clip(leader - k // 2, 0, L_g - k)``;
    * causal: leader ``min(G * stride + stride - 1, L_g - 1)``; query ``m`` sees keys
      ``leader - k < u <= m`` (fewer than ``k`` at the start of the axis).

    The stride groups' windows start at a piecewise-arithmetic sequence, so one union of
    ``n_offsets`` (``k``, or ``k + 1`` where the dilation groups have unequal lengths) offsets from a
    per-block base covers every query's window, and ``valid`` keeps each query's own keys.
    """
    k, s, d = kernel_size, stride, dilation
    mg = -(-length // d)
    n_blocks = -(-mg // s)
    big = np.arange(n_blocks)[:, None, None]
    j = np.arange(s)[None, :, None]
    g = np.arange(d)[None, None, :]
    m = big * s + j
    q_valid = m * d + g < length
    group_len = (length - g + d - 1) // d
    if causal:
        leader = np.minimum(big * s + s - 1, group_len - 1)
        lo = leader - k + 1
        hi = m + 0 * lo
    else:
        leader = np.minimum(big * s + s // 2, group_len - 1)
        lo = np.clip(leader - k // 2, 0, group_len - k)
        hi = lo + k - 1
    lo = np.broadcast_to(lo, q_valid.shape)
    hi = np.broadcast_to(hi, q_valid.shape)
    base = np.where(q_valid, lo, np.iinfo(np.int32).max).min(axis=(1, 2))
    n_offsets = int(np.where(q_valid, lo + k - 1 - base[:, None, None], 0).max()) + 1
    u = base[None, :, None, None] + np.arange(n_offsets)[:, None, None, None]
    valid = q_valid[None] & (u >= lo[None]) & (u <= hi[None]) & (u >= 0) & (u < group_len[None])
    pad_lo = max(0, -int(base.min()))
    key_len = max(pad_lo + int(base.max()) + n_offsets, pad_lo + mg)
    return AxisPlan(
        length=length,
        kernel_size=k,
        n_blocks=n_blocks,
        block=s,
        groups=d,
        key_pad=(pad_lo * d, key_len * d - pad_lo * d - length),
        pad_mode="constant",
        key_len=key_len,
        base=(base + pad_lo).astype(np.int64),
        n_offsets=n_offsets,
        step=1,
        valid=valid,
        rel=(u[..., 0] - m[None, ..., 0]).astype(np.int64),
        shift=np.where(q_valid, lo - base[:, None, None], 0).astype(np.int64),
    )


def centred_axis_plan(length: int, kernel_size: int, dilation: int, stride: int, border: str) -> AxisPlan:
    """The 2-D op's windows along one axis: query ``i`` centred on key ``i * stride`` (ACmix's
    strided unfold), with the reflect border (``ReflectionPad2d``) or NATTEN's clamp."""
    n_q = -(-length // stride)
    if border == "reflect":
        p = (kernel_size // 2) * dilation
        base, key_pad, mode = np.arange(n_q) * stride, (p, p), "reflect"
    else:
        base, key_pad, mode = (
            neighborhood_indices(length, kernel_size, dilation, stride, "clamp")[0],
            (0, 0),
            "constant",
        )
    return AxisPlan(
        length=n_q,
        kernel_size=kernel_size,
        n_blocks=n_q,
        block=1,
        groups=1,
        key_pad=key_pad,
        pad_mode=mode,
        key_len=length + sum(key_pad),
        base=base.astype(np.int64),
        n_offsets=kernel_size,
        step=dilation,
        valid=None,
        rel=None,
        shift=None,
    )


def _layout_queries(x, plans):
    """``(B, *L, ...)`` -> ``(B, n_1, s_1, g_1, ..., n_n, s_n, g_n, ...)`` (zero-padded)."""
    n = len(plans)
    pads = [(0, 0)] + [(0, p.q_len - p.length) for p in plans] + [(0, 0)] * (x.ndim - 1 - n)
    x = jnp.pad(x, pads)
    shape = [x.shape[0]]
    for p in plans:
        shape += [p.n_blocks, p.block, p.groups]
    return x.reshape(*shape, *x.shape[1 + n :])


def _unlayout_queries(x, plans):
    """Inverse of :func:`_layout_queries` (drops the padded queries)."""
    n = len(plans)
    x = x.reshape(x.shape[0], *(p.q_len for p in plans), *x.shape[1 + 3 * n :])
    return x[(slice(None), *(slice(0, p.length) for p in plans))]


def _layout_keys(x, plans, fill=0):
    """``(B, *L, ...)`` -> ``(B, u_1, g_1, ..., u_n, g_n, ...)``, each axis padded by its plan."""
    n = len(plans)
    for axis, p in enumerate(plans, start=1):
        pads = [(0, 0)] * x.ndim
        pads[axis] = p.key_pad
        if p.key_pad != (0, 0):
            x = jnp.pad(x, pads, mode="reflect") if p.pad_mode == "reflect" else jnp.pad(x, pads, constant_values=fill)
    shape = [x.shape[0]]
    for p in plans:
        shape += [p.key_len, p.groups]
    return x.reshape(*shape, *x.shape[1 + n :])


def _window_tile(src, plans, offsets):
    """Keys at window ``offsets`` for every query block: ``(B, n_1, 1, g_1, ..., rest)``.

    ``src`` is the laid-out keys, or (first axis) a slab of them cut at a step's first offset;
    every cut here is a static (strided) slice, so the gradient is pads, never a scatter.
    """
    for i, (p, t) in enumerate(zip(plans, offsets)):
        axis = 1 + 2 * i
        span = p.key_len - (p.n_offsets - 1) * p.step
        src = jax.lax.slice_in_dim(src, t * p.step, t * p.step + span, axis=axis)
        src = (_static_take if i == 0 else _clamped_take)(src, p.base, axis=axis)
    shape = [src.shape[0]]
    for i, p in enumerate(plans):
        shape += [p.n_blocks, 1, src.shape[2 + 2 * i]]
    return src.reshape(*shape, *src.shape[1 + 2 * len(plans) :])


def _axis_broadcast(values, plans, axis, trailing):
    """A per-axis table ``(n_offsets, n_blocks, block, groups)`` broadcast to
    ``(n_1, s_1, g_1, ..., n_n, s_n, g_n, 1 x trailing, T_1, ..., T_n)``."""
    n = len(plans)
    shape = [1] * (3 * n + trailing + n)
    p = plans[axis]
    shape[3 * axis : 3 * axis + 3] = [p.n_blocks, p.block, values.shape[-1]]
    shape[3 * n + trailing + axis] = p.n_offsets
    return np.moveaxis(values, 0, -1).reshape(shape)


def _static_mask(plans):
    """Which (query, offset) pairs are in the query's window: ``(layout..., 1, T)`` or ``None``."""
    if all(p.valid is None or p.valid.all() for p in plans):
        return None
    mask = None
    for axis, p in enumerate(plans):
        if p.valid is None:
            continue
        m = jnp.asarray(_axis_broadcast(p.valid, plans, axis, 1))
        mask = m if mask is None else mask & m
    full = [*(d for p in plans for d in (p.n_blocks, p.block, p.groups)), 1, *(p.n_offsets for p in plans)]
    mask = jnp.broadcast_to(mask, full)
    return mask.reshape(*full[: 3 * len(plans) + 1], -1)


def _rpb_logits(rpb, plans):
    """The bias ``rpb[h, rel_1 + k_1 - 1, ...]`` for every (query, offset), as one-hot matmuls
    (a table lookup would be a gather, and its gradient a scatter-add):
    ``(layout..., heads, T)`` with the group axes of size 1."""
    n = len(plans)
    letters = "abcdefghijklmnopqrstuvwxyz"
    operands, terms = [rpb.astype(jnp.float32)], ["Z" + "".join(letters[3 * i] for i in range(n))]
    out_layout, out_t = "", ""
    for i, p in enumerate(plans):
        pos, t, blk, j = letters[3 * i], "TUVWXY"[i], letters[3 * i + 1], letters[3 * i + 2]
        table = p.rel + p.kernel_size - 1
        onehot = (table[..., None] == np.arange(2 * p.kernel_size - 1)).astype(np.float32)
        terms.append(t + blk + j + pos)
        operands.append(jnp.asarray(onehot))
        out_layout += blk + j
        out_t += t
    bias = jnp.einsum(",".join(terms) + "->" + out_layout + "Z" + out_t, *operands)
    shape = []
    for p in plans:
        shape += [p.n_blocks, p.block, 1]
    return bias.reshape(*shape, rpb.shape[0], -1)


def _masked_softmax(logits, mask):
    """Softmax over the last axis where ``mask`` is True; a row with nothing unmasked is all zeros."""
    masked = jnp.where(mask, logits, MASK_VALUE)
    top = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    p = jnp.exp(masked - top) * mask
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def _window_weights(weights, plans):
    """Union-offset weights ``(B, layout..., heads, T)`` -> each query's own window
    ``(..., k_1 * ... * k_n)`` in window order (row-major over the axes; offset ``t`` of an axis is
    the ``t``-th key of the query's window there). A per-query choice among a few static slices."""
    n = len(plans)
    lead = weights.shape[: 3 * n + 2]
    w = weights.reshape(*lead, *(p.n_offsets for p in plans))
    for axis, p in enumerate(plans):
        if p.shift is None or p.n_offsets == p.kernel_size:
            continue
        t_axis = 3 * n + 2 + axis
        shape = [1] * w.ndim
        shape[1 + 3 * axis : 4 + 3 * axis] = [p.n_blocks, p.block, p.groups]
        out = jnp.zeros(())
        for sigma in range(p.n_offsets - p.kernel_size + 1):
            cut = jax.lax.slice_in_dim(w, sigma, sigma + p.kernel_size, axis=t_axis)
            out = jnp.where(jnp.asarray((p.shift == sigma).reshape(shape)), cut, out)
        w = out
    return w.reshape(*lead, -1)


def neighborhood_attention_nd(
    q, k, v, plans, *, scale, rpb=None, key_mask=None, return_weights=False, dropout_rate=0.0, dropout_rng=None
):
    """The XLA neighbourhood attention for any number of spatial axes, one :class:`AxisPlan` each.

    ``q`` is ``(B, *Lq, heads, D)`` with ``Lq[i] = plans[i].length``; ``k``, ``v`` are
    ``(B, *L, heads, D)``; ``rpb`` (``(heads, 2k_1 - 1, ...)``) is added to the scaled logits;
    ``key_mask`` ``(B, *L)`` (True = may be attended) masks keys; a query left with no key gets a
    zero output and zero weights. ``dropout_rate`` > 0 with a ``dropout_rng`` drops weights (scaled
    by ``1 / (1 - rate)``) before they weight the values; returned weights are the undropped ones.
    Logits, softmax and the weighted sum run in float32.

    A scan over the first axis's window offsets keeps one slab of keys alive at a time (recomputed,
    not saved, for the backward pass); the other axes' offsets are static slices inside it.
    """
    qf = _layout_queries(q.astype(jnp.float32) * jnp.float32(scale), plans)
    ksrc = _layout_keys(k, plans)
    vsrc = _layout_keys(v, plans)
    msrc = None if key_mask is None else _layout_keys(key_mask, plans, fill=False)
    rest = list(itertools.product(*(range(p.n_offsets) for p in plans[1:])))
    t1 = plans[0].n_offsets
    # Each scan step covers `chunk` consecutive first-axis offsets (up to 16 offsets a step in
    # all): one dynamic slice wide enough for them, then static slices. A 1-D window of 49 runs
    # as 7 steps of 7; 2-D/3-D windows already have k^(n-1) offsets a step (chunk 1). On the
    # shared CPU this measured neither faster nor slower than 49 steps of one.
    chunk = max(c for c in range(1, t1 + 1) if t1 % c == 0 and c <= max(1, 16 // len(rest)))
    steps = jnp.arange(t1 // chunk)
    inner = [(u, *r) for u in range(chunk) for r in rest]
    p0 = plans[0]
    width = p0.key_len - (p0.n_offsets - chunk) * p0.step

    def slab(src, c0):  # the first-axis keys every offset of step c0 reads
        return jax.lax.dynamic_slice_in_dim(src, c0 * chunk * p0.step, width, axis=1)

    @jax.checkpoint
    def logits_row(carry, c0):
        ks = slab(ksrc, c0)
        row = jnp.stack([jnp.sum(qf * _window_tile(ks, plans, t).astype(jnp.float32), axis=-1) for t in inner], -1)
        if msrc is None:
            return carry, (row, None)
        ms = slab(msrc, c0)
        return carry, (row, jnp.stack([_window_tile(ms, plans, t) for t in inner], -1)[..., None, :])

    _, (logits, kmask) = jax.lax.scan(logits_row, None, steps)  # (steps, layout..., heads, chunk * T_rest)
    logits = jnp.moveaxis(logits, 0, -2).reshape(*logits.shape[1:-1], -1)
    if rpb is not None:
        logits = logits + _rpb_logits(rpb, plans)
    mask = _static_mask(plans)
    if kmask is not None:
        kmask = jnp.moveaxis(kmask, 0, -2).reshape(*kmask.shape[1:-1], -1)
        mask = kmask if mask is None else mask & kmask
    weights = jax.nn.softmax(logits, axis=-1) if mask is None else _masked_softmax(logits, mask)

    used = weights
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        used = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    w_rows = jnp.moveaxis(used.reshape(*used.shape[:-1], t1 // chunk, -1), -2, 0)

    @jax.checkpoint
    def output_row(acc, xs):
        c0, wa = xs
        vs = slab(vsrc, c0)
        for i, t in enumerate(inner):
            acc = acc + wa[..., i, None] * _window_tile(vs, plans, t).astype(jnp.float32)
        return acc, None

    acc0 = jnp.zeros(qf.shape[:-1] + v.shape[-1:], jnp.float32)
    out, _ = jax.lax.scan(output_row, acc0, (steps, w_rows))
    out = _unlayout_queries(out, plans).astype(q.dtype)
    if not return_weights:
        return out
    return out, _unlayout_queries(_window_weights(weights, plans), plans).astype(q.dtype)


def check_na_args(where, n, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, key_mask):
    """Validate :func:`na1d`/:func:`na2d`/:func:`na3d`'s arguments; return the per-axis tuples.

    NATTEN 0.21's own limits (``kernel_size >= 2``, ``1 <= stride <= kernel_size``, ``dilation >= 1``,
    ``kernel_size * dilation <=`` the axis length) and the rpb/key-mask shapes are checked once, by
    :func:`flax_attn.kernels.checks.check_na_args` (shared with the Pallas kernel); this adds what
    only the ops see: the number of axes ``n`` a tuple must match, floating inputs and ``scale``.
    """
    per_axis(where, "kernel_size", kernel_size, n, int)
    ks = (kernel_size,) * n if isinstance(kernel_size, (int, np.integer)) else tuple(kernel_size)
    out = _check_na_common(where, q, k, v, ks, stride, dilation, is_causal, rpb=rpb, key_mask=key_mask)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: `{name}` must be floating point, got dtype {x.dtype}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating))):
        raise ValueError(f"{where}: `scale` must be a float or None, got {scale!r}")
    return out


def _na(
    n,
    q,
    k,
    v,
    kernel_size,
    stride,
    dilation,
    is_causal,
    scale,
    rpb,
    key_mask,
    return_weights,
    implementation,
    dropout_rate=0.0,
    dropout_rng=None,
):
    where = f"na{n}d"
    ks, st, dl, ca = check_na_args(where, n, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, key_mask)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not (
        isinstance(dropout_rate, (int, float)) and not isinstance(dropout_rate, bool) and 0.0 <= dropout_rate < 1.0
    ):
        raise ValueError(f"{where}: `dropout_rate` must be a float in [0, 1), got {dropout_rate!r}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"{where}: `dropout_rate`={dropout_rate} needs a `dropout_rng`, got None")
    allowed = ("xla", "pallas") if n == 2 else ("xla",)
    if implementation is not None and implementation not in allowed:
        raise ValueError(f"{where}: `implementation` must be one of {(None, *allowed)}, got {implementation!r}")
    if implementation is None:
        # The verified-only table: XLA unless a hardware run recorded the kernel as correct and faster.
        xla_only = n != 2 or return_weights or dropout_rate > 0.0
        implementation = "xla" if xla_only else resolve_implementation(where, "neighborhood", None)
    if implementation == "pallas":
        if return_weights or dropout_rate > 0.0:
            raise ValueError(
                f"{where}: the Pallas kernel has no weights output and no attention dropout; use implementation='xla'"
            )
        try:
            from flax_attn.kernels.neighborhood import na2d_pallas
        except ImportError:
            raise NotImplementedError(
                f"{where}: implementation='pallas' needs flax_attn.kernels.neighborhood.na2d_pallas "
                "(the 2-D kernel with NATTEN's stride, causal, rpb and key mask), which this build lacks; "
                "use implementation='xla'"
            ) from None
        return na2d_pallas(
            q,
            k,
            v,
            kernel_size=ks,
            stride=st,
            dilation=dl,
            is_causal=ca,
            scale=scale,
            rpb=rpb,
            key_mask=key_mask,
        )
    plans = [natten_axis_plan(q.shape[1 + i], ks[i], st[i], dl[i], ca[i]) for i in range(n)]
    kwargs = dict(rpb=rpb, key_mask=key_mask, return_weights=return_weights)
    return neighborhood_attention_nd(
        q, k, v, plans, scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng, **kwargs
    )


def _na_of_rank(n: int, doc: str):
    """``na{n}d``: the one signature of :func:`na1d`, :func:`na2d` and :func:`na3d`, which differ only
    in the number of spatial axes ``n`` (and their docstrings)."""

    def na(
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        kernel_size,
        stride=1,
        dilation=1,
        is_causal=False,
        scale: float | None = None,
        *,
        rpb: jax.Array | None = None,
        key_mask: jax.Array | None = None,
        return_weights: bool = False,
        implementation: str | None = None,
        dropout_rate: float = 0.0,
        dropout_rng: jax.Array | None = None,
    ):
        args = (kernel_size, stride, dilation, is_causal, scale, rpb, key_mask, return_weights, implementation)
        return _na(n, q, k, v, *args, dropout_rate=dropout_rate, dropout_rng=dropout_rng)

    na.__name__ = na.__qualname__ = f"na{n}d"
    na.__doc__ = doc
    return na


na1d = _na_of_rank(
    1,
    """1-D neighbourhood attention: :func:`na2d` on ``(batch, L, heads, head_dim)`` (no Pallas kernel).

    Example:
      >>> x = jnp.ones((2, 11, 2, 8))
      >>> na1d(x, x, x, kernel_size=3, dilation=2, is_causal=True).shape
      (2, 11, 2, 8)
    """,
)

na2d = _na_of_rank(
    2,
    """2-D neighbourhood attention with NATTEN 0.21's semantics (``natten.na2d``), plus
    relative positional bias, a key mask and the attention weights.

    Every query attends to a ``kernel_size`` window of keys (per axis) chosen by NATTEN's rule
    (:func:`natten_axis_plan`): dilation groups ``i % dilation``, stride groups sharing one
    window, windows shifted inwards at the borders, causal windows ending at the query.

    Args:
      q, k, v: ``(batch, H, W, heads, head_dim)``, floating point, all the same shape.
      kernel_size: window size, an int or one per axis (``>= 2``; even sizes put the extra key on
        the left, as NATTEN).
      stride: queries in a stride group of ``stride`` consecutive positions (in their dilation
        group) share one window, placed by the group's leader; the output keeps the input size.
        ``1 <= stride <= kernel_size``.
      dilation: spacing between a window's keys; ``kernel_size * dilation <=`` the axis length.
      is_causal: per axis, the window ends at the query (keys ``leader - kernel_size < u <= query``).
      scale: logit scale; default ``head_dim ** -0.5``.
      rpb: relative positional bias ``(heads, 2*k_1 - 1, ...)`` added to the scaled logits, indexed
        as NAT/DiNAT do: ``rpb[h, (key_1 - query_1) / dilation_1 + k_1 - 1, ...]`` (NATTEN dropped it
        in 0.20). Differentiable.
      key_mask: optional boolean ``(batch, H, W)``, True where a key may be attended (padding
        masks). The windows do not move around masked keys; a query whose whole window is masked
        gets a zero output, zero weights and zero gradients.
      return_weights: also return the weights ``(batch, H, W, heads, k_1 * ... * k_n)``, each
        query's window in row-major order (a causal window's ``t``-th entry is key
        ``leader - k + 1 + t``; entries outside the query's keys are 0).
      dropout_rate, dropout_rng: attention dropout on the weights (NAT's ``attn_drop``), active when
        ``dropout_rate > 0``; the returned weights are the undropped ones.
      implementation: ``None`` (the verified-only table: XLA unless a hardware run recorded the
        kernel), ``"xla"`` or ``"pallas"`` (``flax_attn.kernels.neighborhood.na2d_pallas``; no weights).

    Returns:
      ``(batch, H, W, heads, head_dim)`` in ``q.dtype`` (and the weights if asked); logits,
      softmax and the weighted sum run in float32.

    Raises:
      ValueError: at trace time, naming the argument, for wrong ranks, shapes or dtypes,
        ``kernel_size < 2``, ``stride`` outside ``[1, kernel_size]``, a window
        ``kernel_size * dilation`` larger than the input, a malformed ``rpb`` or ``key_mask``.

    Example:
      >>> x = jnp.ones((2, 13, 17, 2, 8))
      >>> na2d(x, x, x, kernel_size=(3, 5), dilation=2, is_causal=(True, False)).shape
      (2, 13, 17, 2, 8)
    """,
)

na3d = _na_of_rank(
    3,
    """3-D neighbourhood attention: :func:`na2d` on ``(batch, T, H, W, heads, head_dim)`` (no Pallas kernel).

    Example:
      >>> x = jnp.ones((2, 4, 7, 9, 2, 8))
      >>> na3d(x, x, x, kernel_size=(2, 3, 3), stride=(1, 2, 3), is_causal=(True, False, False)).shape
      (2, 4, 7, 9, 2, 8)
    """,
)


def neighborhood_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kernel_size: int,
    dilation: int = 1,
    border: str = "reflect",
    stride: int = 1,
    scale: float | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
):
    """Neighbourhood attention ``softmax(q . k_window * scale) v_window`` on 2-D feature maps.

    Args:
      q: queries ``(B, Hq, Wq, heads, D)`` with ``Hq = ceil(H / stride)``, ``Wq = ceil(W / stride)``.
      k, v: keys and values ``(B, H, W, heads, D)``.
      kernel_size: window side ``k`` (odd).
      dilation: spacing between the window's keys.
      border: ``"reflect"`` (ACmix, ``ReflectionPad2d`` + ``Unfold``) or ``"clamp"`` (NATTEN).
      stride: query ``(i, j)`` is centred on key ``(i * stride, j * stride)`` (ACmix's stride-2
        unfold).
      scale: logit scale; default ``D ** -0.5`` (as SDPA and NATTEN).
      return_weights: also return the weights ``(B, Hq, Wq, heads, k * k)``, offsets in row-major
        window order (``nn.Unfold`` order: index ``dy * k + dx``).
      implementation: ``None`` (:func:`flax_attn.kernels.default_implementation`: XLA unless the
        kernel is recorded as verified on this platform; XLA whenever weights are asked for),
        ``"xla"`` or ``"pallas"`` (interpreted on CPU). The Pallas kernel does not return weights.

    Returns:
      ``(B, Hq, Wq, heads, D)`` in ``q.dtype`` (and the weights if asked). Logits, softmax and the
      weighted sum run in float32.

    Raises:
      ValueError: at trace time, for mismatched shapes, an even or non-positive ``kernel_size``,
        reflection padding ``(k // 2) * dilation`` not smaller than the image (``ReflectionPad2d``
        refuses it too), or a clamp window ``k * dilation`` larger than the image.

    Example:
      >>> x = jnp.ones((2, 13, 17, 4, 8))
      >>> neighborhood_attention(x, x, x, kernel_size=7).shape
      (2, 13, 17, 4, 8)
    """
    check_neighborhood_args(q, k, v, kernel_size, dilation, stride, border)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if implementation is None and return_weights:
        implementation = "xla"
    implementation = resolve_implementation(_WHERE, "neighborhood", implementation)
    if implementation == "pallas" and return_weights:
        raise ValueError(f"{_WHERE}: the Pallas kernel does not return weights; use implementation='xla'")
    if implementation == "pallas":
        return neighborhood_attention_pallas(
            q, k, v, kernel_size=kernel_size, dilation=dilation, stride=stride, border=border, scale=scale
        )
    _, h, w = k.shape[:3]
    plans = [centred_axis_plan(size, kernel_size, dilation, stride, border) for size in (h, w)]
    return neighborhood_attention_nd(q, k, v, plans, scale=scale, return_weights=return_weights)
