"""flax_attn.backbones: the one BasicBlock/Bottleneck, used directly with its fields against PyTorch,
and convert.sequential_rules, the rename helper the block files share."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn import backbones
from flax_attn.convert import from_torch, mapping, sequential_rules
from flax_attn.se import SELayer

RNG = np.random.default_rng(0)


def _torch_parity(torch_module, flax_module, x, *, train: bool):
    """Outputs of the two modules on ``x`` (NHWC), the torch one with random weights and statistics."""
    torch = pytest.importorskip("torch")
    from flax_attn.convert.io import to_numpy
    from flax_attn.testing.parity import randomize_torch_module

    randomize_torch_module(torch_module, 0)
    sd = {k: to_numpy(v) for k, v in torch_module.state_dict().items()}
    variables = from_torch(flax_module, sd, x)
    torch_module.train(train)
    with torch.no_grad():
        want = torch_module(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    if train:
        got, _ = flax_module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    else:
        got = flax_module.apply(variables, jnp.asarray(x))
    return np.asarray(got), want.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bottleneck_matches_torchvision_layout_bottleneck(train):
    torch = pytest.importorskip("torch")
    from flax_attn.testing.torch_ref import aanet as tref

    down = torch.nn.Sequential(torch.nn.Conv2d(12, 32, 1, stride=2, bias=False), torch.nn.BatchNorm2d(32))
    ref = tref.Bottleneck(12, 8, stride=2, downsample=down, groups=2, base_width=32)
    block = backbones.Bottleneck(inplanes=12, planes=8, stride=2, groups=2, base_width=32)
    x = RNG.standard_normal((3, 13, 17, 12)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got, want = _torch_parity(ref, block, x, train=train)
    assert got.shape == (3, 7, 9, 32)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_basic_block_with_se_as_its_attention_matches_senet():
    pytest.importorskip("torch")
    from flax_attn.testing.torch_ref import se as tref

    ref = tref.se_basic_block(16, 32, stride=2, reduction=8)
    block = backbones.BasicBlock(
        inplanes=16,
        planes=32,
        stride=2,
        attn=functools.partial(SELayer, reduction=8),
        kernel_init=backbones.resnet_conv_init,
    )
    x = RNG.standard_normal((3, 13, 17, 16)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got, want = _torch_parity(ref, block, x, train=False)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_fields_reach_the_layers():
    x = jnp.asarray(RNG.standard_normal((2, 9, 11, 8)).astype(np.float32))
    block = backbones.BasicBlock(inplanes=8, planes=8, zero_init_last=True)
    variables = block.init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(variables["params"]["bn2"]["scale"], 0.0)  # starts as its shortcut
    np.testing.assert_allclose(block.apply(variables, x), nn.relu(x), atol=1e-6)
    # The activation field replaces every ReLU: with the identity, the block is affine in x.
    linear = backbones.BasicBlock(inplanes=8, planes=8, act=lambda h: h)
    v = linear.init(jax.random.PRNGKey(1), x)
    np.testing.assert_allclose(
        linear.apply(v, 2 * x) - linear.apply(v, x), linear.apply(v, x) - linear.apply(v, 0 * x), atol=1e-4
    )
    # The key names are torchvision's, whatever the fields say.
    names = set(mapping(backbones.Bottleneck(inplanes=8, planes=4, stride=2), x).values())
    assert {"conv2.weight", "bn3.running_var", "downsample.0.weight", "downsample.1.bias"} <= names


def test_bad_configuration_names_the_block_and_the_arguments():
    x = jnp.zeros((1, 8, 8, 16))
    with pytest.raises(ValueError, match=r"Bottleneck: without `downsample` .*inplanes=16, planes=8, stride=2"):
        backbones.Bottleneck(inplanes=16, planes=8, stride=2, downsample=False).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"BasicBlock: `x` must have 8 channels"):
        backbones.BasicBlock(inplanes=8, planes=8).init(jax.random.PRNGKey(0), x)


def test_sequential_rules():
    rules = sequential_rules(r"conv5a|softmax\d_blocks")

    def rename(name):
        for r in rules:
            m = re.fullmatch(r.pattern, name)
            if m:
                return m.expand(r.replacement)
        return name

    assert rename("conv5a_0.weight") == "conv5a.0.weight"
    assert rename("softmax2_blocks_1_0.bn.bias") == "softmax2_blocks.1.0.bn.bias"
    assert rename("conv5b_0.weight") == "conv5b_0.weight"
    with pytest.raises(ValueError, match="sequential_rules: give at least one name"):
        sequential_rules()
    with pytest.raises(ValueError, match=r"sequential_rules: `depth` must be a positive int, got 0"):
        sequential_rules("fc", depth=0)
