"""SE family: layouts of the SE layer (official Linear, seed 1x1 conv, timm), timm's SE module and
SE-ResNets (through the torchvision import shim), senet.pytorch's SE-ResNet layout, round trips and
bad input. Outputs/gradients of every catalogued SE block in both modes: test_catalogue_parity.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import SEBasicBlock, SEBottleneck, SELayer, catalogue, se_resnet18, se_resnet34, se_resnet50  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.se import make_divisible  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.timm_shim import import_timm  # noqa: E402
from flax_attn.testing.torch_ref import se as ref  # noqa: E402

X = np.random.default_rng(0).standard_normal((3, 13, 17, 32), dtype=np.float32)


def _timm():
    timm = import_timm()
    if timm is None:
        pytest.skip("timm is not installed")
    return timm


def _sd(module):
    # Copies: numpy views of torch buffers would follow their in-place BatchNorm updates.
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def test_se_layer_conv_layout_parity():
    # The seed's 1x1-conv SE (fc1.0/fc1.2, weights (out, in, 1, 1)) into the same Flax module.
    entry = dataclasses.replace(catalogue.get("se_layer"), torch="flax_attn.testing.torch_ref.se:SELayerConv")
    check_parity(entry, layout="conv")


def test_se_layer_conv_layout_keys():
    sd = _sd(ref.SELayerConv(32, 4))
    assert set(sd) == {"fc1.0.weight", "fc1.2.weight"}
    variables = from_torch(SELayer(32, 4), sd, X, layout="conv")
    assert variables["params"]["fc_0"]["kernel"].shape == (32, 8)
    np.testing.assert_array_equal(variables["params"]["fc_0"]["kernel"], sd["fc1.0.weight"][:, :, 0, 0].T)


@pytest.mark.parametrize("train", [False, True])
def test_se_layer_matches_timm_se_module(train):
    _timm()
    entry = dataclasses.replace(catalogue.get("se_layer"), torch="flax_attn.testing.torch_ref.se:timm_se_module")
    check_parity(entry, config=dict(channel=32, reduction=4, se_style="timm"), layout="timm", train=train)


@pytest.mark.parametrize("channels", [16, 24, 64, 72, 200, 256, 2048])
def test_timm_hidden_width(channels):
    # timm rounds C / 16 to a multiple of 8 (at least 8); the Flax layer must build the same shapes.
    _timm()
    from timm.layers.squeeze_excite import SEModule

    t = SEModule(channels)
    x = jnp.zeros((1, 3, 3, channels))
    shapes = jax.eval_shape(SELayer(channels, se_style="timm").init, jax.random.PRNGKey(0), x)
    assert shapes["params"]["fc_0"]["kernel"].shape == (channels, t.fc1.out_channels)
    assert make_divisible(channels / 16, 8, round_limit=0.0) == t.fc1.out_channels


@pytest.mark.parametrize(
    "layout,factory",
    [
        ("official", lambda: ref.SELayer(32, 4)),
        ("conv", lambda: ref.SELayerConv(32, 4)),
    ],
)
def test_se_layer_round_trip(layout, factory):
    t = factory()
    randomize_torch_module(t)
    sd = _sd(t)
    back = to_torch(SELayer(32, 4), from_torch(SELayer(32, 4), sd, X, layout=layout), X, layout=layout)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


@pytest.mark.parametrize(
    "cls,cfg",
    [
        (SEBasicBlock, dict(inplanes=32, planes=32, stride=1)),
        (SEBottleneck, dict(inplanes=32, planes=8, stride=1)),
    ],
)
def test_blocks_identity_shortcut_and_timm_style(cls, cfg):
    # No downsample when shapes match (torchvision rule); timm style swaps the SE keys only.
    factory = ref.se_basic_block if cls is SEBasicBlock else ref.se_bottleneck
    t = factory(**cfg)
    assert t.downsample is None
    entry = catalogue.get("se_basic_block" if cls is SEBasicBlock else "se_bottleneck")
    check_parity(entry, config=cfg, inputs={"x": X})
    timm_block = cls(**cfg, se_style="timm")
    keys = set(to_torch(timm_block, timm_block.init(jax.random.PRNGKey(0), X), X))
    assert {"se.fc1.weight", "se.fc1.bias", "se.fc2.weight", "se.fc2.bias"} <= keys
    assert not any(k.startswith("downsample") for k in keys)


def test_zero_init_last_bn():
    v = SEBasicBlock(16, 16, se_style="timm", zero_init_last=True).init(jax.random.PRNGKey(0), X[..., :16])
    assert not np.any(v["params"]["bn2"]["scale"])
    v = SEBasicBlock(16, 16).init(jax.random.PRNGKey(0), X[..., :16])
    np.testing.assert_array_equal(v["params"]["bn2"]["scale"], 1.0)


# --------------------------------------------------------------------------- whole SE-ResNets

IMG = np.random.default_rng(1).standard_normal((2, 33, 29, 3), dtype=np.float32)


def _compare_model(flax_model, tmod, layout, train=False):
    randomize_torch_module(tmod)
    tmod.train(train)
    sd = _sd(tmod)
    variables = from_torch(flax_model, sd, IMG, layout=layout)
    with torch.no_grad():
        want = tmod(torch.from_numpy(IMG.transpose(0, 3, 1, 2))).numpy()
    if train:
        fn = jax.jit(lambda v, x: flax_model.apply(v, x, train=True, mutable=["batch_stats"]))
        got, state = fn(variables, IMG)
        new_sd = to_torch(flax_model, {**variables, **state}, IMG, layout=layout, collections=("batch_stats",))
        t_sd = _sd(tmod)
        for k, v in new_sd.items():
            np.testing.assert_allclose(v, t_sd[k], atol=1e-5, rtol=1e-5, err_msg=k)
    else:
        got = jax.jit(lambda v, x: flax_model.apply(v, x))(variables, IMG)
    # Whole models: 1e-4 (CONVENTIONS); measured errors are ~1e-6.
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
    return sd, variables


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_seresnet18_parity(train):
    _timm()
    tmod = ref.timm_seresnet(18, num_classes=10)
    sd, variables = _compare_model(se_resnet18(num_classes=10), tmod, "timm", train)
    assert "layer1.0.se.fc1.bias" in sd
    if not train:
        back = to_torch(se_resnet18(num_classes=10), variables, IMG, layout="timm")
        assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
        for k, v in back.items():
            np.testing.assert_array_equal(v, sd[k])


@pytest.mark.slow
def test_timm_seresnet50_parity():
    _timm()
    _compare_model(se_resnet50(num_classes=10), ref.timm_seresnet(50, num_classes=10), "timm")


def test_timm_seresnet34_state_dict_loads_strictly():
    # Same blocks as SE-ResNet-18 (forward checked there); here every key and shape must line up.
    _timm()
    sd = _sd(ref.timm_seresnet(34, num_classes=7))
    variables = from_torch(se_resnet34(num_classes=7), sd, IMG)
    assert variables["params"]["layer3_5"]["se"]["fc_0"]["kernel"].shape == (256, 16)


@pytest.mark.parametrize("factory,tfactory", [(se_resnet34, ref.se_resnet34), (se_resnet50, ref.se_resnet50)])
def test_senet_layout_loads_strictly(factory, tfactory):
    sd = _sd(tfactory(num_classes=7, se_style="senet"))
    assert "layer1.0.se.fc.0.weight" in sd and "layer2.0.downsample.0.weight" in sd
    variables = from_torch(factory(num_classes=7, se_style="senet"), sd, IMG, layout="senet")
    assert "bias" not in variables["params"]["layer1_0"]["se"]["fc_0"]


def test_senet_checkpoint_into_timm_style_fails_clearly():
    sd = _sd(ref.se_resnet18(num_classes=7, se_style="senet"))
    with pytest.raises(ValueError, match="layout 'senet' does not match se_style='timm'"):
        from_torch(se_resnet18(num_classes=7), sd, IMG, layout="senet")
    with pytest.raises(ValueError, match="state dict does not match"):
        from_torch(se_resnet18(num_classes=7), sd, IMG)


# --------------------------------------------------------------------------- bad input


def _init(module, x):
    return module.init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize(
    "module,x,match",
    [
        pytest.param(
            SELayer(32, 4), X[..., :16], r"SELayer: `x` must have 32 channels.*\(3, 13, 17, 16\)", id="channels"
        ),
        pytest.param(SELayer(32, 4), X[0], r"SELayer: `x` must be 4-D .*got shape \(13, 17, 32\)", id="rank"),
        pytest.param(SELayer(32, 5), X, r"SELayer: `channel`=32 must be .*`reduction`=5", id="reduction"),
        pytest.param(SELayer(32, 64), X, r"SELayer: `channel`=32 must be .*`reduction`=64", id="reduction_too_large"),
        pytest.param(SELayer(32, 4, se_style="official"), X, "SELayer: `se_style` must be one of", id="layer_style"),
        pytest.param(SEBasicBlock(16, 16), X, r"SEBasicBlock: `x` must have 16 channels", id="basic_block_channels"),
        pytest.param(
            SEBottleneck(32, 8, se_style="x"), X, r"SEBottleneck: `se_style` must be one of", id="bottleneck_style"
        ),
        pytest.param(
            se_resnet18(), IMG[..., :1], r"SEResNet: `x` must have 3 channels.*\(2, 33, 29, 1\)", id="resnet_channels"
        ),
        pytest.param(se_resnet18(), IMG[0], r"SEResNet: `x` must be 4-D", id="resnet_rank"),
    ],
)
def test_bad_inputs(module, x, match):
    with pytest.raises(ValueError, match=match):
        _init(module, x)
