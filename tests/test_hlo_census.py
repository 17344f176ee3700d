"""Structural census driven by the catalogue: no serial scatter in any train step that can avoid one.

Every catalogued block's jitted train-mode forward + backward is lowered (not compiled) and its
StableHLO searched for ``scatter`` and ``select_and_scatter``, which XLA:CPU and TPUs run as serial
loops. A block may keep such an op only if its entry declares it in ``allowed_hlo`` with the
reason; a new scatter anywhere fails here, and so does an allowance that is no longer needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn import catalogue
from flax_attn.testing.hlo import SERIAL_OPS, count_ops, serial_op_counts

ENTRIES = catalogue.entries()


def _grad_hlo(f, *args):
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)))).lower(*args).as_text()


def test_counter_sees_scatter_and_select_and_scatter():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 7, 3)), jnp.float32)
    gather_grad = _grad_hlo(lambda t: jnp.take(t, jnp.array([0, 2, 2, 5]), axis=1), x)
    pool_grad = _grad_hlo(
        lambda t: jax.lax.reduce_window(t, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID"), x
    )
    gather_counts, pool_counts = count_ops(gather_grad, SERIAL_OPS), count_ops(pool_grad, SERIAL_OPS)
    assert gather_counts["stablehlo.scatter"] >= 1 and gather_counts["stablehlo.select_and_scatter"] == 0
    assert pool_counts == {"stablehlo.scatter": 0, "stablehlo.select_and_scatter": 1}
    # Both printed forms of an op name count; longer names that merely contain it do not.
    text = (
        '%0 = "stablehlo.scatter"(%a) <{dims = #stablehlo.scatter<update_window_dims = [3]>}> '
        '%1 = stablehlo.scatter %b "stablehlo.scatter_like"(%c)'
    )
    assert count_ops(text, ["stablehlo.scatter"]) == {"stablehlo.scatter": 2}


def test_allowances_name_a_serial_op_and_a_reason():
    for e in ENTRIES:
        for op, reason in e.allowed_hlo.items():
            assert op in SERIAL_OPS, f"{e.name}: allowed_hlo names {op!r}, not one of {SERIAL_OPS}"
            assert op != "stablehlo.select_and_scatter", (
                f"{e.name}: select_and_scatter (a max-pool gradient) is never allowed; use ops.max_pool"
            )
            assert isinstance(reason, str) and len(reason.split()) >= 3, (
                f"{e.name}: the allowance for {op} needs a reason, got {reason!r}"
            )


@pytest.mark.parametrize(
    "entry", [pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.slow else []) for e in ENTRIES]
)
def test_train_step_has_no_undeclared_serial_op(entry):
    found = serial_op_counts(entry)
    undeclared = {op: n for op, n in found.items() if op not in entry.allowed_hlo}
    assert not undeclared, (
        f"{entry.name}: the jitted train-mode forward+backward lowers to {undeclared}, which its catalogue "
        f"entry does not allow (allowed_hlo={dict(entry.allowed_hlo)}). Find the gather or reduce_window "
        "whose transpose this is and use a dense form (static slices, pads, a matmul, ops.max_pool)."
    )
    stale = sorted(set(entry.allowed_hlo) - set(found))
    assert not stale, f"{entry.name}: allowed_hlo lists {stale}, which no longer occur; remove the allowance"
