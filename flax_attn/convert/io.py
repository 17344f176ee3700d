"""Reading and writing PyTorch-style state dicts as ``{name: numpy array}``.

Nothing here executes code from a checkpoint, and nothing here trusts a checkpoint's structure:

* ``.safetensors`` is parsed here without torch and validated with the rules the reference
  ``safetensors`` library enforces (header size bound, a JSON object of ``{dtype, shape,
  data_offsets}`` entries with known dtypes and non-negative integer shapes, no duplicate keys,
  offsets in order, contiguous, non-overlapping, exactly covering the data, and each tensor's
  byte length equal to ``prod(shape) * itemsize``).
* ``.npz`` members are read one by one from the zip archive, each capped in decompressed size
  (``max_member_bytes``), CRC-checked, parsed with numpy's header reader and refused when they
  hold Python objects (which ``np.load`` would unpickle).
* ``.pth``/``.pt``/``.bin`` go through ``torch.load(weights_only=True)`` (torch's allow-list
  unpickler, for both the zip and the legacy format) after the zip members' CRCs are checked,
  and only genuine ``torch.Tensor`` values are taken from the result.

Every failure is a :class:`CheckpointError` (or a subclass) whose message names the file, the
tensor where there is one, and the rule that was broken.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointIntegrityError",
    "CheckpointTooLargeError",
    "UnsafeCheckpointError",
    "atomic_write_bytes",
    "load_state_dict",
    "save_state_dict",
    "to_numpy",
]

_NPZ_BF16 = "__flax_attn_bfloat16__"

# Dict keys under which training scripts commonly nest the weights.
_WRAPPER_KEYS = ("state_dict", "model_state", "model_state_dict", "model", "net", "params")

# The reference library refuses headers above 100 MB (safetensors' MAX_HEADER_SIZE).
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000
# Decompressed size cap for one member of a zip archive (.npz, torch zip); 4 GiB by default.
DEFAULT_MAX_MEMBER_BYTES = 4 << 30

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read as a state dict.

    Attributes:
      path: the file.
      tensor: the tensor (or archive member) concerned, ``None`` for the file as a whole.
      rule: what the file broke, in words.
    """

    def __init__(self, path: str | os.PathLike, rule: str, *, tensor: str | None = None):
        self.path, self.tensor, self.rule = str(path), tensor, rule
        where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
        super().__init__(where + rule)

    def __reduce__(self):  # picklable across processes despite the keyword-only argument
        return _rebuild_error, (type(self), self.path, self.rule, self.tensor)


def _rebuild_error(cls, path, rule, tensor):
    return cls(path, rule, tensor=tensor)


class CheckpointFormatError(CheckpointError):
    """The file is not in the format its name says, or breaks one of the format's rules."""


class CheckpointIntegrityError(CheckpointError):
    """The file is damaged: truncated, or its bytes do not match their recorded checksum."""


class CheckpointTooLargeError(CheckpointError):
    """A member would decompress beyond the configured size cap."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds pickled objects outside the tensor allow-list; nothing was executed."""


def _torch_tensor_type():
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def _is_tensor(value: Any) -> bool:
    t = _torch_tensor_type()
    return (t is not None and isinstance(value, t)) or isinstance(value, np.ndarray)


def to_numpy(value: Any) -> np.ndarray:
    """A numpy copy of a numpy array, a jax array or a torch tensor (bfloat16 kept as ml_dtypes).

    Torch tensors are recognised by type, and converted through ``torch.Tensor``'s own methods,
    so an instance attribute planted by a checkpoint (``tensor.detach = ...``) is never called.
    """
    tensor_type = _torch_tensor_type()
    if tensor_type is not None and isinstance(value, tensor_type):
        torch = sys.modules["torch"]
        t = tensor_type.cpu(tensor_type.detach(value))
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return tensor_type.numpy(tensor_type.view(t, torch.int16)).view(ml_dtypes.bfloat16).copy()
        return tensor_type.numpy(t).copy()
    return np.asarray(value)


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("reading .pth/.pt/.bin checkpoints needs PyTorch: pip install 'flax-attn[torch]'") from e
    return torch


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray], path: Path) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out, path)
    elif _is_tensor(obj):
        name = prefix[:-1]
        try:
            out[name] = to_numpy(obj)
        except Exception as e:  # sparse, quantized, meta or otherwise unconvertible tensors
            raise CheckpointFormatError(
                path, f"cannot be converted to a numpy array ({type(e).__name__}: {e})", tensor=name
            ) from None
    # anything else (epochs, metrics, optimiser hyper-parameters) is not a tensor: dropped


def _select(raw: Any, key: str | None, path: Path) -> Mapping:
    if not isinstance(raw, Mapping):
        raise CheckpointFormatError(path, f"expected a dict of tensors, found {type(raw).__name__}")
    if key is not None:
        if key not in raw:
            raise CheckpointError(path, f"key {key!r} not found; top-level keys: {sorted(map(str, raw))}")
        return raw[key]
    if all(_is_tensor(v) for v in raw.values()):
        return raw
    for k in _WRAPPER_KEYS:
        if k in raw and isinstance(raw[k], Mapping):
            return raw[k]
    return raw


# --------------------------------------------------------------------------- safetensors


def _safetensors_dtype(name: str) -> np.dtype | None:
    if name in _SAFETENSORS_DTYPES:
        return np.dtype(_SAFETENSORS_DTYPES[name])
    if name in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[name]))
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(path: Path):
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise CheckpointFormatError(path, f"safetensors header has the key {k!r} twice")
            seen.add(k)
        return dict(pairs)

    return hook


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    E = CheckpointFormatError  # noqa: N806  (a short alias for the one error this parser raises)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointIntegrityError(path, f"{size} bytes is too short for a safetensors file (8-byte header)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > SAFETENSORS_MAX_HEADER_BYTES:
            raise E(path, f"header length {n} exceeds the {SAFETENSORS_MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise CheckpointIntegrityError(path, f"header length {n} runs past the end of the {size}-byte file")
        raw_header = f.read(n)
        body = f.read()
    try:
        text = raw_header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise E(path, f"header is not UTF-8 ({e})") from None
    if not text.startswith("{"):
        raise E(path, "header must be a JSON object (starting with '{')")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates(path))
    except CheckpointError:
        raise
    except RecursionError:
        raise E(path, "header JSON is nested too deeply") from None
    except ValueError as e:
        raise E(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise E(path, f"header must be a JSON object, found {type(header).__name__}")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise E(path, "__metadata__ must be an object of string values", tensor="__metadata__")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise E(path, f"entry must be an object, found {type(info).__name__}", tensor=name)
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise E(path, f"entry lacks {missing}", tensor=name)
        dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        np_dt = _safetensors_dtype(dt) if isinstance(dt, str) else None
        if np_dt is None:
            raise E(path, f"unknown dtype {dt!r}; known: {sorted([*_SAFETENSORS_DTYPES, *_ML_DTYPES])}", tensor=name)
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise E(path, f"shape must be a list of non-negative integers, got {shape!r}", tensor=name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise E(path, f"data_offsets must be [start, end] of non-negative integers, got {offsets!r}", tensor=name)
        if offsets[0] > offsets[1]:
            raise E(path, f"data_offsets {offsets}: start is after end", tensor=name)
        want = math.prod(shape) * np_dt.itemsize
        if offsets[1] - offsets[0] != want:
            raise E(
                path,
                f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but shape {shape} of {dt} needs {want}",
                tensor=name,
            )
        entries.append((offsets[0], offsets[1], name, np_dt, tuple(shape)))
    entries.sort()
    pos = 0
    for start, end, name, _, _ in entries:
        if start != pos:
            rule = "overlaps the previous tensor" if start < pos else f"leaves a gap (previous data ends at {pos})"
            raise E(path, f"data_offsets [{start}, {end}] {rule}; tensors must be contiguous", tensor=name)
        pos = end
    if pos != len(body):
        if pos > len(body):
            raise CheckpointIntegrityError(
                path, f"the header describes {pos} data bytes but only {len(body)} follow it (truncated file?)"
            )
        raise E(path, f"the header describes {pos} data bytes but {len(body)} follow it (trailing bytes)")
    out = {}
    for start, _end, name, np_dt, shape in entries:
        out[name] = np.frombuffer(body, dtype=np_dt, count=math.prod(shape), offset=start).reshape(shape).copy()
    return out


# --------------------------------------------------------------------------- zip archives


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except Exception:
        return False


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointIntegrityError(path, f"damaged zip archive ({e})") from None
    except Exception as e:  # zipfile also raises NotImplementedError, OSError, EOFError, ValueError ...
        raise CheckpointIntegrityError(path, f"damaged zip archive ({type(e).__name__}: {e})") from None


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, cap: int, *, keep: bool = True) -> bytes:
    """The decompressed member, never more than ``cap`` bytes, its CRC-32 checked.

    With ``keep=False`` the member is only verified, in 1 MiB chunks, and ``b""`` is returned.
    """
    if info.file_size > cap:
        raise CheckpointTooLargeError(
            path,
            f"archive member decompresses to {info.file_size} bytes, over the cap of {cap} "
            f"(raise max_member_bytes to allow it)",
            tensor=info.filename,
        )
    if info.flag_bits & 0x1:
        raise CheckpointFormatError(path, "archive member is encrypted", tensor=info.filename)
    chunks, n = [], 0
    try:
        # ZipExtFile stops at the declared size and compares the CRC-32 when it gets there.
        with zf.open(info) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
                if keep:
                    chunks.append(chunk)
    except zipfile.BadZipFile as e:
        raise CheckpointIntegrityError(path, f"damaged archive member ({e})", tensor=info.filename) from None
    except Exception as e:  # zlib.error, EOFError, NotImplementedError, RuntimeError, ... from a damaged member
        raise CheckpointIntegrityError(
            path, f"damaged archive member ({type(e).__name__}: {e})", tensor=info.filename
        ) from None
    if n != info.file_size:
        raise CheckpointIntegrityError(
            path, f"archive member holds {n} bytes, its entry says {info.file_size}", tensor=info.filename
        )
    return b"".join(chunks)


def _check_zip(path: Path, cap: int) -> None:
    """Verify every member of a zip archive (sizes, caps, CRC-32) without keeping its bytes."""
    with _open_zip(path) as zf:
        for info in zf.infolist():
            _read_member(zf, info, path, cap, keep=False)


def _parse_npy(data: bytes, name: str, path: Path) -> np.ndarray:
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, tokenize.TokenError, ...
        raise CheckpointFormatError(path, f"broken .npy header ({type(e).__name__}: {e})", tensor=name) from None
    if dtype.hasobject:
        raise UnsafeCheckpointError(
            path, f"holds pickled Python objects (dtype {dtype}); refusing to load", tensor=name
        )
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointFormatError(path, f"shape must be non-negative integers, got {shape!r}", tensor=name)
    want = math.prod(shape) * dtype.itemsize
    have = len(data) - buf.tell()
    if have != want:
        raise CheckpointFormatError(
            path, f"header claims shape {shape} of {dtype} ({want} bytes) but the member holds {have}", tensor=name
        )
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=buf.tell())
    return arr.reshape(shape, order="F" if fortran else "C").copy()


def _read_npz(path: Path, cap: int) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise CheckpointFormatError(path, "this is a single .npy array, not an .npz archive of named arrays")
    if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06") or not _is_zip(path):
        # np.load insists on the zip signature at offset 0; zipfile alone would accept a prefix.
        raise CheckpointFormatError(path, "not an .npz file (no zip archive found at its start)")
    out: dict[str, np.ndarray] = {}
    with _open_zip(path) as zf:
        names = [i.filename for i in zf.infolist()]
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise CheckpointFormatError(path, "archive member is not a .npy array", tensor=info.filename)
            name = info.filename[: -len(".npy")]
            if names.count(info.filename) > 1:
                raise CheckpointFormatError(path, "archive holds this member more than once", tensor=name)
            out[name] = _parse_npy(_read_member(zf, info, path, cap), name, path)
    bf16 = out.pop(_NPZ_BF16, None)
    if bf16 is not None:  # npz has no bfloat16: stored as uint16 bits, their names listed here
        import ml_dtypes

        if bf16.dtype.kind != "U" or bf16.ndim != 1:
            raise CheckpointFormatError(path, "must be a 1-D array of names", tensor=_NPZ_BF16)
        for name in bf16.tolist():
            if name not in out or out[name].dtype != np.uint16:
                raise CheckpointFormatError(path, "listed as bfloat16 but not stored as uint16 bits", tensor=name)
            out[name] = out[name].view(ml_dtypes.bfloat16)
    return out


# --------------------------------------------------------------------------- torch


def _read_torch(path: Path, cap: int) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointIntegrityError(path, "empty file (0 bytes)")
    if _is_zip(path):
        _check_zip(path, cap)  # torch's own reader skips the CRC: one flipped bit would load silently
    elif head[:1] != b"\x80" and not _is_text_pickle(path):
        raise CheckpointFormatError(
            path, f"not a PyTorch checkpoint: neither a zip archive nor a pickle (first bytes {head!r})"
        )
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, IndexError, ...
        msg = str(e)
        foreign = [g for g in _pickle_globals(path) if not g.startswith(_TORCH_GLOBAL_MODULES)]
        if "GLOBAL" in msg or "Unsupported global" in msg or foreign:
            detail = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln or "global" in ln), "")
            raise UnsafeCheckpointError(
                path,
                "refusing to load: the checkpoint references Python objects outside the tensor "
                "allow-list, and loading it could execute code. Nothing was executed. "
                + (f"torch said: {detail}" if detail else f"it references {sorted(set(foreign))[:5]}"),
            ) from None
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        at = next((i for i, ln in enumerate(lines) if ln.startswith("WeightsUnpickler error")), None)
        detail = " ".join(lines[at : at + 2]) if at is not None else ""
        reason = detail or (msg.splitlines()[0] if msg else "")
        raise CheckpointFormatError(
            path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {reason[:300]})"
        ) from None


def _is_text_pickle(path: Path) -> bool:
    """Whether the file opens with a well-formed protocol 0/1 pickle (which has no leading 0x80)."""
    import pickletools

    with open(path, "rb") as f:
        data = f.read(1 << 20)
    try:
        pickletools.dis(data, out=io.StringIO())  # checks opcodes and the stack, executes nothing
    except Exception:
        return False
    return True


# Modules whose globals torch's own checkpoints reference (tensor rebuilders, storages, dtypes).
_TORCH_GLOBAL_MODULES = ("torch.", "torch ", "collections OrderedDict", "collections.OrderedDict", "_codecs encode")


def _pickle_globals(path: Path) -> list[str]:
    """``"module name"`` of every global a pickle refers to, found by parsing (never unpickling) it.

    torch's unpickler stops at the first opcode it does not support (protocol 4 frames, say)
    without saying whether the pickle was after code; this tells the two apart. Parsing stops
    quietly at the first malformed opcode.
    """
    import pickletools

    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(member) if member else b""
        else:
            data = path.read_bytes()
    except Exception:  # a damaged archive: torch's own error stands
        return []
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"):
                strings.append(str(arg))
            elif op.name in ("BINGET", "LONG_BINGET", "GET", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                continue
            elif op.name in ("GLOBAL", "INST"):
                found.append(str(arg))
            elif op.name == "STACK_GLOBAL":
                found.append(" ".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
            elif op.name in ("EXT1", "EXT2", "EXT4"):
                found.append(f"<extension {arg}>")
    except Exception:  # a malformed or truncated pickle: what was found so far stands
        pass
    return found


# --------------------------------------------------------------------------- public API


def load_state_dict(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    strip_prefix: str | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
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
      max_member_bytes: cap on the decompressed size of one member of a zip archive (``.npz``, torch
        zip format), so a small deflated file cannot expand without bound in memory.

    Nested dicts are flattened with dots; non-tensor entries (epochs, metrics) are dropped.

    Raises:
      FileNotFoundError: no such file.
      UnsafeCheckpointError: the file holds pickled objects beyond tensors and plain containers.
      CheckpointIntegrityError: the file is truncated or fails its CRC.
      CheckpointTooLargeError: an archive member is larger than ``max_member_bytes``.
      CheckpointFormatError: the file breaks its format's rules.
      CheckpointError: the base of all of the above (also: ``key`` not found, no tensors).
    """
    path = Path(path)
    if not _is_int(max_member_bytes) or max_member_bytes <= 0:
        raise ValueError(f"load_state_dict: `max_member_bytes` must be a positive int, got {max_member_bytes!r}")
    if not path.exists():
        raise FileNotFoundError(f"load_state_dict: no such checkpoint: {path}")
    if path.is_dir():
        raise CheckpointFormatError(path, "is a directory, not a checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        raw: Any = _read_safetensors(path)
    elif suffix == ".npz":
        raw = _read_npz(path, max_member_bytes)
    else:
        raw = _read_torch(path, max_member_bytes)
    selected = _select(raw, key, path)
    out: dict[str, np.ndarray] = {}
    _flatten(selected, "", out, path)
    if not out:
        raise CheckpointFormatError(path, f"no tensors found (top-level keys: {sorted(map(str, selected))[:20]})")
    if strip_prefix is None and all(k.startswith("module.") for k in out):
        strip_prefix = "module."
    if strip_prefix:
        out = {k[len(strip_prefix) :] if k.startswith(strip_prefix) else k: v for k, v in out.items()}
    return out


def _umask() -> int:
    # os.umask can only be read by setting it; restore it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(..., "w")`` would give a new file under the current umask."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half.

    The bytes go to a temporary file beside ``path`` (fsynced, mode following the umask like a
    plain ``open``), which is then renamed over ``path`` in one step, and the directory fsynced.
    Temporaries left by a killed writer are removed by the next write to the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fault("save:written")
        install(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def clean_stale_temporaries(path: Path) -> None:
    """Remove ``.<name>.<pid>.*.tmp`` files and directories beside ``path`` whose writer is gone.

    ``.<name>.tmp`` and ``.<name>.old`` (no pid: left by versions before 0.2) count as stale too.
    """
    prefix = f".{path.name}."
    try:
        siblings = list(path.parent.iterdir())
    except FileNotFoundError:
        return
    for p in siblings:
        name = p.name
        # Ours: .<name>.<pid>.<random>.tmp, .<name>.<pid>.old, and Orbax's <tmp>.orbax-checkpoint-tmp-*.
        if not (name.startswith(prefix) and (".tmp" in name or name.endswith(".old"))):
            continue
        pid = name[len(prefix) :].split(".", 1)[0]
        legacy = name in (f"{prefix}tmp", f"{prefix}old")
        if not (pid.isdigit() or legacy):
            continue  # not one of ours
        if not legacy and (int(pid) == os.getpid() or _alive(int(pid))):
            continue  # a live writer (this process or another) owns it
        if name.endswith(".old") and not path.exists():
            continue  # the only copy of the previous output: recovery renames it back first
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _owned_by_live_writer(p: Path, path: Path) -> bool:
    pid = p.name[len(path.name) + 2 :].split(".", 1)[0]
    return pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; ``False`` where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - glibc < 2.28 or another libc
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(b))


def recover(path: Path) -> None:
    """Undo a save that died between parking the old output and renaming the new one in."""
    if not path.exists() and not path.is_symlink():
        parked = [p for p in path.parent.glob(f".{path.name}.*old") if not _owned_by_live_writer(p, path)]
        parked.sort(key=lambda p: p.stat().st_mtime)
        if parked:
            os.replace(parked[-1], path)
    clean_stale_temporaries(path)


def install(tmp: Path, path: Path) -> None:
    """Put the complete output ``tmp`` at ``path`` in one step (see the module docstring)."""
    if not path.exists() and not path.is_symlink():
        os.replace(tmp, path)
        _fault("install:renamed")
    elif not path.is_dir() and not tmp.is_dir():
        os.replace(tmp, path)
        _fault("install:renamed")
    elif _exchange(tmp, path):
        _fault("install:exchanged")
        _remove(tmp)  # now holds the old output
    else:
        parked = path.with_name(f".{path.name}.{os.getpid()}.old")
        _remove(parked)
        os.replace(path, parked)
        try:
            _fault("install:parked")
            os.replace(tmp, path)
        except BaseException:
            os.replace(parked, path)  # a failure (not a kill) between the renames: put the old one back
            raise
        _fault("install:renamed")
        _remove(parked)
    _fsync_dir(path.parent)


def _fault(point: str) -> None:
    """A named point between the steps of an atomic write; tests replace this to crash there."""


def _c_order(arr: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray turns a 0-d array into shape (1,); this keeps scalars scalars.
    return np.array(arr, order="C", copy=not arr.flags.c_contiguous)


def save_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``{name: array}`` as ``.pth`` (needs torch), ``.safetensors`` or ``.npz``, atomically."""
    path = Path(path)
    arrays = {k: _c_order(to_numpy(v)) for k, v in state_dict.items()}
    suffix = path.suffix.lower()
    if suffix == ".npz":
        buf = io.BytesIO()
        bf16 = [k for k, v in arrays.items() if v.dtype.name == "bfloat16"]
        stored = {k: (v.view(np.uint16) if k in bf16 else v) for k, v in arrays.items()}
        if bf16:
            stored[_NPZ_BF16] = np.array(bf16)
        np.savez(buf, **stored)
        atomic_write_bytes(path, buf.getvalue())
    elif suffix == ".safetensors":
        inv = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
        inv_ml = {v: k for k, v in _ML_DTYPES.items()}
        header, chunks, offset = {}, [], 0
        for name, arr in arrays.items():
            dt = inv_ml.get(arr.dtype.name) or inv.get(arr.dtype)
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
        buf = io.BytesIO()
        tensors = {}
        for k, v in arrays.items():
            if v.dtype.name == "bfloat16":
                tensors[k] = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
            else:
                tensors[k] = torch.from_numpy(v)
        torch.save(tensors, buf)
        atomic_write_bytes(path, buf.getvalue())
