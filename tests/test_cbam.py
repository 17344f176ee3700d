"""CBAM: official options (no_spatial, pool types), the seed variants, ChannelPool order, round
trips and bad input. Default CBAM/seed blocks in both modes: test_catalogue_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import CBAM, ChannelAttention, ChannelGate, SpatialAttention, catalogue  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.ops import channel_pool  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref import cbam as ref  # noqa: E402

X = np.random.default_rng(0).standard_normal((3, 13, 17, 32), dtype=np.float32)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_no_spatial(train):
    check_parity(catalogue.get("cbam"), config=dict(gate_channels=32, reduction_ratio=4, no_spatial=True), train=train)


@pytest.mark.parametrize("pool_types", [("avg",), ("max", "avg"), ("avg", "max", "lp", "lse")])
def test_pool_types(pool_types):
    check_parity(catalogue.get("cbam"), config=dict(gate_channels=32, reduction_ratio=8, pool_types=pool_types))


def test_seed_spatial_attention_7x7():
    check_parity(catalogue.get("cbam_spatial_attention_seed"), config=dict(kernel_size=7))


def test_official_keys_and_round_trip():
    t = ref.CBAM(32, 4)
    randomize_torch_module(t)
    sd = {k: v.detach().numpy().copy() for k, v in t.state_dict().items()}
    assert {
        "ChannelGate.mlp.1.weight",
        "ChannelGate.mlp.3.bias",
        "SpatialGate.spatial.conv.weight",
        "SpatialGate.spatial.bn.running_var",
    } <= set(sd)
    assert "SpatialGate.spatial.conv.bias" not in sd  # BasicConv(bias=False)
    v = from_torch(CBAM(32, 4), sd, X)
    back = to_torch(CBAM(32, 4), v, X)
    assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
    for k, a in back.items():
        np.testing.assert_array_equal(a, sd[k])


def test_spatial_gate_bn_momentum_is_official():
    # BasicConv's BatchNorm2d(momentum=0.01): one train step moves the running mean 1% of the way.
    m = CBAM(32, 4)
    v = m.init(jax.random.PRNGKey(0), X)
    _, state = m.apply(v, X, train=True, mutable=["batch_stats"])
    new = state["batch_stats"]["SpatialGate"]["spatial"]["bn"]["mean"]
    old = v["batch_stats"]["SpatialGate"]["spatial"]["bn"]["mean"]
    assert np.all(np.asarray(old) == 0.0)
    t = ref.CBAM(32, 4)
    t.load_state_dict({k: torch.from_numpy(np.array(a)) for k, a in to_torch(m, v, X).items()}, strict=False)
    t.train()
    t(torch.from_numpy(X.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(new), t.SpatialGate.spatial.bn.running_mean.numpy(), rtol=1e-5, atol=1e-7)
    assert t.SpatialGate.spatial.bn.momentum == 0.01


def test_channel_pool_order():
    x = jnp.asarray(X)
    official = channel_pool(x, ("max", "mean"))
    np.testing.assert_array_equal(official[..., 0], X.max(-1))
    np.testing.assert_allclose(official[..., 1], X.mean(-1), rtol=1e-6, atol=1e-6)
    seed = channel_pool(x, ("mean", "max"))
    np.testing.assert_array_equal(seed[..., ::-1], official)
    # The order matters to the conv that follows: the official gate with its weights read in the
    # seed's order gives a different answer.
    t = ref.SpatialGate()
    randomize_torch_module(t)
    t.eval()
    xt = torch.from_numpy(X.transpose(0, 3, 1, 2))
    swapped = torch.cat([torch.mean(xt, 1, keepdim=True), torch.max(xt, 1)[0].unsqueeze(1)], 1)
    assert not torch.allclose(t.spatial(t.compress(xt)), t.spatial(swapped), atol=1e-3)


def test_seed_channel_attention_keys():
    sd = {k: v.detach().numpy() for k, v in ref.ChannelAttention(32, 4).state_dict().items()}
    assert set(sd) == {"fc1.0.weight", "fc1.2.weight"}
    v = from_torch(ChannelAttention(32, 4), sd, X)
    np.testing.assert_array_equal(v["params"]["fc1_0"]["kernel"], sd["fc1.0.weight"][:, :, 0, 0].T)


def _init(m, x):
    return m.init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize(
    "module,x,match",
    [
        pytest.param(
            CBAM(32, 4), X[..., :16], r"ChannelGate: `x` must have 32 channels.*\(3, 13, 17, 16\)", id="channels"
        ),
        pytest.param(CBAM(32, 4), X[0], r"CBAM: `x` must be 4-D .*\(13, 17, 32\)", id="rank"),
        pytest.param(
            CBAM(32, 5), X, r"ChannelGate: `gate_channels`=32 must be .*`reduction_ratio`=5", id="gate_reduction"
        ),
        pytest.param(
            CBAM(32, 64), X, r"`gate_channels`=32 must be .*`reduction_ratio`=64", id="gate_reduction_too_large"
        ),
        pytest.param(
            ChannelGate(32, 4, pool_types=("avg", "median")),
            X,
            r"ChannelGate: `pool_types` must be a non-empty subset",
            id="pool_types",
        ),
        pytest.param(ChannelAttention(32, 3), X, r"ChannelAttention: `channel`=32 must be .*`rate`=3", id="seed_rate"),
        pytest.param(
            SpatialAttention(5), X, r"SpatialAttention: `kernel_size` must be 3 or 7, got 5", id="seed_kernel_size"
        ),
    ],
)
def test_bad_inputs(module, x, match):
    with pytest.raises(ValueError, match=match):
        _init(module, x)
