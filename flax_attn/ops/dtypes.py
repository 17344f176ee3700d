"""The dtype rule for statistics: softmax, normalisation and pooling statistics run in float32, or
wider when the inputs are wider (float64 under ``jax_enable_x64``), never narrower."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def statistics_dtype(*dtypes: Any) -> jnp.dtype:
    """``float32``, or the inputs' floating result type when that is wider (``float64``)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)
