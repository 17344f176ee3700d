"""DANet: PAM/CAM conditioning, zero-gamma identity, Dropout2d, the head's tuple, round trips, bad input."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import catalogue  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.danet import CAM_Module, DANetHead, PAM_Module  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref import danet as ref  # noqa: E402


def _x(shape, scale=1.0, seed=0):
    return {"x": scale * np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)}


def test_cam_float32_exact_when_well_conditioned():
    # Energies ~ N * scale^2 = 2.2: float32 rounding no longer dominates, so the strict tolerance holds.
    check_parity(catalogue.get("cam"), inputs=_x((3, 13, 17, 12), scale=0.1), atol=1e-5, rtol=1e-5)


def test_pam_other_shapes():
    check_parity(catalogue.get("pam"), config=dict(in_dim=24), inputs=_x((2, 1, 19, 24)))


@pytest.mark.parametrize("cls", [PAM_Module, CAM_Module])
def test_zero_gamma_is_identity(cls):
    x = jnp.asarray(_x((2, 5, 7, 16))["x"])
    m = cls(16)
    v = m.init(jax.random.PRNGKey(0), x)
    assert v["params"]["gamma"].shape == (1,) and float(v["params"]["gamma"][0]) == 0.0
    np.testing.assert_array_equal(m.apply(v, x), x)


def test_head_returns_official_tuple_and_round_trips():
    t = ref.danet_head(64, 5)
    randomize_torch_module(t)
    sd = {k: v.numpy() for k, v in t.state_dict().items() if not k.endswith("num_batches_tracked")}
    head = DANetHead(64, 5)
    x = jnp.ones((1, 5, 6, 64))
    variables = from_torch(head, sd, x)
    back = to_torch(head, variables, x)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    out = head.apply(variables, x)
    assert isinstance(out, tuple) and len(out) == 3


def test_head_dropout2d_drops_whole_channels():
    """Identity classifiers: train-mode outputs are the features times 0 or 1/(1-p) per (sample, channel)."""
    x = jnp.asarray(_x((4, 6, 7, 64))["x"])
    p = 0.5
    head_p, head_0 = DANetHead(64, 16, dropout=p), DANetHead(64, 16, dropout=0.0)
    variables = head_p.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x)
    params = flax.core.unfreeze(variables["params"])
    for name in ("conv6_1", "conv7_1", "conv8_1"):
        params[name] = {"kernel": jnp.eye(16)[None, None], "bias": jnp.zeros(16)}
    variables = {**variables, "params": params}

    def run(m):
        return m.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(3)})[0]

    dropped, kept = run(head_p), run(head_0)
    for d, k in zip(dropped, kept):
        k = np.asarray(k)
        # ReLU zeros carry no information about the mask: leave them out.
        ratio = np.where(k == 0, np.nan, np.asarray(d) / np.where(k == 0, 1.0, k))
        per_channel = np.nanmean(ratio, axis=(1, 2))
        assert set(np.round(np.unique(per_channel), 5)) <= {0.0, 2.0}
        np.testing.assert_allclose(
            np.nan_to_num(ratio, nan=0.0),
            np.where(np.isnan(ratio), 0.0, per_channel[:, None, None, :]),
            atol=1e-5,
        )
        assert 0 < (per_channel == 0).mean() < 1


def test_bad_input():
    k = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"PAM_Module: `in_dim`=4 must be at least 8"):
        PAM_Module(4).init(k, jnp.ones((1, 3, 3, 4)))
    with pytest.raises(ValueError, match=r"PAM_Module: `x` must have 16 channels.*\(1, 3, 3, 8\)"):
        PAM_Module(16).init(k, jnp.ones((1, 3, 3, 8)))
    with pytest.raises(ValueError, match=r"CAM_Module: `x` must be 4-D"):
        CAM_Module(8).init(k, jnp.ones((1, 9, 8)))
    with pytest.raises(ValueError, match=r"DANetHead: `in_channels`=16 must be at least 32"):
        DANetHead(16, 3).init(k, jnp.ones((1, 3, 3, 16)))
    with pytest.raises(ValueError, match=r"DANetHead: `x` must have 64 channels"):
        DANetHead(64, 3).init(k, jnp.ones((1, 3, 3, 32)))
