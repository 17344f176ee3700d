"""Every catalogued block against its PyTorch reference: outputs, input gradients, BN statistics."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from flax_attn import catalogue  # noqa: E402
from flax_attn.testing.parity import FLOAT64_ATOL, check_parity, parity_dtype, run_parity  # noqa: E402

ENTRIES = [e for e in catalogue.entries() if e.torch is not None]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "entry", [pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.slow else []) for e in ENTRIES]
)
def test_parity(entry, train):
    if train and not entry.train_mode:
        pytest.skip(f"{entry.name} has no train-mode behaviour (no BatchNorm or active dropout)")
    check_parity(entry, train=train)


def test_catalogue_is_consistent():
    names = [e.name for e in catalogue.entries()]
    assert len(names) == len(set(names))
    for e in catalogue.entries():
        assert e.layouts, e.name
        assert e.family and e.paper, e.name
        assert set(e.float64_modes) <= {"eval", "train"}, e.name
        assert not e.float64_modes or e.conditioning, f"{e.name}: float64 parity without a measured reason"
        assert e.train_mode or "train" not in e.float64_modes, e.name


def test_float64_entries_are_chosen_from_the_catalogue():
    picked = {(e.name, m) for e in ENTRIES for m in e.float64_modes}
    assert ("se_resnet50", "train") in picked
    assert parity_dtype(catalogue.get("se_resnet50"), train=True) == "float64"
    assert parity_dtype(catalogue.get("se_resnet50"), train=False) == "float32"


def test_float64_parity_still_catches_a_wrong_formula(monkeypatch):
    # The float64 bound must not be so loose that a small slip passes: scale one Flax weight by
    # (1 + 1e-6), an error float32 parity at 1e-5 could never see, and the float64 check fails.
    import jax

    from flax_attn.testing import parity as parity_mod

    entry = catalogue.get("context_block")
    good = run_parity(entry, dtype="float64")
    assert good.passed, str(good)
    assert good.max_abs < FLOAT64_ATOL

    real = parity_mod.from_torch

    def nudged(module, sd, **kw):
        leaves, tree = jax.tree_util.tree_flatten(real(module, sd, **kw))
        leaves[0] = leaves[0] * (1 + 1e-6)
        return jax.tree_util.tree_unflatten(tree, leaves)

    monkeypatch.setattr(parity_mod, "from_torch", nudged)
    bad = run_parity(entry, dtype="float64")
    assert not bad.passed
    assert bad.max_abs > FLOAT64_ATOL
