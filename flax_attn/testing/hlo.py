"""Which StableHLO ops a catalogued block's train step lowers to (the structural census).

``train_step_hlo(entry)`` lowers, without compiling or running anything, the jitted train-mode
forward and backward of ``entry``'s Flax block: the gradient of ``sum(outputs)`` with respect to
every parameter and every floating input, with BatchNorm in batch-statistics mode and dropout
active. Variables and inputs are abstract (``jax.eval_shape``), so a whole network lowers in about
a second. ``count_ops`` then counts op names in the text; ``SERIAL_OPS`` are the ones that run as
serial loops on XLA:CPU and among the slowest on TPU, and that a block may keep only where its math
is data-dependent sampling (``Entry.allowed_hlo`` says which and why).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.catalogue import Entry
from flax_attn.testing.parity import apply_entry

__all__ = ["SERIAL_OPS", "count_ops", "serial_op_counts", "train_step_hlo"]

SERIAL_OPS = ("stablehlo.scatter", "stablehlo.select_and_scatter")


def train_step_hlo(entry: Entry, config: Mapping | None = None, seed: int = 0) -> str:
    """StableHLO text of ``entry``'s jitted train-mode forward + backward (lowered, not compiled)."""
    inputs = {k: np.asarray(v) for k, v in entry.make_inputs(np.random.default_rng(seed), config).items()}
    kwargs = entry.flax_kwargs  # call_kwargs, and method=flax_call when the entry has one
    module = entry.build_flax(config)
    float_names = [k for k, v in inputs.items() if np.issubdtype(v.dtype, np.floating)]
    fixed = {k: jnp.asarray(v) for k, v in inputs.items() if k not in float_names}
    floats = {k: jax.ShapeDtypeStruct(inputs[k].shape, inputs[k].dtype) for k in float_names}
    rngs = {"params": jax.random.PRNGKey(seed), "dropout": jax.random.PRNGKey(seed + 1)}
    variables = jax.eval_shape(
        lambda f: module.init(rngs, **fixed, **f, **kwargs, train=False),
        floats,
    )

    def loss(params, variables, float_inputs):
        variables = {**variables, "params": params} if params else variables
        out, _ = apply_entry(entry, module, variables, {**fixed, **float_inputs}, train=True, seed=seed)
        return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree_util.tree_leaves(out) if o is not None)

    def step(variables, float_inputs):
        return jax.grad(loss, argnums=(0, 2))(variables.get("params", {}), variables, float_inputs)

    return jax.jit(step).lower(variables, floats).as_text()


def count_ops(text: str, names: Iterable[str]) -> dict[str, int]:
    """How often each op ``name`` (``"stablehlo.scatter"``) occurs in StableHLO ``text``.

    Matches the op name as a whole word in both the pretty (``stablehlo.scatter``) and the generic
    (``"stablehlo.scatter"(...)``) printed forms, but not inside longer names
    (``stablehlo.select_and_scatter``) nor as an attribute (``#stablehlo.scatter<...>``, the
    dimension numbers every scatter op carries).
    """
    return {n: len(re.findall(rf"(?<![\w.#]){re.escape(n)}(?![\w.<])", text)) for n in names}


def serial_op_counts(entry: Entry, config: Mapping | None = None) -> dict[str, int]:
    """:data:`SERIAL_OPS` present in ``entry``'s train step, with their counts (absent ops left out)."""
    counts = count_ops(train_step_hlo(entry, config), SERIAL_OPS)
    return {k: v for k, v in counts.items() if v}
