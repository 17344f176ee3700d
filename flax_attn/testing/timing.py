"""Wall-clock timing and XLA memory figures, shared by every script in ``benchmarks/``.

One way to time things, so that the tables of different scripts compare: the median of
``repeats`` calls after ``warmup`` calls (which also compile), each call made synchronous
(``jax.block_until_ready``; ``torch.cuda.synchronize`` on CUDA). Peak memory is what XLA's
``memory_analysis()`` reports for a compiled function: arguments + outputs + temporaries, minus
aliased (donated) bytes. Torch is imported only by :func:`time_torch` and :func:`environment`.

Example:
  >>> import jax.numpy as jnp
  >>> seconds = time_jax(jnp.sin, jnp.ones(8), repeats=3)
  >>> seconds > 0
  True
  >>> compiled_bytes(jax.jit(jnp.sin).lower(jnp.ones(8)).compile()) > 0
  True
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

__all__ = [
    "compiled_bytes",
    "compiled_mib",
    "cuda_torch",
    "environment",
    "format_mib",
    "markdown_head",
    "median_ms",
    "median_seconds",
    "peak_memory_bytes",
    "roofline_row",
    "time_jax",
    "time_torch",
    "timing_text",
    "write_report",
]


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones; ``fn``
    must only return once its work is done."""
    if repeats < 1:
        raise ValueError(f"median_seconds: `repeats` must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """:func:`median_seconds` in milliseconds."""
    return 1e3 * median_seconds(fn, repeats, warmup)


def time_jax(fn: Callable[..., Any], *args, repeats: int = 20, warmup: int = 1) -> float:
    """Median seconds of ``fn(*args)`` (a jitted function, say), blocking on its outputs."""
    return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats, warmup)


def time_torch(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds of ``fn()`` running PyTorch on ``device`` (``"cpu"`` or ``"cuda"``, which is
    synchronised after every call)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"time_torch: `device` must be 'cpu' or 'cuda', got {device!r}")
    sync = None
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize

    def call():
        fn()
        if sync is not None:
            sync()

    return median_seconds(call, repeats, warmup)


def compiled_bytes(compiled) -> int | None:
    """Peak bytes of a compiled XLA executable (``jax.jit(f).lower(...).compile()``), ``None`` where
    the backend has no memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def compiled_mib(compiled) -> float | None:
    """:func:`compiled_bytes` in MiB."""
    nbytes = compiled_bytes(compiled)
    return None if nbytes is None else nbytes / 2**20


def peak_memory_bytes(fn: Callable[..., Any], *args) -> int | None:
    """:func:`compiled_bytes` of ``jax.jit(fn)`` compiled for ``args`` (arrays or ShapeDtypeStructs)."""
    return compiled_bytes(jax.jit(fn).lower(*args).compile())


def format_mib(nbytes: int | None) -> str:
    """``nbytes`` as a right-aligned MiB figure for a table (``"n/a"`` where unknown)."""
    return "n/a" if nbytes is None else f"{nbytes / 2**20:10.1f} MiB"


def roofline_row(
    name: str,
    t_fwd: float,
    t_fwd_bwd: float,
    fwd_bytes: int,
    bwd_bytes: int,
    hbm_bytes_per_s: float,
    *,
    peak_fwd: int | None = None,
    peak_fwd_bwd: int | None = None,
    name_width: int = 28,
) -> str:
    """One row of the kernel benchmarks' tables: microseconds forward and forward+backward, forward
    TB/s, and the fraction of the HBM bound reached forward and backward (``bwd = fwd+bwd - fwd``),
    then the peak memories (left blank where not given)."""
    t_bwd = max(t_fwd_bwd - t_fwd, 1e-9)
    peak_f = "" if peak_fwd is None else format_mib(peak_fwd)
    peak_fb = "" if peak_fwd_bwd is None else format_mib(peak_fwd_bwd)
    return (
        f"{name:<{name_width}}{t_fwd * 1e6:>10.0f}{t_fwd_bwd * 1e6:>12.0f}{fwd_bytes / t_fwd / 1e12:>10.2f}"
        f"{fwd_bytes / hbm_bytes_per_s / t_fwd:>10.2f}{bwd_bytes / hbm_bytes_per_s / t_bwd:>10.2f}"
        f"{peak_f:>16}{peak_fb:>16}"
    )


def write_report(title: str, command: str, text: str, out=None) -> None:
    """Print a benchmark's ``text`` and, with ``out`` (a path), write it under a heading naming the
    command that made it."""
    print("\n" + text)
    if out:
        out.write_text(f"# {title}\n\nCommand: `{command}`\n\n{text}")


def markdown_head(columns) -> list[str]:
    """The two header lines of a markdown table with these column names."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def timing_text(lines, repeats: int, note: str = "") -> str:
    """A results table's text: :func:`environment`, what was timed, the table ``lines``."""
    return f"{environment()}\n\nmilliseconds, median of {repeats}{note}\n\n" + "\n".join(lines) + "\n"


def cuda_torch():
    """``torch`` when it is installed and sees a CUDA device, else ``None`` (GPU-only torch rows)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def environment() -> str:
    """One line naming the machine and the library versions, for the head of a results table."""
    import torch

    dev = jax.devices()[0]
    return (
        f"date {datetime.date.today()}, device {dev.platform}:{dev.device_kind} ({os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}), jax {jax.__version__}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )
