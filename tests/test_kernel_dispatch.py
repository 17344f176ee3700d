"""The verified-only resolver: ``implementation=None`` picks a kernel only where VERIFIED says so.

The platform the defaults are resolved for is forced with a monkeypatch (the kernels still run in
the interpreter on this CPU, because interpret mode follows the device that runs the call), so
these tests cover GPU and TPU dispatch without either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn import kernels
from flax_attn.acmix import ACmix, WindowAttention
from flax_attn.ccnet import CrissCrossAttention, RCCAModule
from flax_attn.kernels import _common
from flax_attn.ops import criss_cross_attention, neighborhood_attention, window_attention

_RECORD = kernels.VerifiedRecord(device="test device", jax_version=jax.__version__, date="2026-01-01")


# ids that are not the "gpu"/"tpu" markers (conftest skips tests carrying those keywords off-device)
@pytest.fixture(params=["gpu", "tpu"], ids=["as_gpu", "as_tpu"])
def platform(request, monkeypatch):
    monkeypatch.setattr(_common, "local_platform", lambda: request.param)
    return request.param


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _op_calls():
    """op name -> a function of no arguments calling the op with ``implementation=None``."""
    cc = _x((1, 5, 7, 4))
    na = _x((1, 6, 7, 1, 4))
    win = _x((1, 6, 6, 2, 4))
    return {
        "criss_cross": lambda: criss_cross_attention(cc, cc, cc),
        "neighborhood": lambda: neighborhood_attention(na, na, na, kernel_size=3),
        "window": lambda: window_attention(win, win, win, window_size=3, shift_size=1),
    }


def _blocks():
    """op name -> [(block, input)] of every block that runs that op."""
    return {
        "criss_cross": [
            (CrissCrossAttention(in_dim=8), _x((1, 5, 6, 8))),
            (RCCAModule(in_channels=32, out_channels=4, num_classes=3), _x((1, 5, 6, 32))),
        ],
        "neighborhood": [(ACmix(in_planes=8, out_planes=8, kernel_att=3, head=2), _x((1, 6, 7, 8)))],
        "window": [(WindowAttention(dim=8, window_size=3, num_heads=2, shift_size=1), _x((1, 6, 6, 8)))],
    }


def _uses_pallas(fn, *args) -> bool:
    # A fresh wrapper per trace: make_jaxpr caches traces by function, and the table is not part
    # of the cache key.
    return "pallas_call" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def _block_uses_pallas(block, x, **overrides) -> bool:
    block = block.clone(**overrides) if overrides else block
    variables = block.init(jax.random.PRNGKey(0), x)
    return _uses_pallas(lambda x: block.apply(variables, x), x)


def test_shipped_table_records_are_complete():
    for (op, platform), record in kernels.VERIFIED.items():
        assert op in kernels.OPS and platform in ("gpu", "tpu"), (op, platform)
        assert record.device and record.jax_version and record.date and record.results, record
        assert record.implementation in ("pallas", "cudnn"), record


@pytest.mark.parametrize("op", kernels.OPS)
def test_unverified_ops_resolve_to_xla(op, platform):
    assert kernels.default_implementation(op) == "xla"
    assert kernels.default_implementation(op, platform) == "xla"


def test_platform_names(monkeypatch):
    monkeypatch.setitem(kernels.VERIFIED, ("window", "gpu"), _RECORD)
    assert kernels.default_implementation("window", "cuda") == "pallas"
    assert kernels.default_implementation("window", "rocm") == "pallas"
    assert kernels.default_implementation("window", "tpu") == "xla"
    assert kernels.default_implementation("window", "cpu") == "xla"


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`op` must be one of \('criss_cross', .*\), got 'swin'"):
        kernels.default_implementation("swin")
    with pytest.raises(ValueError, match=r"`platform` must be one of \('cpu', 'gpu', 'tpu'\).*got 'metal'"):
        kernels.default_implementation("window", "metal")
    q = _x((1, 5, 7, 4))
    with pytest.raises(ValueError, match=r"criss_cross_attention: `implementation` must be one of .*got 'triton'"):
        criss_cross_attention(q, q, q, implementation="triton")


@pytest.mark.parametrize("op", ["criss_cross", "neighborhood", "window"])
def test_ops_follow_the_table(op, platform, monkeypatch):
    call = _op_calls()[op]
    assert not _uses_pallas(call)
    monkeypatch.setitem(kernels.VERIFIED, (op, platform), _RECORD)
    assert kernels.default_implementation(op) == "pallas"
    assert _uses_pallas(call)
    # A record for the other platform changes nothing here.
    monkeypatch.delitem(kernels.VERIFIED, (op, platform))
    monkeypatch.setitem(kernels.VERIFIED, (op, {"gpu": "tpu", "tpu": "gpu"}[platform]), _RECORD)
    assert not _uses_pallas(call)


@pytest.mark.parametrize("op", ["criss_cross", "neighborhood", "window"])
def test_blocks_follow_the_table(op, platform, monkeypatch):
    for block, x in _blocks()[op]:
        assert not _block_uses_pallas(block, x), type(block).__name__
    monkeypatch.setitem(kernels.VERIFIED, (op, platform), _RECORD)
    for block, x in _blocks()[op]:
        assert _block_uses_pallas(block, x), type(block).__name__
        assert not _block_uses_pallas(block, x, implementation="xla"), type(block).__name__


def test_verified_kernel_runs_with_the_forced_platforms_tiling(platform, monkeypatch):
    # The default backend follows the platform the defaults are resolved for (Mosaic TPU tiling
    # for "tpu"); the call still interprets because this device is a CPU.
    monkeypatch.setitem(kernels.VERIFIED, ("criss_cross", platform), _RECORD)
    q = _x((1, 5, 7, 4))
    np.testing.assert_allclose(
        criss_cross_attention(q, q, q), criss_cross_attention(q, q, q, implementation="xla"), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("op", ["criss_cross", "neighborhood", "window"])
def test_explicit_pallas_interprets_on_cpu(op):
    """Every kernel-backed block with implementation="pallas" runs (interpreted) and equals XLA."""
    for block, x in _blocks()[op]:
        pallas, xla = block.clone(implementation="pallas"), block.clone(implementation="xla")
        variables = xla.init(jax.random.PRNGKey(1), x)
        if "gamma" in variables["params"]:  # CCNet's residual gate starts at 0, which would hide the attention
            variables["params"]["gamma"] = jnp.ones_like(variables["params"]["gamma"])
        if "cca" in variables["params"]:
            variables["params"]["cca"]["gamma"] = jnp.ones_like(variables["params"]["cca"]["gamma"])
        out_p = pallas.apply(variables, x)
        out_x = xla.apply(variables, x)
        assert _uses_pallas(lambda x, m=pallas, v=variables: m.apply(v, x), x)
        np.testing.assert_allclose(np.asarray(out_p), np.asarray(out_x), atol=1e-5, rtol=1e-5)


def test_kernels_import_nothing_above_themselves():
    """Imports run one way, ops -> kernels: no kernel module imports flax_attn.ops or a block."""
    import ast
    from pathlib import Path

    for path in Path(kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.startswith("flax_attn"):
                    assert name.startswith("flax_attn.kernels"), f"{path.name} imports {name}"


def test_one_backend_vocabulary_and_block_sizes():
    q = _x((1, 6, 6, 1, 4))
    calls = {
        "criss_cross": lambda **kw: kernels.criss_cross_attention_pallas(
            q[..., 0, :], q[..., 0, :], q[..., 0, :], **kw
        ),
        "neighborhood": lambda **kw: kernels.neighborhood_attention_pallas(q, q, q, kernel_size=3, **kw),
        "window": lambda **kw: kernels.window_attention_pallas(q, q, q, window_size=3, **kw),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"`backend` must be one of \('triton', 'mosaic_tpu'\), got 'gpu'"):
            call(backend="gpu")
        with pytest.raises(ValueError, match=r"`block_sizes.block_\w+` is not used by this kernel"):
            call(
                block_sizes=kernels.BlockSizes(block_w=16)
                if name != "criss_cross"
                else kernels.BlockSizes(block_windows=2)
            )


def test_triton_lowering_missing_is_a_clear_error(monkeypatch):
    import sys

    from jax.experimental import pallas

    monkeypatch.delattr(pallas, "triton", raising=False)
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
    q = _x((1, 5, 7, 4))
    with pytest.raises(ValueError, match="no longer ships the Pallas Triton lowering.*use implementation='xla'"):
        kernels.criss_cross_attention_pallas(q, q, q, backend="triton", interpret=True)
