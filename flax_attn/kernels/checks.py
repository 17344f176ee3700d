"""Argument checks shared by the ops and their kernels (public: both layers import it).

Every error names the function, the argument, what was expected and what was given. The kernels
import nothing above this package, so the op-level validators live here rather than in
``flax_attn.ops``, which imports the kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "BORDERS",
    "check_criss_cross_args",
    "check_na_args",
    "check_neighborhood_args",
    "check_rank",
    "check_window_args",
    "per_axis",
]

BORDERS = ("reflect", "clamp")


def check_rank(where: str, name: str, x: Any, rank: int, layout: str) -> None:
    """Raise ``ValueError`` unless ``x`` has ``rank`` dims (``layout`` describes them, e.g. ``(B, H, W, C)``)."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != rank:
        raise ValueError(f"{where}: `{name}` must be {rank}-D {layout}, got shape {shape}")


def check_criss_cross_args(where: str, q, k, v) -> None:
    """Criss-cross attention: ``q``, ``k`` ``(B, H, W, Cqk)`` and ``v`` ``(B, H, W, Cv)``."""
    check_rank(where, "q", q, 4, "(B, H, W, Cqk)")
    check_rank(where, "k", k, 4, "(B, H, W, Cqk)")
    check_rank(where, "v", v, 4, "(B, H, W, Cv)")
    if q.shape != k.shape:
        raise ValueError(f"{where}: `q` and `k` must have the same shape (B, H, W, Cqk), got {q.shape} and {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{where}: `v` must share (B, H, W) with `q`: expected {q.shape[:3] + (v.shape[-1],)}, got {v.shape}"
        )


def _positive_int(where: str, name: str, value, what: str = "a positive int") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{where}: `{name}` must be {what}, got {value!r}")


def check_neighborhood_args(
    q, k, v, kernel_size: int, dilation: int, stride: int, border: str, where: str = "neighborhood_attention"
) -> None:
    """Neighbourhood attention (see :func:`flax_attn.ops.neighborhood_attention`); raises ``ValueError``."""
    layout = "(batch, height, width, heads, head_dim)"
    check_rank(where, "q", q, 5, layout)
    check_rank(where, "k", k, 5, layout)
    check_rank(where, "v", v, 5, layout)
    if border not in BORDERS:
        raise ValueError(f"{where}: `border` must be one of {BORDERS}, got {border!r}")
    _positive_int(where, "kernel_size", kernel_size, "a positive odd int (the window is centred)")
    if kernel_size % 2 == 0:
        raise ValueError(
            f"{where}: `kernel_size` must be a positive odd int (the window is centred), got {kernel_size!r}"
        )
    _positive_int(where, "dilation", dilation)
    _positive_int(where, "stride", stride)
    if k.shape != v.shape:
        raise ValueError(f"{where}: `k` and `v` must have the same shape, got k {k.shape} and v {v.shape}")
    b, h, w, heads, d = k.shape
    hq, wq = -(-h // stride), -(-w // stride)
    if q.shape != (b, hq, wq, heads, d):
        raise ValueError(
            f"{where}: `q` must have shape {(b, hq, wq, heads, d)} for keys of shape {k.shape} and "
            f"stride {stride} (batch, ceil(H/stride), ceil(W/stride), heads, head_dim), got {q.shape}"
        )
    if border == "reflect":
        pad = (kernel_size // 2) * dilation
        if pad >= h or pad >= w:
            raise ValueError(
                f"{where}: reflection padding {pad} (= (kernel_size // 2) * dilation with kernel_size="
                f"{kernel_size}, dilation={dilation}) must be smaller than the key height and width "
                f"(as torch.nn.ReflectionPad2d requires), got keys of shape {k.shape}"
            )
    else:
        span = kernel_size * dilation
        if span > h or span > w:
            raise ValueError(
                f"{where}: window kernel_size * dilation = {span} is larger than the image: "
                f"the clamp border needs it <= height and width, got keys of shape {k.shape}"
            )


def check_window_args(where: str, q, k, v, window_size: int, shift_size: int, bias_table) -> None:
    """Swin window attention (see :func:`flax_attn.ops.window_attention`); raises ``ValueError``."""
    layout = "(batch, height, width, heads, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(where, name, x, 5, layout)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{where}: q, k, v must have the same shape, got {q.shape}, {k.shape}, {v.shape}")
    h, w, heads = q.shape[1:4]
    ws = window_size
    _positive_int(where, "window_size", ws)
    if h % ws or w % ws:
        raise ValueError(
            f"{where}: height and width must be multiples of `window_size`={ws}, got input shape {q.shape}"
        )
    if not 0 <= shift_size < ws:
        raise ValueError(f"{where}: `shift_size` must be in [0, window_size={ws}), got {shift_size}")
    if bias_table is not None and bias_table.shape != ((2 * ws - 1) ** 2, heads):
        raise ValueError(f"{where}: `bias_table` must have shape {((2 * ws - 1) ** 2, heads)}, got {bias_table.shape}")


def per_axis(where: str, name: str, value, n: int, kind: type) -> tuple:
    """``value`` as an ``n``-tuple of ``kind`` (``int`` or ``bool``): a scalar is repeated, a tuple or
    list must have ``n`` entries; anything else is a ``ValueError`` naming ``name``. The ops and the
    kernels read their per-axis arguments through this one rule."""

    def ok(x):
        is_bool = isinstance(x, (bool, np.bool_))
        return is_bool if kind is bool else isinstance(x, (int, np.integer)) and not is_bool

    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(items) != n or not all(ok(x) for x in items):
        what = "bool" if kind is bool else "int"
        article = "a" if kind is bool else "an"
        raise ValueError(
            f"{where}: `{name}` must be {article} {what} or a tuple of {n} {what}s (one per spatial axis), "
            f"got {value!r}"
        )
    return tuple(kind(x) for x in items)


def check_na_args(where: str, q, k, v, kernel_size, stride, dilation, is_causal, rpb=None, key_mask=None):
    """NATTEN-style neighbourhood attention over ``n = len(kernel_size)`` spatial axes (an int
    ``kernel_size`` means 2-D). Inputs are ``(batch, *spatial, heads, head_dim)`` with q, k, v of
    one shape; NATTEN's rules: ``kernel_size >= 2``, ``stride <= kernel_size``,
    ``kernel_size * dilation <= size`` per axis; ``rpb`` ``(heads, 2*k_1 - 1, ..., 2*k_n - 1)``;
    ``key_mask`` boolean ``(batch, *spatial)``. Returns the per-axis tuples
    ``(kernel_size, stride, dilation, is_causal)``; raises ``ValueError``.
    """
    n = len(kernel_size) if isinstance(kernel_size, (tuple, list)) else 2
    layout = "(batch, " + ", ".join(f"s{i}" for i in range(1, n + 1)) + ", heads, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(where, name, x, n + 3, layout)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"{where}: `q`, `k`, `v` must have the same shape {layout}, got {q.shape}, {k.shape}, {v.shape}"
        )
    ks = per_axis(where, "kernel_size", kernel_size, n, int)
    st = per_axis(where, "stride", stride, n, int)
    dil = per_axis(where, "dilation", dilation, n, int)
    causal = per_axis(where, "is_causal", is_causal, n, bool)
    spatial = tuple(q.shape[1 : 1 + n])
    for i in range(n):
        if ks[i] < 2:
            raise ValueError(f"{where}: `kernel_size` must be >= 2 on every axis (NATTEN's rule), got {ks}")
        if dil[i] < 1 or st[i] < 1:
            raise ValueError(
                f"{where}: `dilation` and `stride` must be >= 1 on every axis, got dilation {dil}, stride {st}"
            )
        if st[i] > ks[i]:
            raise ValueError(
                f"{where}: `stride` must be <= `kernel_size` on every axis (NATTEN's rule), "
                f"got stride {st}, kernel_size {ks}"
            )
        if ks[i] * dil[i] > spatial[i]:
            raise ValueError(
                f"{where}: `kernel_size * dilation` must be <= the input size on every axis, got kernel_size {ks}, "
                f"dilation {dil} for spatial size {spatial}"
            )
    heads = q.shape[-2]
    if rpb is not None:
        want = (heads, *(2 * x - 1 for x in ks))
        shape = tuple(getattr(rpb, "shape", ()))
        if shape != want:
            raise ValueError(f"{where}: `rpb` must have shape (heads, 2*k_1 - 1, ...) = {want}, got {shape}")
    if key_mask is not None:
        want = (q.shape[0], *spatial)
        shape = tuple(getattr(key_mask, "shape", ()))
        if shape != want:
            raise ValueError(f"{where}: `key_mask` must have shape (batch, *spatial) = {want}, got {shape}")
        if np.dtype(key_mask.dtype) != np.bool_:
            raise ValueError(
                f"{where}: `key_mask` must be boolean (True = the key may be attended), got {key_mask.dtype}"
            )
    return ks, st, dil, causal
