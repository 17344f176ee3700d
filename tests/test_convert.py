"""Converter engine and checkpoint I/O: round trips, strict errors, unsafe pickles, file formats."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import flax.linen as nn
import jax
import numpy as np
import pytest

from flax_attn import layers
from flax_attn.convert import (
    Ignore,
    LinearFromNCHW,
    Rename,
    Reshape,
    StateDictMismatchError,
    UnsafeCheckpointError,
    from_torch,
    load_state_dict,
    load_variables,
    mapping,
    save_state_dict,
    save_variables,
    to_torch,
)
from flax_attn.convert.io import atomic_write_bytes

torch = pytest.importorskip("torch")
tnn = torch.nn


class Inner(nn.Module):
    """A child with its own rename table: fc_0/fc_2 <-> fc.0/fc.2 and a LayerNorm over [C, 1, 1]."""

    @nn.nowrap
    def torch_rules(self, layout):
        return [
            Rename(r"fc_(\d+)\.(.*)", r"fc.\1.\2"),
            Rename(r"ln\.(weight|bias)", r"ln.\1", Reshape((6, 1, 1), (6,))),
            Ignore(r"\.cache$"),
        ]

    @nn.compact
    def __call__(self, x):
        x = layers.Linear(6, name="fc_0")(x)
        x = layers.LayerNorm(name="ln")(x)
        x = layers.Linear(6, use_bias=False, name="fc_2")(x)
        return x * self.param("gamma", nn.initializers.zeros, (1,))


class Outer(nn.Module):
    torch_layouts: ClassVar[tuple[str, ...]] = ("official", "alt")

    @nn.nowrap
    def torch_rules(self, layout):
        prefix = "blocks" if layout in (None, "official") else "stages"
        return [Rename(r"blocks_(\d+)\.(.*)", prefix + r".\1.\2")]

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = layers.Conv(6, 3, padding=1, name="conv")(x)
        x = layers.BatchNorm(name="bn")(x, train=train)
        x = x.mean(axis=(1, 2))
        for i in range(2):
            x = Inner(name=f"blocks_{i}")(x)
        return x


class TorchInner(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc = tnn.Sequential(tnn.Linear(6, 6), tnn.ReLU(), tnn.Linear(6, 6, bias=False))
        self.ln = tnn.LayerNorm([6, 1, 1])
        self.gamma = tnn.Parameter(torch.randn(1))
        self.register_buffer("cache", torch.zeros(3))


class TorchOuter(tnn.Module):
    def __init__(self, name="blocks"):
        super().__init__()
        self.conv = tnn.Conv2d(5, 6, 3, padding=1)
        self.bn = tnn.BatchNorm2d(6)
        setattr(self, name, tnn.ModuleList([TorchInner(), TorchInner()]))


X = np.zeros((2, 7, 9, 5), np.float32)


def _sd(name="blocks"):
    torch.manual_seed(0)
    m = TorchOuter(name)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2)
    return {k: v.numpy().copy() for k, v in m.state_dict().items()}


def test_mapping_composes_nested_rename_tables():
    table = mapping(Outer(), X)
    assert table["params/conv/kernel"] == "conv.weight"
    assert table["batch_stats/bn/var"] == "bn.running_var"
    assert table["params/blocks_1/fc_0/kernel"] == "blocks.1.fc.0.weight"
    assert table["params/blocks_0/ln/scale"] == "blocks.0.ln.weight"
    assert table["params/blocks_0/gamma"] == "blocks.0.gamma"
    assert mapping(Outer(), X, layout="alt")["params/blocks_1/fc_2/kernel"] == "stages.1.fc.2.weight"


@pytest.mark.parametrize("layout,name", [(None, "blocks"), ("alt", "stages")])
def test_round_trip_is_exact(layout, name):
    sd = _sd(name)
    v = from_torch(Outer(), sd, X, layout=layout)
    assert v["params"]["conv"]["kernel"].shape == (3, 3, 5, 6)
    np.testing.assert_array_equal(v["params"]["conv"]["kernel"], sd["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["params"]["blocks_0"]["fc_0"]["kernel"], sd[f"{name}.0.fc.0.weight"].T)
    back = to_torch(Outer(), v, X, layout=layout)
    expected = {k: a for k, a in sd.items() if not k.endswith(("num_batches_tracked", "cache"))}
    assert sorted(back) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(back[k], expected[k], err_msg=k)
        assert back[k].shape == expected[k].shape
    # and the other way: Flax -> torch -> Flax
    v2 = from_torch(Outer(), back, X, layout=layout)
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(v2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_strict_lists_every_problem_in_one_error():
    sd = _sd()
    del sd["blocks.0.fc.0.bias"]  # missing
    sd["blocks.1.extra.weight"] = np.zeros((2, 2), np.float32)  # unexpected
    sd["conv.weight"] = np.zeros((6, 4, 3, 3), np.float32)  # shape mismatch
    sd["bn.running_mean"] = np.zeros((6,), np.int64)  # non-float
    with pytest.raises(StateDictMismatchError) as info:
        from_torch(Outer(), sd, X)
    msg = str(info.value)
    assert "4 problems" in msg
    assert (
        "missing torch key 'blocks.0.fc.0.bias' (expected torch shape (6,)) for Flax params/blocks_0/fc_0/bias" in msg
    )
    assert "unexpected torch key 'blocks.1.extra.weight' with shape (2, 2)" in msg
    assert (
        "torch 'conv.weight' has shape (6, 4, 3, 3), expected (6, 5, 3, 3) for Flax params/conv/kernel "
        "of shape (3, 3, 5, 6)"
    ) in msg
    assert "torch 'bn.running_mean' has non-float dtype int64" in msg
    variables, report = from_torch(Outer(), sd, X, strict=False)
    assert not report.ok and len(report.missing) == 1 and len(report.unexpected) == 1
    assert variables["params"]["blocks_0"]["fc_0"]["bias"].shape == (6,)  # filled from a fresh init


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match=r"unknown layout 'timm'; supported layouts: \['official', 'alt'\]"):
        from_torch(Outer(), _sd(), X, layout="timm")


def test_linear_from_nchw_transform_matches_torch_flatten():
    rng = np.random.default_rng(0)
    c, h, w, out = 3, 4, 5, 7
    weight = rng.standard_normal((out, c * h * w)).astype(np.float32)
    feats = rng.standard_normal((2, c, h, w)).astype(np.float32)
    t = LinearFromNCHW(c, h, w)
    kernel = t.to_flax(weight)
    want = feats.reshape(2, -1) @ weight.T
    got = feats.transpose(0, 2, 3, 1).reshape(2, -1) @ kernel
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(t.to_torch(kernel), weight)


# ------------------------------------------------------------------ files


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/flax_attn_pwned_marker")


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain_pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, fmt):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    payload = {"weight": torch.zeros(2), "evil": Exploit()}
    if fmt == "plain_pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=(fmt == "zip"))
    assert not MARKER.exists()
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_state_dict(path)
    assert not MARKER.exists(), "loading executed code from the checkpoint"


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, w=np.array([Exploit()], dtype=object))
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(path)
    assert not MARKER.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_formats_prefix_and_wrapping(tmp_path, fmt):
    sd = {
        "module.a.weight": torch.randn(3, 2),
        "module.a.bias": torch.randn(3),
        "module.h": torch.randn(2, dtype=torch.bfloat16),
    }
    path = tmp_path / "ckpt.pth.tar"
    torch.save(
        {"model_state": sd, "epoch": 25, "best_valid_acc": 98.4}, path, _use_new_zipfile_serialization=(fmt == "zip")
    )
    out = load_state_dict(path)
    assert sorted(out) == ["a.bias", "a.weight", "h"]
    np.testing.assert_array_equal(out["a.weight"], sd["module.a.weight"].numpy())
    assert out["h"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(out["h"].astype(np.float32), sd["module.h"].float().numpy())
    assert sorted(load_state_dict(path, key="model_state", strip_prefix="module.a.")) == ["bias", "module.h", "weight"]
    with pytest.raises(
        ValueError, match=r"key 'nope' not found; top-level keys: \['best_valid_acc', 'epoch', 'model_state'\]"
    ):
        load_state_dict(path, key="nope")


def test_safetensors_and_npz_round_trip(tmp_path):
    import ml_dtypes

    sd = {
        "a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.ones(4, np.float16),
        "c": np.array([1.5, -2], dtype=ml_dtypes.bfloat16),
        "n": np.array(3, np.int64),
    }
    for suffix in (".safetensors", ".npz", ".pth"):
        path = tmp_path / f"w{suffix}"
        save_state_dict(sd, path)
        back = load_state_dict(path)
        assert sorted(back) == sorted(sd)
        for k in sd:
            assert back[k].dtype == sd[k].dtype, (suffix, k)
            np.testing.assert_array_equal(back[k].astype(np.float64), sd[k].astype(np.float64))


def test_safetensors_reader_matches_reference_writer_and_needs_no_torch(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "ref.safetensors"
    st.save_file({"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.ones(2, np.int32)}, str(path))
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from flax_attn.convert import load_state_dict\n"
        f"sd = load_state_dict({str(path)!r})\n"
        "assert sd['x'].shape == (3, 4) and sd['x'][2, 3] == 11 and sd['y'].dtype.name == 'int32'\n"
        "print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_atomic_write_keeps_the_last_good_file(tmp_path, monkeypatch):
    path = tmp_path / "vars.msgpack"
    save_variables({"params": {"w": np.ones(3, np.float32)}}, path)
    good = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"half-written garbage")
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["vars.msgpack"]  # no temp file left behind
    np.testing.assert_array_equal(load_variables(path)["params"]["w"], np.ones(3))


def test_save_variables_orbax_directory(tmp_path):
    v = {"params": {"w": np.arange(4, dtype=np.float32)}}
    save_variables(v, tmp_path / "ckpt")
    save_variables({"params": {"w": np.zeros(4, np.float32)}}, tmp_path / "ckpt")  # overwrite in place
    np.testing.assert_array_equal(np.asarray(load_variables(tmp_path / "ckpt")["params"]["w"]), np.zeros(4))


def test_example_inputs_may_be_shape_dtype_structs():
    spec = jax.ShapeDtypeStruct(X.shape, np.float32)
    v = from_torch(Outer(), _sd(), spec)
    assert v["params"]["conv"]["kernel"].shape == (3, 3, 5, 6)
    assert mapping(Outer(), spec)["params/blocks_0/fc_0/kernel"] == "blocks.0.fc.0.weight"
