"""Validating checkpoint readers: every malformed file ends in a CheckpointError naming the file,
the tensor and the rule; good files load exactly. Cross-checked against the reference
``safetensors`` library where it is installed."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest

from flax_attn.convert import (
    CheckpointError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    from_torch,
    load_state_dict,
    save_state_dict,
)
from flax_attn.convert.io import CheckpointFormatError, CheckpointIntegrityError, CheckpointTooLargeError


def safetensors_bytes(header, body: bytes = b"", *, raw: bytes | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BODY8 = np.array([1.5, -2.0], np.float32).tobytes()

# (id, header or raw header bytes, body, substring the message must contain)
BAD_SAFETENSORS = [
    ("negative offset", {"a": {**F32x2, "data_offsets": [-8, 0]}}, BODY8, "non-negative"),
    ("start after end", {"a": {**F32x2, "data_offsets": [8, 0]}}, BODY8, "start is after end"),
    (
        "overlapping",
        {"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}},
        BODY8 + bytes(4),
        "overlaps the previous tensor",
    ),
    (
        "duplicated offsets",
        {"a": F32x2, "b": F32x2},
        BODY8 + bytes(8),
        "overlaps the previous tensor",
    ),
    ("gap", {"a": {**F32x2, "data_offsets": [4, 12]}}, bytes(12), "leaves a gap"),
    ("out of range", {"a": {**F32x2, "data_offsets": [0, 8]}}, BODY8[:4], "truncated"),
    ("trailing bytes", {"a": F32x2}, BODY8 + bytes(8), "trailing bytes"),
    ("shape -1", {"a": {**F32x2, "shape": [-1]}}, BODY8, "non-negative integers"),
    ("shape -1,2", {"a": {**F32x2, "shape": [-1, 2]}}, BODY8, "non-negative integers"),
    ("shape int", {"a": {**F32x2, "shape": 2}}, BODY8, "list of non-negative integers"),
    ("shape float", {"a": {**F32x2, "shape": [2.0]}}, BODY8, "non-negative integers"),
    ("shape bool", {"a": {**F32x2, "shape": [True, 2]}}, BODY8, "non-negative integers"),
    ("shape NaN", None, BODY8, "non-negative integers"),
    ("offsets != shape", {"a": {**F32x2, "shape": [3]}}, BODY8, "needs 12"),
    ("huge shape", {"a": {**F32x2, "shape": [10**6, 10**6]}}, BODY8, "needs 4000000000000"),
    ("missing dtype", {"a": {"shape": [2], "data_offsets": [0, 8]}}, BODY8, "lacks ['dtype']"),
    ("missing shape", {"a": {"dtype": "F32", "data_offsets": [0, 8]}}, BODY8, "lacks ['shape']"),
    ("missing offsets", {"a": {"dtype": "F32", "shape": [2]}}, BODY8, "lacks ['data_offsets']"),
    ("unknown dtype", {"a": {**F32x2, "dtype": "F31"}}, BODY8, "unknown dtype 'F31'"),
    ("entry not a dict", {"a": [1, 2]}, BODY8, "entry must be an object"),
    ("metadata list", {"__metadata__": [1], "a": F32x2}, BODY8, "__metadata__ must be an object"),
    ("metadata values", {"__metadata__": {"k": 1}, "a": F32x2}, BODY8, "__metadata__ must be an object"),
    ("header list", [1, 2], b"", "JSON object"),
    ("header string", "abc", b"", "JSON object"),
    ("header null", None, b"", "JSON object"),
    ("deep nesting", "deep", b"", "header"),
    ("not json", "notjson", b"", "not valid JSON"),
    ("duplicate keys", "dup", BODY8 + BODY8, "'a' twice"),
    ("header too long", "long", b"", "runs past the end"),
    ("header over the bound", "huge", b"", "exceeds the 100000000-byte limit"),
]


def _bad_file(tmp_path, header, body, case_id):
    raw = None
    if case_id == "shape NaN":
        raw = b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}'
    elif case_id == "deep nesting":
        raw = b"[" * 100_000
    elif case_id == "not json":
        raw = b"{not json"
    elif case_id == "duplicate keys":
        e = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
        raw = ('{"a": ' + e + ', "a": ' + e.replace("[0, 8]", "[8, 16]") + "}").encode()
    elif case_id == "header string":
        raw = b'"abc"'
    elif case_id in ("header too long", "header over the bound"):
        data = struct.pack("<Q", 10**6 if case_id == "header too long" else 2 * 10**8) + b"{}"
        p = tmp_path / "bad.safetensors"
        p.write_bytes(data)
        return p
    p = tmp_path / "bad.safetensors"
    p.write_bytes(safetensors_bytes(header, body, raw=raw))
    return p


@pytest.mark.parametrize("case_id,header,body,rule", BAD_SAFETENSORS, ids=[c[0] for c in BAD_SAFETENSORS])
def test_malformed_safetensors_is_a_clear_error(tmp_path, case_id, header, body, rule):
    path = _bad_file(tmp_path, header, body, case_id)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    msg = str(err.value)
    assert str(path) in msg and rule in msg, msg
    assert err.value.path == str(path) and err.value.rule
    if isinstance(header, dict) and "a" in header and case_id not in ("out of range", "trailing bytes"):
        assert err.value.tensor in ("a", "b", "__metadata__"), msg  # the tensor is named
    st = pytest.importorskip("safetensors.numpy")
    try:  # the reference library refuses the same file
        st.load_file(str(path))
    except Exception:
        pass
    else:
        pytest.fail(f"safetensors loads {case_id!r}, which this reader refuses")


def test_safetensors_zero_size_and_scalar_tensors_load(tmp_path):
    header = {
        "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "s": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]},
        "__metadata__": {"format": "pt"},
    }
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes(header, np.array(7, np.int64).tobytes()))
    sd = load_state_dict(path)
    assert sd["e"].shape == (0, 3) and sd["s"].shape == () and sd["s"] == 7


# --------------------------------------------------------------------------- npz


def _npz(tmp_path, arrays=None, **kw) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **(arrays or {"w": np.arange(6, dtype=np.float32)}), **kw)
    return buf.getvalue()


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for k, v in members.items():
            z.writestr(k, v)
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_npz_failures_are_clear(tmp_path):
    good = _npz(tmp_path)
    npy = _npy(np.ones(3, np.float32))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (2_000_000_000,)})
    header_2e9 = buf.getvalue() + bytes(16)
    broken_header = _npy(np.ones(3, np.float32)).replace(b"'descr'", b"'descX'")
    cases = {
        "npy renamed": (npy, CheckpointFormatError, "single .npy array"),
        "truncated": (good[: len(good) // 2], CheckpointError, "zip"),
        "random text": (b"hello, this is not an archive\n" * 10, CheckpointFormatError, "no zip archive"),
        "broken member header": (_zip({"w.npy": broken_header}), CheckpointFormatError, "broken .npy header"),
        "2e9 floats in 16 bytes": (
            _zip({"w.npy": header_2e9}),
            CheckpointFormatError,
            "(2000000000,) of float32 (8000000000 bytes) but the member holds 16",
        ),
        "not an npy member": (_zip({"w.txt": b"abc"}), CheckpointFormatError, "not a .npy array"),
        "duplicate member": (_zip({"w.npy": npy, "v.npy": npy}).replace(b"v.npy", b"w.npy"), CheckpointError, "w"),
    }
    # One flipped byte inside the stored data: only the CRC can tell.
    at = good.index(np.arange(6, dtype=np.float32).tobytes()) + 5
    cases["byte flipped"] = (good[:at] + bytes([good[at] ^ 0x10]) + good[at + 1 :], CheckpointIntegrityError, "CRC")
    for name, (data, cls, rule) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.npz"
        path.write_bytes(data)
        with pytest.raises(cls) as err:
            load_state_dict(path)
        assert not isinstance(err.value, UnsafeCheckpointError), (name, err.value)
        assert str(path) in str(err.value) and rule in str(err.value), (name, str(err.value))


def test_npz_pickled_objects_are_still_unsafe_and_named(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, ok=np.ones(2), evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UnsafeCheckpointError, match=r"tensor 'evil': holds pickled Python objects"):
        load_state_dict(path)


def test_npz_decompression_is_capped(tmp_path):
    # 64 MB of zeros deflate to ~64 KB; with a 1 MB cap the member is refused before inflating.
    path = tmp_path / "bomb.npz"
    path.write_bytes(_zip({"w.npy": _npy(np.zeros(16 << 20, np.float32))}, zipfile.ZIP_DEFLATED))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointTooLargeError, match=r"tensor 'w.npy'.*over the cap of 1048576"):
        load_state_dict(path, max_member_bytes=1 << 20)
    with pytest.raises(ValueError, match="`max_member_bytes` must be a positive int, got 0"):
        load_state_dict(path, max_member_bytes=0)
    assert load_state_dict(path)["w"].shape == (16 << 20,)  # under the default cap it loads


def test_npz_member_lying_about_its_size_is_caught(tmp_path):
    # The central directory says 128 bytes; the deflated stream holds far more: reading stops at
    # the declared size and the CRC (of the whole member) does not match.
    data = _zip({"w.npy": _npy(np.arange(1000, dtype=np.float32))}, zipfile.ZIP_DEFLATED)
    info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
    patched = data.replace(struct.pack("<I", info.file_size), struct.pack("<I", 128))
    path = tmp_path / "liar.npz"
    path.write_bytes(patched)
    with pytest.raises(CheckpointError):
        load_state_dict(path)


# --------------------------------------------------------------------------- .pth

torch = pytest.importorskip("torch")


def test_pth_flipped_byte_is_caught_by_the_crc(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.arange(8, dtype=torch.float32)}, path)
    data = path.read_bytes()
    at = data.index(np.arange(8, dtype=np.float32).tobytes()) + 9
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    assert not torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(8.0))  # torch alone: silent
    with pytest.raises(CheckpointIntegrityError, match=r"tensor '.*data/0'.*CRC"):
        load_state_dict(path)


@pytest.mark.parametrize(
    "data,rule",
    [(b"", "empty file"), (b"abc", "neither a zip archive nor a pickle"), (bytes(4096), "neither a zip")],
    ids=["empty", "3 bytes", "4096 zeros"],
)
def test_pth_junk_is_not_called_unsafe(tmp_path, data, rule):
    path = tmp_path / "junk.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rule) as err:
        load_state_dict(path)
    assert not isinstance(err.value, UnsafeCheckpointError)


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
def test_pickles_of_every_protocol_that_reach_for_code_are_unsafe(tmp_path, protocol):
    import os
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / f"evil{protocol}.pth"
    path.write_bytes(pickle.dumps({"w": np.zeros(2), "e": Exploit()}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError, match="could execute code. Nothing was executed"):
        load_state_dict(path)


def test_pth_truncated_pickle_is_not_called_unsafe(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointFormatError) as err:
        load_state_dict(path)
    assert not isinstance(err.value, UnsafeCheckpointError)


@pytest.mark.parametrize("planted", ["set", "Tensor"])
def test_tensor_state_gadget_cannot_redirect_conversion(tmp_path, planted):
    # torch pickles a tensor's __dict__ through _rebuild_from_type_v2; an instance attribute
    # named `detach` must not be what conversion calls.
    t = torch.tensor([1.0, 2.0])
    t.detach = set if planted == "set" else torch.Tensor
    path = tmp_path / "gadget.pth"
    torch.save({"w": t}, path)
    ref = torch.load(path, weights_only=True)["w"]
    out = load_state_dict(path)["w"]
    np.testing.assert_array_equal(out, torch.Tensor.numpy(ref))
    np.testing.assert_array_equal(out, [1.0, 2.0])


# --------------------------------------------------------------------------- writing and converting


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pth"])
def test_scalars_round_trip_with_their_shape(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    save_state_dict({"n": np.array(3), "f": np.array(2.5, np.float32), "v": np.ones((1,))}, path)
    back = load_state_dict(path)
    assert back["n"].shape == () and back["n"] == 3
    assert back["f"].shape == () and back["v"].shape == (1,)


def test_float64_overflow_on_downcast_is_an_error():
    import flax.linen as nn

    from flax_attn import layers

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.Linear(2, name="fc")(x)

    sd = {"fc.weight": np.full((2, 3), 1e300), "fc.bias": np.zeros(2)}
    with pytest.raises(StateDictMismatchError, match=r"'fc.weight' holds finite float64 values that overflow"):
        from_torch(M(), sd, np.zeros((1, 3), np.float32))
    sd["fc.weight"] = np.full((2, 3), 0.5)  # representable float64 converts fine
    v = from_torch(M(), sd, np.zeros((1, 3), np.float32))
    assert v["params"]["fc"]["kernel"].dtype == np.float32


def test_bad_fused_in_proj_bias_is_reported_once():
    from flax_attn import MultiheadAttention

    m = MultiheadAttention(embed_dim=8, num_heads=2)
    t = torch.nn.MultiheadAttention(8, 2)
    sd = {k: v.detach().numpy() for k, v in t.state_dict().items()}
    sd["in_proj_bias"] = np.zeros(5, np.float32)
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(StateDictMismatchError) as err:
        from_torch(m, sd, x, x, x)
    assert len(err.value.report.mismatched) == 1 and str(err.value).count("in_proj_bias") == 1, str(err.value)
