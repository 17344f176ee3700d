"""Image metrics (PSNR/SSIM on the Y channel), the progress line and the metrics log.

PSNR and SSIM are :mod:`flax_attn.sr_metrics`' (the super-resolution benchmark convention of
A2N/EDSR), re-exported here for the training tasks.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flax_attn.sr_metrics import psnr_y, rgb_to_y, ssim_y

__all__ = ["MetricsWriter", "Progress", "psnr_y", "rgb_to_y", "ssim_y"]


class Progress:
    """``step 120/800 (15%) | 23.4 steps/s, 1497 img/s | ETA 0:00:29 | loss 0.1234`` lines.

    On a terminal (``stream.isatty()``, or ``tty=True``) :meth:`update` also redraws a bar with the
    rate and ETA in place (``\\r``, at most ten times a second) between the logged lines; in a log
    file or a pipe it writes nothing, so non-interactive logs hold only the ``log_every`` lines.
    """

    bar_width = 24

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0, stream=None, *, tty: bool | None = None):
        self.total, self.batch = total_steps, batch_size
        self.stream = stream or sys.stdout
        self._t0, self._s0 = time.perf_counter(), start_step
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self._last_draw = 0.0
        self._drawn = False

    def reset(self, step: int) -> None:
        """Start the rate clock here (e.g. after the first step, which includes compilation)."""
        self._t0, self._s0 = time.perf_counter(), step

    def rate(self, step: int) -> float:
        dt = time.perf_counter() - self._t0
        return (step - self._s0) / dt if dt > 0 and step > self._s0 else float("nan")

    def line(self, step: int, metrics: dict[str, float]) -> str:
        r = self.rate(step)
        eta = (self.total - step) / r if r == r and r > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        vals = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        return (
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%) | {r:.2f} steps/s, "
            f"{r * self.batch:.0f} img/s | ETA {eta_s} | {vals}"
        )

    def _eta(self, step: int) -> str:
        r = self.rate(step)
        eta = (self.total - step) / r if r == r and r > 0 else float("nan")
        return time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"

    def bar(self, step: int) -> str:
        """``[#########...............]  120/800 23.4 steps/s ETA 00:00:29``."""
        done = int(self.bar_width * min(step, self.total) / max(self.total, 1))
        r = self.rate(step)
        rate = f"{r:.2f} steps/s" if r == r else "- steps/s"
        return f"[{'#' * done}{'.' * (self.bar_width - done)}] {step}/{self.total} {rate} ETA {self._eta(step)}"

    def update(self, step: int, *, force: bool = False) -> None:
        """Redraw the bar (terminals only; throttled to 10 Hz unless ``force``)."""
        if not self.tty:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.1 and step < self.total:
            return
        self._last_draw = now
        self.stream.write("\r" + self.bar(step) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the bar (terminals only), so that a line can be printed in its place."""
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False

    def print(self, step: int, metrics: dict[str, float]) -> None:
        self.clear()  # the line replaces the bar
        print(self.line(step, metrics), file=self.stream, flush=True)


class MetricsWriter:
    """Metrics as JSON lines (``metrics.jsonl``) in the workdir, plus TensorBoard when installed.

    Only process 0 writes. :meth:`truncate_after` drops lines past a resumed step, so a run that
    is killed and resumed ends with the same file as an uninterrupted one.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:  # optional: only when tensorboardX or torch's writer is importable without torch here
                from tensorboardX import SummaryWriter  # type: ignore[import-not-found]

                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            except ImportError:
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Keep the records of steps ``<= step``; drop lines torn by a kill mid-write.

        A process killed while appending leaves a partial last line (no newline, not JSON); it
        and any other line that is not a JSON record with a ``step`` are dropped. The file is
        rewritten atomically, so a kill here cannot lose the records kept.
        """
        if not self.enabled or not self.path.exists():
            return
        from flax_attn.convert.io import atomic_write_bytes

        keep, torn = [], 0
        for ln in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
            if not ln.strip():
                continue
            try:
                rec = json.loads(ln)
                rec_step = rec["step"]
                if not isinstance(rec_step, int):
                    raise TypeError(rec_step)
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if rec_step <= step:
                keep.append(ln)
        if torn:
            print(f"warning: dropped {torn} torn line(s) from {self.path}", file=sys.stderr, flush=True)
        atomic_write_bytes(self.path, "".join(ln + "\n" for ln in keep).encode())

    def write(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "kind": kind, **{k: _py(v) for k, v in metrics.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(_py(v), (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", _py(v), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _py(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    return v
