"""Saving converted Flax variables: msgpack (one file, atomic) or an Orbax checkpoint directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from flax_attn.convert.io import atomic_write_bytes

__all__ = ["load_variables", "save_variables"]


def save_variables(variables: Any, path: str | os.PathLike, *, format: str | None = None) -> Path:
    """Write Flax ``variables`` to ``path``.

    ``format`` is ``"msgpack"`` (default for a ``.msgpack`` name or any file name) or ``"orbax"``
    (default for a name without a suffix: a directory). The msgpack file is replaced atomically, so
    an interrupted write leaves the previous file intact; the Orbax directory is written beside
    the target and renamed into place.
    """
    path = Path(path)
    fmt = format or ("msgpack" if path.suffix else "orbax")
    host = jax.tree_util.tree_map(np.asarray, variables)
    if fmt == "msgpack":
        atomic_write_bytes(path, serialization.msgpack_serialize(host))
    elif fmt == "orbax":
        import orbax.checkpoint as ocp

        tmp = path.with_name(f".{path.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        ocp.PyTreeCheckpointer().save(tmp.absolute(), host)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    else:
        raise ValueError(f"save_variables: `format` must be 'msgpack' or 'orbax', got {format!r}")
    return path


def load_variables(path: str | os.PathLike) -> Any:
    """Read variables written by :func:`save_variables` (msgpack file or Orbax directory)."""
    path = Path(path)
    if path.is_dir():
        import orbax.checkpoint as ocp

        return ocp.PyTreeCheckpointer().restore(path.absolute())
    return serialization.msgpack_restore(path.read_bytes())
