"""Shared fixtures: paths to ../shared/data, skips for missing optional pieces."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FLAX_ATTN_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Parity runs in float32 at full precision (CPU default is already full precision; this pins it).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (released checkpoints, Set5); skips with a reason where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"released checkpoints not available: {SHARED_DATA} does not exist (a fresh clone has no ../shared)"
        )
    return SHARED_DATA


def _assert_bfloat16_close(module, x, rng: np.random.Generator) -> None:
    """``module`` with its variables perturbed (``0.05 * rng`` noise on ``init``'s) computes in
    bfloat16 (``clone(dtype=bfloat16)``, bfloat16 input) within 5e-2 of its float32 output."""
    v = module.init(jax.random.PRNGKey(0), x)
    v = jax.tree_util.tree_map(lambda a: a + 0.05 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), v)
    want = module.apply(v, x)
    got = module.clone(dtype=jnp.bfloat16).apply(v, x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)


@pytest.fixture
def assert_bfloat16_close():
    """The check a block's ``dtype=bfloat16`` test makes: ``assert_bfloat16_close(module, x, rng)``."""
    return _assert_bfloat16_close


def pytest_collection_modifyitems(config, items):
    platform = jax.default_backend()
    for item in items:
        if "gpu" in item.keywords and platform != "gpu":
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU; JAX backend is {platform}"))
        if "tpu" in item.keywords and platform != "tpu":
            item.add_marker(pytest.mark.skip(reason=f"needs a TPU; JAX backend is {platform}"))
