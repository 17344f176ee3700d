"""Property tests of the checkpoint readers (hypothesis): any generated malformed safetensors, npz or
torch zip file ends in a CheckpointError or in a load equal to the reference reader's (and, for the
CRC-protected zip formats, to the tensors originally written), within bounded time and memory.

``FLAX_ATTN_PROPERTY_EXAMPLES=N`` raises the number of examples per property (default 100);
``FLAX_ATTN_PROPERTY_REPORT=path.json`` writes the outcome counts there.
"""

from __future__ import annotations

import collections
import io
import json
import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flax_attn.convert import CheckpointError, load_state_dict  # noqa: E402

EXAMPLES = int(os.environ.get("FLAX_ATTN_PROPERTY_EXAMPLES", "100"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per example: the bounded-time claim
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    derandomize=os.environ.get("FLAX_ATTN_PROPERTY_RANDOM") is None,
    database=None,
)
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
# Peak Python-visible allocation (numpy included) while reading, beyond the file's own size.
MEMORY_SLACK = 8 << 20


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    out = os.environ.get("FLAX_ATTN_PROPERTY_REPORT")
    if out:
        with open(out, "w") as f:
            json.dump({k: dict(v) for k, v in COUNTS.items()}, f, indent=2, sort_keys=True)


def _check(kind: str, path, data: bytes, reference, originals=None):
    """Load ``path``; classify the outcome; anything but a CheckpointError or a correct load fails.

    A load is correct when it equals the reference reader's, bit for bit, and, for formats whose
    members carry a CRC (``originals`` given), when every tensor it shares a name with the file
    before mutation still holds the original bytes: a damaged file must not load as other values.
    """
    path.write_bytes(data)
    tracemalloc.start()
    try:
        try:
            got = load_state_dict(path)
        except CheckpointError:
            COUNTS[kind]["tried"] += 1
            COUNTS[kind]["clear error"] += 1
            return
        except Exception as e:
            COUNTS[kind]["tried"] += 1
            COUNTS[kind]["anything else"] += 1
            raise AssertionError(f"{kind}: {type(e).__name__} escaped: {e}") from e
        finally:
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    COUNTS[kind]["tried"] += 1
    assert peak < 4 * len(data) + MEMORY_SLACK, f"{kind}: peak {peak} bytes for a {len(data)}-byte file"
    want = reference(path)
    if want is None:
        COUNTS[kind]["anything else"] += 1
        raise AssertionError(f"{kind}: loaded a file the reference reader refuses: {sorted(got)}")
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k in want:
        w = np.asarray(want[k])
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert got[k].tobytes() == np.ascontiguousarray(w).tobytes(), k  # bitwise, NaNs included
    for k, v in (originals or {}).items():
        if k in got and (got[k].dtype != v.dtype or got[k].shape != v.shape or got[k].tobytes() != v.tobytes()):
            COUNTS[kind]["anything else"] += 1
            raise AssertionError(f"{kind}: tensor {k!r} loaded with other values than were written")
    COUNTS[kind]["loaded correctly"] += 1


# --------------------------------------------------------------------------- generators

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}
shapes = st.lists(st.integers(0, 4), max_size=3)


@st.composite
def tensors(draw):
    n = draw(st.integers(1, 3))
    out = {}
    for i in range(n):
        dt = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(shapes)
        count = int(np.prod(shape))
        raw = draw(st.binary(min_size=count * np.dtype(DTYPES[dt]).itemsize, max_size=count * 8))
        arr = np.frombuffer(raw[: count * np.dtype(DTYPES[dt]).itemsize], np.uint8)
        if dt == "BOOL":
            arr = arr % 2
        out[f"t{i}"] = arr.view(DTYPES[dt]).reshape(shape)
    return out


def _safetensors(arrays) -> tuple[dict, bytes]:
    header, body = {}, b""
    for k, v in arrays.items():
        b = v.tobytes()
        dt = next(n for n, t in DTYPES.items() if np.dtype(t) == v.dtype)
        header[k] = {"dtype": dt, "shape": list(v.shape), "data_offsets": [len(body), len(body) + len(b)]}
        body += b
    return header, body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8,
)


@st.composite
def mutated_headers(draw):
    header, body = _safetensors(draw(tensors()))
    name = draw(st.sampled_from(sorted(header)))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "extra", "metadata", "none"]))
    if field == "entry":
        header[name] = draw(json_values)
    elif field == "extra":
        header[draw(st.text(max_size=4))] = draw(json_values)
    elif field == "metadata":
        header["__metadata__"] = draw(json_values)
    elif field != "none":
        choice = draw(
            st.one_of(
                json_values,
                st.lists(st.integers(-3, 40), max_size=3),
                st.sampled_from(["F32", "F64", "I8", "BF16", "x"]),
            )
        )
        header[name][field] = choice
    text = json.dumps(header, allow_nan=True).encode()
    return text, body


@st.composite
def safetensors_files(draw):
    kind = draw(st.sampled_from(["header", "bytes", "length"]))
    if kind == "header":
        h, body = draw(mutated_headers())
        data = struct.pack("<Q", len(h)) + h + body
    else:
        header, body = _safetensors(draw(tensors()))
        h = json.dumps(header).encode()
        data = struct.pack("<Q", len(h)) + h + body
        if kind == "length":
            n = draw(st.integers(0, 2**64 - 1) | st.integers(max(len(h) - 4, 0), len(h) + 4))
            data = struct.pack("<Q", n) + data[8:]
    return _byte_mutations(draw, data)


def _byte_mutations(draw, data: bytes) -> bytes:
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
        elif op == "truncate":
            data = data[:at]
        elif op == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
        else:
            data = data[:at] + data[at + draw(st.integers(1, 8)) :]
    return data


def _reference_safetensors(path):
    stn = pytest.importorskip("safetensors.numpy")
    try:
        return stn.load_file(str(path))
    except Exception:
        return None


@SETTINGS
@given(data=safetensors_files())
def test_generated_safetensors_files(tmp_path, data):
    _check("safetensors", tmp_path / "x.safetensors", data, _reference_safetensors)


# --------------------------------------------------------------------------- npz


@st.composite
def npz_files(draw):
    arrays = draw(tensors())
    kind = draw(st.sampled_from(["bytes", "member header", "member"]))
    buf = io.BytesIO()
    compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(buf, "w", compression) as z:
        for k, v in arrays.items():
            m = io.BytesIO()
            np.save(m, v)
            member = m.getvalue()
            if kind == "member header":
                hdr = repr(
                    {
                        "descr": draw(st.sampled_from(["<f4", "|u1", "<i8", "|O", "<f4x", "V3"])),
                        "fortran_order": draw(st.booleans()),
                        "shape": tuple(draw(st.lists(st.integers(-2, 2**33), max_size=3))),
                    }
                ).encode()
                hdr += b" " * (-(len(hdr) + 11) % 64) + b"\n"
                member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr + member[128:]
            elif kind == "member":
                member = _byte_mutations(draw, member)
            z.writestr(k + ".npy", member)
    data = _byte_mutations(draw, _flip_in_payload(draw, buf.getvalue(), arrays)) if kind == "bytes" else buf.getvalue()
    return data, (arrays if kind == "bytes" else None)


def _reference_npz(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        return None


@SETTINGS
@given(case=npz_files())
def test_generated_npz_files(tmp_path, case):
    data, originals = case
    _check("npz", tmp_path / "x.npz", data, _reference_npz, originals)


# --------------------------------------------------------------------------- torch zip


@st.composite
def torch_files(draw):
    torch = pytest.importorskip("torch")
    arrays = draw(tensors())
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, buf)
    return _byte_mutations(draw, _flip_in_payload(draw, buf.getvalue(), arrays)), arrays


def _flip_in_payload(draw, data: bytes, arrays) -> bytes:
    """Sometimes flip one bit inside a tensor's stored bytes: what only a checksum can catch."""
    payloads = [v.tobytes() for v in arrays.values() if v.nbytes]
    if not payloads or not draw(st.booleans()):
        return data
    raw = draw(st.sampled_from(payloads))
    start = data.find(raw)
    if start < 0:
        return data
    at = start + draw(st.integers(0, len(raw) - 1))
    return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]


def _reference_torch(path):
    import torch

    try:
        out = torch.load(path, weights_only=True, map_location="cpu")
        return {k: torch.Tensor.numpy(v) for k, v in out.items()}
    except Exception:
        return None


@SETTINGS
@given(case=torch_files())
def test_generated_torch_zip_files(tmp_path, case):
    pytest.importorskip("torch")
    data, originals = case
    _check("torch zip", tmp_path / "x.pth", data, _reference_torch, originals)
