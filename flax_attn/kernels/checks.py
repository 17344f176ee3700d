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
    "check_neighborhood_args",
    "check_rank",
    "check_window_args",
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
