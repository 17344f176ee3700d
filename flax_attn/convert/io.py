"""Reading and writing PyTorch-style state dicts as ``{name: numpy array}``.

Nothing here executes code from a checkpoint: ``.pth``/``.pt``/``.bin`` go through
``torch.load(weights_only=True)`` (torch's allow-list unpickler, for both the zip and the legacy
format), ``.safetensors`` is parsed here without torch, ``.npz`` is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "atomic_write_bytes",
    "load_state_dict",
    "save_state_dict",
    "to_numpy",
]

_NPZ_BF16 = "__flax_attn_bfloat16__"

# Dict keys under which training scripts commonly nest the weights.
_WRAPPER_KEYS = ("state_dict", "model_state", "model_state_dict", "model", "net", "params")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read as a state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds pickled objects outside the tensor allow-list; nothing was executed."""


def to_numpy(value: Any) -> np.ndarray:
    """A numpy copy of a numpy array, a jax array or a torch tensor (bfloat16 kept as ml_dtypes)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes

            return t.view(dtype=_torch().int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()
    return np.asarray(value)


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "reading .pth/.pt/.bin checkpoints needs PyTorch: pip install 'flax-attn[torch]'"
        ) from e
    return torch


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray], skipped: list[str]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out, skipped)
    elif hasattr(obj, "detach") or isinstance(obj, np.ndarray):
        out[prefix[:-1]] = to_numpy(obj)
    else:
        skipped.append(prefix[:-1])


def _select(raw: Any, key: str | None, path: Path) -> Mapping:
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(raw).__name__}")
    if key is not None:
        if key not in raw:
            raise CheckpointError(f"{path}: key {key!r} not found; top-level keys: {sorted(map(str, raw))}")
        return raw[key]
    if all(hasattr(v, "detach") or isinstance(v, np.ndarray) for v in raw.values()):
        return raw
    for k in _WRAPPER_KEYS:
        if k in raw and isinstance(raw[k], Mapping):
            return raw[k]
    return raw


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt == "BF16":
            import ml_dtypes

            np_dt = ml_dtypes.bfloat16
        elif dt in _SAFETENSORS_DTYPES:
            np_dt = _SAFETENSORS_DTYPES[dt]
        else:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
        start, end = info["data_offsets"]
        arr = np.frombuffer(body[start:end], dtype=np_dt)
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def load_state_dict(
    path: str | os.PathLike, *, key: str | None = None, strip_prefix: str | None = None
) -> dict[str, np.ndarray]:
    """Read a checkpoint into ``{dotted name: numpy array}`` without executing code from it.

    Args:
      path: ``.pth``/``.pt``/``.bin``/``.tar`` (torch zip or legacy format; needs torch),
        ``.safetensors`` (no torch needed) or ``.npz``.
      key: for checkpoints that wrap the weights in a dict (``{"model_state": {...}, "epoch": 3}``),
        the entry to read. Without it, a top-level ``state_dict``/``model_state``/``model``/... dict
        is picked when present.
      strip_prefix: remove this prefix from every name. ``"module."`` (from ``DataParallel``) is
        stripped automatically when every name carries it.

    Nested dicts are flattened with dots; non-tensor entries (epochs, metrics) are dropped.

    Raises:
      UnsafeCheckpointError: the pickle references anything but tensors and plain containers.
      CheckpointError: the file is not a readable checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_state_dict: no such checkpoint: {path}")
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".safetensors":
        raw: Any = _read_safetensors(path)
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files if k != _NPZ_BF16}
                if _NPZ_BF16 in z.files:  # npz has no bfloat16: stored as uint16 bits, names listed
                    import ml_dtypes

                    for name in z[_NPZ_BF16].tolist():
                        raw[name] = raw[name].view(ml_dtypes.bfloat16)
        except ValueError as e:
            raise UnsafeCheckpointError(f"{path}: .npz holds pickled objects; refusing to load ({e})") from None
    else:
        torch = _torch()
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError (or RuntimeError on older versions)
            msg = str(e)
            if "weights_only" in msg or "Unsupported global" in msg or "UnpicklingError" in type(e).__name__:
                raise UnsafeCheckpointError(
                    f"{path}: refusing to load: the checkpoint references Python objects outside the "
                    f"tensor allow-list, and loading it could execute code. Nothing was executed. "
                    f"torch said: {msg.splitlines()[0] if msg else type(e).__name__}"
                ) from None
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {e}") from None
    selected = _select(raw, key, path)
    out: dict[str, np.ndarray] = {}
    _flatten(selected, "", out, [])
    if not out:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(map(str, selected))[:20]})")
    if strip_prefix is None and all(k.startswith("module.") for k in out):
        strip_prefix = "module."
    if strip_prefix:
        out = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v for k, v in out.items()}
    return out


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``{name: array}`` as ``.pth`` (needs torch), ``.safetensors`` or ``.npz``, atomically."""
    path = Path(path)
    arrays = {k: to_numpy(v) for k, v in state_dict.items()}
    suffix = path.suffix.lower()
    if suffix == ".npz":
        import io

        buf = io.BytesIO()
        bf16 = [k for k, v in arrays.items() if v.dtype.name == "bfloat16"]
        stored = {k: (v.view(np.uint16) if k in bf16 else v) for k, v in arrays.items()}
        if bf16:
            stored[_NPZ_BF16] = np.array(bf16)
        np.savez(buf, **stored)
        atomic_write_bytes(path, buf.getvalue())
    elif suffix == ".safetensors":
        inv = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
        header, chunks, offset = {}, [], 0
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            dt = "BF16" if arr.dtype.name == "bfloat16" else inv.get(arr.dtype)
            if dt is None:
                raise ValueError(f"save_state_dict: {name!r} has dtype {arr.dtype}, not storable in safetensors")
            b = arr.tobytes()
            header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
            chunks.append(b)
            offset += len(b)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        atomic_write_bytes(path, struct.pack("<Q", len(h)) + h + b"".join(chunks))
    else:
        torch = _torch()
        import io

        buf = io.BytesIO()
        tensors = {}
        for k, v in arrays.items():
            if v.dtype.name == "bfloat16":
                tensors[k] = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
            else:
                tensors[k] = torch.from_numpy(np.ascontiguousarray(v))
        torch.save(tensors, buf)
        atomic_write_bytes(path, buf.getvalue())
