"""Orbax checkpoints: asynchronous saves, latest-N plus best-by-metric, resume with fallback.

Layout of ``<workdir>/checkpoints/<step>/``: ``state`` (the whole ``TrainState``: step, params,
batch statistics, optimiser state) and ``data`` (JSON: the data-iterator position and the config).
Orbax writes each step into a temporary directory and renames it only once complete, so a killed
or failed write never touches the previous checkpoint, and unfinished temporaries are ignored.

Integrity: ``data`` also holds a SHA-256 digest of every array of the state (path, dtype, shape
and bytes), computed from the arrays being saved. Orbax's own files carry no checksum of the
values, so without it a flipped bit in a data file restores silently as a different number.

:meth:`Checkpointer.restore_latest` tries the newest step first. A checkpoint that cannot be read
(truncated or missing files, a digest that does not match, non-finite values) is moved to
``<workdir>/corrupt/`` with a warning and the previous one is tried. A checkpoint that reads fine
but holds a different model (other shapes or structure) is *not* damaged: it raises
:class:`CheckpointMismatchError` and nothing is moved.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from flax_attn.training.configs import CheckpointConfig

__all__ = ["CheckpointMismatchError", "Checkpointer", "CorruptCheckpointWarning", "state_digest"]

log = logging.getLogger(__name__)


class CorruptCheckpointWarning(UserWarning):
    """The newest checkpoint could not be restored; an older one was used."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint holds a state of another structure than the model being trained."""


class _IntegrityError(Exception):
    pass


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))))
    return "/".join(parts)


def _host_copy(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        # Replicated across processes: every process holds the whole array in each shard.
        return np.asarray(leaf.addressable_data(0))
    return np.asarray(jax.device_get(leaf))


def state_digest(state: Any) -> str:
    """SHA-256 over every array of ``state``: its path, dtype, shape and bytes, in tree order."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        arr = np.ascontiguousarray(_host_copy(leaf))
        h.update(f"{_path_str(path)}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _shapes(tree: Any) -> dict[str, tuple]:
    return {_path_str(p): tuple(getattr(leaf, "shape", ())) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


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
        # Handlers named up front, so item_metadata can read a step before anything is restored.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
        )

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: Any, data_position: dict, *, metrics: dict[str, float] | None = None) -> bool:
        """Start saving ``state`` at ``step`` (returns once arrays are copied off the devices)."""
        if step in self.manager.all_steps():
            return False
        if metrics is not None and self.best_metric is not None and self.best_metric in metrics:
            metrics = {self.best_metric: float(metrics[self.best_metric])}
        else:
            metrics = None
        data_position = {**data_position, "state_sha256": state_digest(state)}
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
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
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return out["state"], out["data"]

    def _check_structure(self, step: int, abstract_state: Any) -> None:
        """Raise :class:`CheckpointMismatchError` when step's metadata reads but describes other shapes."""
        try:
            meta = self.manager.item_metadata(step)["state"]
            tree = getattr(meta, "tree", meta)
        except Exception:  # unreadable metadata: the restore below decides (and quarantines)
            return
        if tree is None:
            return
        saved = _shapes(tree)
        want = _shapes(abstract_state)
        if saved != want:
            diff = sorted(set(saved) ^ set(want)) or sorted(k for k in want if saved[k] != want[k])
            k = diff[0]
            raise CheckpointMismatchError(
                f"checkpoint at step {step} in {self.directory} holds another model: {k} has shape "
                f"{saved.get(k, 'absent')} there and {want.get(k, 'absent')} now ({len(diff)} differences); "
                "nothing was moved"
            )

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest readable checkpoint as ``(state, data)``, or ``None`` when there is none.

        Unreadable checkpoints are moved aside (``<workdir>/corrupt/<step>-<time>``) with a
        :class:`CorruptCheckpointWarning`, so later saves at those steps start clean. A readable
        checkpoint of another structure raises :class:`CheckpointMismatchError` instead.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            self._check_structure(step, abstract_state)
            try:
                state, data = self.restore(step, abstract_state)
                want = data.get("state_sha256") if isinstance(data, dict) else None
                if want is not None and state_digest(state) != want:
                    raise _IntegrityError("the restored arrays do not match the SHA-256 digest saved with them")
                bad = [
                    p
                    for p, leaf in jax.tree_util.tree_leaves_with_path(state)
                    if hasattr(leaf, "dtype") and leaf.dtype.kind == "f" and not bool(jax.numpy.isfinite(leaf).all())
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
