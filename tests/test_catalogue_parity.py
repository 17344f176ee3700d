"""Every catalogued block against its PyTorch reference: outputs, input gradients, BN statistics."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from flax_attn import catalogue  # noqa: E402
from flax_attn.testing.parity import check_parity  # noqa: E402

ENTRIES = [e for e in catalogue.entries() if e.torch is not None]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("entry", [
    pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.slow else []) for e in ENTRIES])
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
