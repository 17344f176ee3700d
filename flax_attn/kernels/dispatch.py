"""Which implementation ``implementation=None`` picks: verified kernels only.

A Pallas kernel that is correct in interpret mode can still be wrong, or slower than XLA, on the
hardware it targets, and none of them has run on one yet. So the default is XLA everywhere unless
:data:`VERIFIED` holds a record of a run on that platform showing the kernel's forward pass and
gradients match the XLA reference there *and* that it is faster than the XLA path there
(``benchmarks/device_check.py`` produces both). An explicit ``implementation="pallas"`` always
runs the kernel (interpreted on CPU).
"""

from __future__ import annotations

import dataclasses

from flax_attn.kernels import _common

__all__ = ["OPS", "VERIFIED", "VerifiedRecord", "default_implementation"]

# The ops that have an alternative to their XLA reference.
OPS = ("criss_cross", "neighborhood", "window", "sdpa")
_PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class VerifiedRecord:
    """The run that verified an (op, platform) pair.

    Attributes:
      device: the device it ran on, as ``jax.devices()[0].device_kind`` names it.
      jax_version: ``jax.__version__`` of that run.
      date: ISO date of the run.
      implementation: what ``implementation=None`` then resolves to (``"pallas"``; ops with a fused
        JAX route, like ``"sdpa"``, may name it instead, e.g. ``"cudnn"``).
      results: where the run's tables are (a path under ``benchmarks/results/``).
    """

    device: str
    jax_version: str
    date: str
    implementation: str = "pallas"
    results: str = ""


# (op, platform) -> the run that verified it. Empty: no kernel has run on a GPU or TPU yet.
VERIFIED: dict[tuple[str, str], VerifiedRecord] = {}


def _platform(platform: str | None) -> str:
    if platform is None:
        return _common.local_platform()
    if platform in ("cuda", "rocm"):
        return "gpu"
    if platform not in _PLATFORMS:
        raise ValueError(f"default_implementation: `platform` must be one of {_PLATFORMS} (or None), got {platform!r}")
    return platform


def default_implementation(op: str, platform: str | None = None) -> str:
    """The implementation ``implementation=None`` runs for ``op`` on ``platform``.

    Args:
      op: ``"criss_cross"``, ``"neighborhood"``, ``"window"`` or ``"sdpa"``.
      platform: ``"cpu"``, ``"gpu"`` (``"cuda"``/``"rocm"`` accepted) or ``"tpu"``; ``None`` = the
        platform of JAX's default device.

    Returns:
      ``"xla"`` unless :data:`VERIFIED` records ``(op, platform)``, then the record's
      implementation (``"pallas"``).

    Example:
      >>> default_implementation("criss_cross", "tpu")
      'xla'
    """
    if op not in OPS:
        raise ValueError(f"default_implementation: `op` must be one of {OPS}, got {op!r}")
    record = VERIFIED.get((op, _platform(platform)))
    return "xla" if record is None else record.implementation


def resolve_implementation(where: str, op: str, implementation: str | None, allowed=("xla", "pallas")) -> str:
    """``implementation`` checked against ``(None, *allowed)``; ``None`` resolved by the table."""
    if implementation is None:
        return default_implementation(op)
    if implementation not in allowed:
        raise ValueError(f"{where}: `implementation` must be one of {(None, *allowed)}, got {implementation!r}")
    return implementation
