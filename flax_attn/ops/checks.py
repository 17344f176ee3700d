"""Argument checks shared by ops and blocks: errors name the function, the argument and both shapes."""

from __future__ import annotations

from typing import Any

# One definition for ops, blocks and kernels: the kernels may not import flax_attn.ops.
from flax_attn.kernels.checks import check_rank

__all__ = ["check_channels", "check_divisible", "check_rank"]


def check_divisible(where: str, name: str, value: int, by_name: str, by: int) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive multiple of ``by``."""
    if by <= 0 or value % by != 0:
        raise ValueError(f"{where}: `{name}`={value} must be divisible by `{by_name}`={by}")


def check_channels(where: str, name: str, x: Any, expected: int) -> None:
    """Raise ``ValueError`` unless the last (channel) axis of ``x`` has ``expected`` entries."""
    shape = tuple(getattr(x, "shape", ()))
    if not shape or shape[-1] != expected:
        raise ValueError(f"{where}: `{name}` must have {expected} channels (last axis), got shape {shape}")
