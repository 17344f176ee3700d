"""GCNet ContextBlock, coordinate attention, ECA and SPD-Conv: options, layouts, inits, the ops
behind them, and bad input. Default configurations in both modes: test_catalogue_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import ContextBlock, CoordAtt, ECALayer, SPDConv, catalogue  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.coordatt import h_sigmoid, h_swish  # noqa: E402
from flax_attn.ops import attention_pool2d, eca_kernel_size, space_to_depth  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref import coordatt as coord_ref  # noqa: E402
from flax_attn.testing.torch_ref import eca as eca_ref  # noqa: E402
from flax_attn.testing.torch_ref import gcnet as gc_ref  # noqa: E402
from flax_attn.testing.torch_ref import spd as spd_ref  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 13, 17, 32), dtype=np.float32)


def _init(m, x):
    return m.init(jax.random.PRNGKey(0), x)


def _sd(t):
    return {k: v.detach().numpy().copy() for k, v in t.state_dict().items()}


# --------------------------------------------------------------------------- GCNet


@pytest.mark.parametrize(
    "pooling_type,fusion_types",
    [
        ("att", ("channel_add",)),  # the official default
        ("att", ("channel_mul",)),
        ("avg", ("channel_add", "channel_mul")),
    ],
)
def test_context_block_options(pooling_type, fusion_types):
    check_parity(
        catalogue.get("context_block"),
        config=dict(inplanes=32, ratio=1 / 8, pooling_type=pooling_type, fusion_types=fusion_types),
    )


def test_context_block_layernorm_reshape_round_trip():
    t = gc_ref.ContextBlock(32, 1 / 4, "att", ("channel_add", "channel_mul"))
    randomize_torch_module(t)
    sd = _sd(t)
    assert sd["channel_add_conv.1.weight"].shape == (8, 1, 1)
    m = ContextBlock(32, 1 / 4, "att", ("channel_add", "channel_mul"))
    v = from_torch(m, sd, X)
    np.testing.assert_array_equal(v["params"]["channel_mul_conv_1"]["scale"], sd["channel_mul_conv.1.weight"][:, 0, 0])
    back = to_torch(m, v, X)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_context_block_official_init():
    m = ContextBlock(32, 1 / 4, "att", ("channel_add", "channel_mul"))
    v = _init(m, X)
    p = v["params"]
    for branch in ("channel_add_conv_3", "channel_mul_conv_3"):
        assert not np.any(p[branch]["kernel"]) and not np.any(p[branch]["bias"])
    # add term 0, mul term sigmoid(0) = 0.5: the fresh block is x * 0.5 + 0 as in the reference.
    np.testing.assert_allclose(m.apply(v, X), X * 0.5, rtol=1e-6)
    assert not np.any(p["conv_mask"]["bias"])
    std = float(np.std(p["conv_mask"]["kernel"]))
    assert 0.5 * np.sqrt(2 / 32) < std < 1.5 * np.sqrt(2 / 32)  # kaiming-normal fan_in


def test_attention_pool2d_is_softmax_weighted_mean():
    logits = RNG.standard_normal((3, 13, 17), dtype=np.float32)
    w = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
    w /= w.sum(axis=(1, 2), keepdims=True)
    want = np.einsum("bhw,bhwc->bc", w, X)
    got = attention_pool2d(jnp.asarray(X), jnp.asarray(logits))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"attention_pool2d: `logits` must have shape \(3, 13, 17\)"):
        attention_pool2d(jnp.asarray(X), jnp.asarray(logits[:, :5]))


def test_context_block_bad_inputs():
    with pytest.raises(ValueError, match=r"ContextBlock: `fusion_types` must be a non-empty subset"):
        _init(ContextBlock(32, 1 / 4, fusion_types=()), X)
    with pytest.raises(ValueError, match=r"ContextBlock: `fusion_types` must be a non-empty subset"):
        _init(ContextBlock(32, 1 / 4, fusion_types=("channel_cat",)), X)
    with pytest.raises(ValueError, match=r"ContextBlock: `pooling_type` must be 'avg' or 'att', got 'max'"):
        _init(ContextBlock(32, 1 / 4, pooling_type="max"), X)
    with pytest.raises(ValueError, match=r"ContextBlock: `inplanes`=32 \* `ratio`=0.01 gives 0 bottleneck"):
        _init(ContextBlock(32, 0.01), X)
    with pytest.raises(ValueError, match=r"ContextBlock: `x` must have 32 channels .*\(3, 13, 17, 16\)"):
        _init(ContextBlock(32, 1 / 4), X[..., :16])
    with pytest.raises(ValueError, match=r"ContextBlock: `x` must be 4-D"):
        _init(ContextBlock(32, 1 / 4), X[0])


# --------------------------------------------------------------------------- coordinate attention


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_coord_att_default_reduction(train):
    # reduction 32 on 32 channels: mip = max(8, 1) = 8, the official floor.
    check_parity(catalogue.get("coord_att"), config=dict(inp=32, oup=32), train=train)
    v = _init(CoordAtt(32, 32), X)
    assert v["params"]["conv1"]["kernel"].shape == (1, 1, 32, 8)


def test_coord_att_keys():
    sd = _sd(coord_ref.CoordAtt(32, 32, reduction=2))
    assert set(k.split(".")[0] for k in sd) == {"conv1", "bn1", "conv_h", "conv_w"}
    v = from_torch(CoordAtt(32, 32, reduction=2), sd, X)
    back = to_torch(CoordAtt(32, 32, reduction=2), v, X)
    assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}


def test_hard_activations_match_torch_relu6_forms():
    x = np.linspace(-5, 5, 2001, dtype=np.float32)
    x = np.concatenate([x, [-3.0, 3.0, 0.0]]).astype(np.float32)
    xt = torch.from_numpy(x)
    want_sigmoid = coord_ref.h_sigmoid()(xt.clone()).numpy()
    want_swish = coord_ref.h_swish()(xt.clone()).numpy()
    np.testing.assert_allclose(h_sigmoid(jnp.asarray(x)), want_sigmoid, rtol=0, atol=1e-7)
    np.testing.assert_allclose(h_swish(jnp.asarray(x)), want_swish, rtol=0, atol=1e-6)
    np.testing.assert_allclose(jax.nn.hard_swish(jnp.asarray(x)), want_swish, rtol=0, atol=1e-6)


def test_coord_att_bad_inputs():
    with pytest.raises(ValueError, match=r"CoordAtt: `x` must have 32 channels .*\(3, 13, 17, 16\)"):
        _init(CoordAtt(32, 32), X[..., :16])
    with pytest.raises(ValueError, match=r"CoordAtt: `oup`=16 gates cannot multiply the input of 32"):
        _init(CoordAtt(32, 16), X)
    with pytest.raises(ValueError, match=r"CoordAtt: `x` must be 4-D"):
        _init(CoordAtt(32, 32), X[0])


# --------------------------------------------------------------------------- ECA


@pytest.mark.parametrize("channels,k", [(16, 3), (32, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_adaptive_kernel_size(channels, k):
    assert eca_kernel_size(channels) == k == eca_ref.adaptive_k(channels)


@pytest.mark.parametrize("channels", [64, 128])
def test_eca_adaptive_parity(channels):
    x = RNG.standard_normal((3, 5, 7, channels), dtype=np.float32)
    check_parity(catalogue.get("eca"), config=dict(channel=channels, k_size=None), inputs={"x": x})


def test_eca_official_default_and_keys():
    check_parity(catalogue.get("eca"), config=dict(channel=32))
    sd = _sd(eca_ref.eca_layer(32))
    assert set(sd) == {"conv.weight"} and sd["conv.weight"].shape == (1, 1, 3)


def test_eca_bad_inputs():
    with pytest.raises(ValueError, match=r"ECALayer: `k_size` must be a positive odd number, got 4"):
        _init(ECALayer(32, 4), X)
    with pytest.raises(ValueError, match=r"ECALayer: `x` must have 64 channels .*\(3, 13, 17, 32\)"):
        _init(ECALayer(64), X)
    with pytest.raises(ValueError, match=r"ECALayer: `x` must be 4-D"):
        _init(ECALayer(32), X[0])


# --------------------------------------------------------------------------- SPD-Conv


def test_space_to_depth_official_order_not_pixel_unshuffle():
    x = RNG.standard_normal((2, 6, 10, 3), dtype=np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want = spd_ref.space_to_depth()(xt).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(space_to_depth(jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)
    unshuffled = torch.nn.functional.pixel_unshuffle(xt, 2).numpy().transpose(0, 2, 3, 1)
    assert not np.array_equal(got, unshuffled)
    # Same values, other channel order: pixel_unshuffle's c * 4 + 2 * dy + dx vs SPD's k * C + c
    # with k over (dy, dx) = (0, 0), (1, 0), (0, 1), (1, 1).
    c = x.shape[-1]
    perm = [ci * 4 + 2 * dy + dx for (dy, dx) in ((0, 0), (1, 0), (0, 1), (1, 1)) for ci in range(c)]
    np.testing.assert_array_equal(got, unshuffled[..., perm])


def test_space_to_depth_odd_sizes():
    with pytest.raises(ValueError, match=r"space_to_depth: `x` needs even height and width.*\(1, 7, 10, 3\)"):
        space_to_depth(jnp.zeros((1, 7, 10, 3)))
    with pytest.raises(ValueError, match=r"SPDConv: `x` needs even height and width.*\(3, 13, 17, 8\)"):
        _init(SPDConv(8, 16), X[..., :8])


@pytest.mark.parametrize(
    "config",
    [
        dict(c1=8, c2=16, k=1, act=False),
        dict(c1=8, c2=16, k=3, g=4, bn_eps=1e-3, bn_momentum=0.03),  # YOLOv5 model-level BN settings
    ],
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_spd_conv_options(config, train):
    check_parity(catalogue.get("spd_conv"), config=config, train=train)


def test_spd_conv_keys_are_yolo_conv():
    sd = _sd(spd_ref.SPDConv(8, 16))
    assert set(sd) == {
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert sd["conv.weight"].shape == (16, 32, 3, 3)


def test_spd_conv_bad_inputs():
    x = RNG.standard_normal((2, 6, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"SPDConv: `x` must have 4 channels .*\(2, 6, 8, 8\)"):
        _init(SPDConv(4, 16), x)
    with pytest.raises(ValueError, match=r"SPDConv: `g`=3 must divide"):
        _init(SPDConv(8, 16, g=3), x)
