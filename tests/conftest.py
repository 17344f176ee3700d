"""Shared fixtures: paths to ../shared/data, skips for missing optional pieces."""

from __future__ import annotations

import os
from pathlib import Path

import jax
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


def pytest_collection_modifyitems(config, items):
    platform = jax.default_backend()
    for item in items:
        if "gpu" in item.keywords and platform != "gpu":
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU; JAX backend is {platform}"))
        if "tpu" in item.keywords and platform != "tpu":
            item.add_marker(pytest.mark.skip(reason=f"needs a TPU; JAX backend is {platform}"))
