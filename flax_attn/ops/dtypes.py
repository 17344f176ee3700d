"""The dtype rule every block follows.

* Compute dtype: the block's ``dtype`` attribute, or, when it is ``None``, the floating result type
  of the block's inputs (bf16 in, bf16 out; float32 and bf16 together give float32).
* Integer and bool inputs are refused with a ``TypeError`` naming the block and the argument:
  casting them silently into the weights' dtype (or the weights into theirs) gives zeros.
* The output is in the compute dtype.
* Softmax, normalisation and pooling statistics run in float32, or wider when the inputs are wider
  (float64 under ``jax_enable_x64``), never narrower: :func:`statistics_dtype`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

__all__ = ["compute_dtype", "statistics_dtype"]


def statistics_dtype(*dtypes: Any) -> jnp.dtype:
    """``float32``, or the inputs' floating result type when that is wider (``float64``)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def compute_dtype(where: str, dtype: Any, /, **inputs: Any) -> jnp.dtype:
    """The compute dtype of block ``where`` for its ``inputs`` (name -> array; ``None`` skipped).

    ``dtype`` wins when given; otherwise the inputs' floating result type. Raises ``TypeError``
    naming ``where`` and the argument when an input is not floating (integer or bool), whatever
    ``dtype`` is, so a block never casts integers into its weights' place.
    """
    found = []
    for name, value in inputs.items():
        if value is None:
            continue
        value_dtype = jnp.result_type(value) if not hasattr(value, "dtype") else value.dtype
        if not jnp.issubdtype(value_dtype, jnp.floating):
            raise TypeError(
                f"{where}: `{name}` must be a floating array (float32, bfloat16, ...), got dtype {value_dtype}; "
                f"cast it first, e.g. `{name}.astype(jnp.float32)`"
            )
        found.append(value_dtype)
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{where}: `dtype` must be a floating dtype or None, got {dtype}")
        return dtype
    if not found:
        raise ValueError(f"{where}: no input to take the compute dtype from; pass `dtype`")
    return jnp.dtype(jnp.result_type(*found))
