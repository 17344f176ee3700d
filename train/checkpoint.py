"""Orbax checkpoints: asynchronous saves, latest-N plus best-by-metric, resume with fallback.

Layout of ``<workdir>/checkpoints/<step>/``: ``state`` (the whole ``TrainState``: step, params,
batch statistics, optimiser state) and ``data`` (JSON: the data-iterator position and the config).
Orbax writes each step into a temporary directory and renames it only once complete, so a killed
or failed write never touches the previous checkpoint, and unfinished temporaries are ignored.

:meth:`Checkpointer.restore_latest` tries the newest step first; if it cannot be read (truncated
or missing files) it warns, moves it to ``<workdir>/corrupt/`` and falls back to the previous one.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from train.configs import CheckpointConfig

__all__ = ["Checkpointer", "CorruptCheckpointWarning"]

log = logging.getLogger(__name__)


class CorruptCheckpointWarning(UserWarning):
    """The newest checkpoint could not be restored; an older one was used."""


class Checkpointer:
    def __init__(
        self,
        workdir: str | Path,
        config: CheckpointConfig,
        *,
        best_metric: str | None = None,
        best_mode: str = "max",
    ):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.config = config
        self.best_metric = best_metric
        policies: list[Any] = [ocm.LatestN(n=max(config.max_to_keep, 1))]
        if best_metric is not None:
            if best_mode not in ("max", "min"):
                raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
            policies.append(
                ocm.BestN(
                    get_metric_fn=lambda m, k=best_metric: m[k],
                    reverse=best_mode == "min",  # BestN keeps the *last* n after sorting
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=config.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)

    # ------------------------------------------------------------------ save

    def save(
        self, step: int, state: Any, data_position: dict, *, metrics: dict[str, float] | None = None
    ) -> bool:
        """Start saving ``state`` at ``step`` (returns once arrays are copied off the devices)."""
        if step in self.manager.all_steps():
            return False
        if metrics is not None and self.best_metric is not None and self.best_metric in metrics:
            metrics = {self.best_metric: float(metrics[self.best_metric])}
        else:
            metrics = None
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
            ),
            metrics=metrics,
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------------ restore

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.best_metric else None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["data"]

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest readable checkpoint as ``(state, data)``, or ``None`` when there is none.

        Unreadable checkpoints are moved aside (``<workdir>/corrupt/<step>-<time>``) with a
        :class:`CorruptCheckpointWarning`, so later saves at those steps start clean.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data = self.restore(step, abstract_state)
                bad = [
                    p
                    for p, leaf in jax.tree_util.tree_leaves_with_path(state)
                    if hasattr(leaf, "dtype")
                    and leaf.dtype.kind == "f"
                    and not bool(jax.numpy.isfinite(leaf).all())
                ]
                if bad:
                    raise ValueError(f"non-finite values in {jax.tree_util.keystr(bad[0])}")
                return state, data
            except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
                msg = (
                    f"checkpoint at step {step} in {self.directory} cannot be restored "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); "
                    f"falling back to the previous one"
                )
                warnings.warn(msg, CorruptCheckpointWarning, stacklevel=2)
                log.warning(msg)
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.exists():
                dst = self.workdir / "corrupt" / f"{step}-{int(time.time())}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), str(dst))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine-{step}")
        self.manager.reload()
