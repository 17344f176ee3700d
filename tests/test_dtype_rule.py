"""The one dtype rule (``flax_attn.ops.dtypes``), checked on every catalogued block.

Compute in ``dtype``, or in the inputs' floating result type when ``dtype`` is ``None``; every
floating output is in the compute dtype; integer input is refused with a ``TypeError`` naming the
block. Output dtypes are fixed at trace time, so ``jax.eval_shape`` of ``init_with_output`` (one
abstract trace per entry and mode, nothing compiled or run) checks exactly what a jitted call would
return, in a fraction of the time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn import catalogue, layers
from flax_attn.ops.dtypes import compute_dtype

ENTRIES = [e for e in catalogue.entries() if not e.slow]

# (constructor dtype, dtype of the floating inputs, expected compute dtype)
MODES = {
    "f32": (None, jnp.float32, jnp.float32),
    "bf16_dtype_f32_inputs": (jnp.bfloat16, jnp.float32, jnp.bfloat16),
    "bf16_inputs": (None, jnp.bfloat16, jnp.bfloat16),
}


def _float_names(inputs):
    return [k for k, v in inputs.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def _trace(entry, dtype, inputs):
    config = dict(entry.config)
    if dtype is not None:
        config["dtype"] = dtype
    module = entry.build_flax(config)
    kwargs = entry.flax_kwargs  # call_kwargs, and method=flax_call where the entry has one

    def init_and_apply(inputs):
        return module.init_with_output(
            {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, **inputs, **kwargs, train=False
        )

    return module, jax.eval_shape(init_and_apply, inputs)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_outputs_are_in_the_compute_dtype(entry, mode):
    dtype, input_dtype, want = MODES[mode]
    raw = entry.make_inputs(np.random.default_rng(0))
    # Position encodings read only the shape of an (integer) ``x``; cast it to give the dtype.
    floats = _float_names(raw) or [k for k, v in raw.items() if np.asarray(v).dtype != bool]
    inputs = {k: (jnp.asarray(v, input_dtype) if k in floats else jnp.asarray(v)) for k, v in raw.items()}
    _, (out, variables) = _trace(entry, dtype, inputs)
    leaves = [o for o in jax.tree_util.tree_leaves(out) if jnp.issubdtype(o.dtype, jnp.floating)]
    assert leaves, f"{entry.name}: no floating output"
    got = sorted({str(o.dtype) for o in leaves})
    assert got == [str(jnp.dtype(want))], f"{entry.name} ({mode}): outputs {got}, want {jnp.dtype(want)}"
    # Parameters stay in param_dtype (float32) whatever the compute dtype.
    params = jax.tree_util.tree_leaves(variables.get("params", {}))
    assert all(p.dtype == jnp.float32 for p in params), f"{entry.name}: params {sorted({str(p.dtype) for p in params})}"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_integer_input_is_refused_naming_the_block(entry):
    raw = entry.make_inputs(np.random.default_rng(0))
    floats = _float_names(raw)
    if not floats:
        pytest.skip(f"{entry.name} takes no floating input")
    name = floats[0]
    inputs = {k: jnp.asarray(v) for k, v in raw.items()}
    inputs[name] = jnp.asarray(np.round(raw[name] * 3), jnp.int32)
    cls = type(entry.build_flax())
    block, argument = cls.__name__, name
    if entry.flax_call is not None:
        # The catalogue's by-scale adapters (``cost0, cost1, ...``) pass a list to the block,
        # which names itself and the list entry (``cost_volume[0]``).
        argument = r"\w+\[0\]"
    with pytest.raises(TypeError, match=rf"^{block}: `{argument}` must be a floating array.*int32"):
        _trace(entry, None, inputs)


def test_compute_dtype_rule():
    f32, bf16 = jnp.ones(2, jnp.float32), jnp.ones(2, jnp.bfloat16)
    assert compute_dtype("B", None, x=bf16) == jnp.bfloat16
    assert compute_dtype("B", None, x=bf16, y=f32) == jnp.float32
    assert compute_dtype("B", jnp.bfloat16, x=f32) == jnp.bfloat16
    assert compute_dtype("B", None, x=f32, mask=None) == jnp.float32
    with pytest.raises(TypeError, match=r"B: `y` must be a floating array.*bool"):
        compute_dtype("B", jnp.float32, x=f32, y=jnp.ones(2, bool))
    with pytest.raises(TypeError, match=r"B: `dtype` must be a floating dtype or None, got int32"):
        compute_dtype("B", jnp.int32, x=f32)


@pytest.mark.parametrize(
    "layer, x",
    [
        (lambda: layers.Conv(4, 3, padding=1, name="conv"), jnp.ones((1, 5, 5, 2), jnp.int32)),
        (lambda: layers.Linear(4, name="fc"), jnp.ones((2, 3), jnp.int32)),
        (lambda: layers.BatchNorm(name="bn"), jnp.ones((2, 3), jnp.int32)),
    ],
    ids=["conv", "linear", "batchnorm"],
)
def test_layers_refuse_integer_input(layer, x):
    # Before the rule, Conv and Linear cast their weights to int32 and returned zeros.
    module = layer()
    with pytest.raises(TypeError, match=rf"{type(module).__name__}\({module.name}\): `x` must be a floating array"):
        module.init(jax.random.PRNGKey(0), x)
