"""Saving converted Flax variables: msgpack (one file) or an Orbax checkpoint directory, atomically.

Either output is first written completely beside the target (``.<name>.<pid>.<random>.tmp``) and
then put in place, so a crash or a kill at any point leaves the previous output or the new one,
readable at ``path``, and the next save succeeds:

* a file target is replaced with one ``rename``;
* a directory target (or a change between file and directory) is swapped in one step with
  Linux ``renameat2(RENAME_EXCHANGE)`` and the old output removed afterwards. Where the swap is
  not supported, the old output is first parked at ``.<name>.<pid>.old`` and the new one renamed
  in; if the writer dies between the two renames, the next :func:`save_variables` or
  :func:`load_variables` renames the parked output back.

Temporaries of writers that are gone are removed by the next save to the same path. Files get
the mode a plain ``open`` would give them under the umask.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from flax_attn.convert import io as _io

__all__ = ["load_variables", "save_variables"]


def save_variables(variables: Any, path: str | os.PathLike, *, format: str | None = None) -> Path:
    """Write Flax ``variables`` to ``path``, atomically.

    ``format`` is ``"msgpack"`` (default for a ``.msgpack`` name or any file name) or ``"orbax"``
    (default for a name without a suffix: a directory). Whatever ``path`` held before (a file or
    a directory from an earlier save) is replaced as a whole.
    """
    path = Path(path)
    fmt = format or ("msgpack" if path.suffix else "orbax")
    if fmt not in ("msgpack", "orbax"):
        raise ValueError(f"save_variables: `format` must be 'msgpack' or 'orbax', got {format!r}")
    host = jax.tree_util.tree_map(np.asarray, variables)
    path.parent.mkdir(parents=True, exist_ok=True)
    _io.recover(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_io._tmp_prefix(path), suffix=".tmp"))
    try:
        if fmt == "msgpack":
            tmp.rmdir()
            with open(tmp, "wb") as f:  # a plain open: the umask decides the mode
                f.write(serialization.msgpack_serialize(host))
                f.flush()
                os.fsync(f.fileno())
        else:
            import orbax.checkpoint as ocp

            os.chmod(tmp, 0o777 & ~_io._umask())  # mkdtemp makes 0700; Orbax fills it in place
            tmp.rmdir()  # Orbax refuses an existing directory
            ocp.PyTreeCheckpointer().save(tmp.absolute(), host)
        _io._fault("save:written")
        _io.install(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return path


def load_variables(path: str | os.PathLike) -> Any:
    """Read variables written by :func:`save_variables` (msgpack file or Orbax directory)."""
    path = Path(path)
    _io.recover(path)
    if path.is_dir():
        import orbax.checkpoint as ocp

        return ocp.PyTreeCheckpointer().restore(path.absolute())
    return serialization.msgpack_restore(path.read_bytes())
