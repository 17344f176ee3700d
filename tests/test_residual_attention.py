"""Residual Attention Network: blocks and stages at odd sizes, whole-model keys and forward, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import catalogue, residual_attention  # noqa: E402
from flax_attn.convert import from_torch, mapping, to_torch  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref import residual_attention as ref  # noqa: E402


def _x(shape, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_residual_block_identity_shortcut(train):
    # in == out and stride 1: the shortcut is x itself, conv4 exists but is unused (as in the reference).
    check_parity(
        catalogue.get("residual_attention_block"),
        config=dict(input_channels=8, output_channels=8),
        inputs=_x((3, 7, 9, 8)),
        train=train,
    )


@pytest.mark.parametrize(
    "name,config,shape",
    [
        (
            "attention_module_stage2",
            dict(in_channels=8, out_channels=8, size1=(9, 10), size2=(5, 5)),
            (2, 9, 10, 8),
        ),
        ("attention_module_stage3", dict(in_channels=4, out_channels=4, size1=(6, 1)), (2, 6, 1, 4)),
    ],
)
def test_stages_other_sizes(name, config, shape):
    for train in (False, True):
        check_parity(catalogue.get(name), config=config, inputs=_x(shape), train=train)


def test_block_and_stage_round_trip():
    for tmod, fmod, x in (
        (ref.ResidualBlock(8, 8), residual_attention.ResidualBlock(8, 8), jnp.ones((1, 5, 5, 8))),
        (
            ref.AttentionModule_stage3(4, 4, size1=(5, 6)),
            residual_attention.AttentionModule_stage3(4, 4, size1=(5, 6)),
            jnp.ones((1, 5, 6, 4)),
        ),
    ):
        randomize_torch_module(tmod)
        sd = {k: v.numpy() for k, v in tmod.state_dict().items() if not k.endswith("num_batches_tracked")}
        back = to_torch(fmod, from_torch(fmod, sd, x), x)
        assert set(back) == set(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k])


@pytest.mark.parametrize("depth", [56, 92])
def test_whole_model_keys_match_reference(depth):
    cls = {56: residual_attention.ResidualAttentionModel_56, 92: residual_attention.ResidualAttentionModel_92}[depth]
    tmod = getattr(ref, f"residual_attention_model_{depth}")()
    want = {k: tuple(v.shape) for k, v in tmod.state_dict().items() if not k.endswith("num_batches_tracked")}
    names = mapping(cls(), jnp.zeros((1, 224, 224, 3)))  # traced with eval_shape: nothing is computed
    assert sorted(names.values()) == sorted(want)
    assert "attention_module1.softmax3_blocks.1.conv4.weight" in want
    assert "attention_module3.softmax2_blocks.5.weight" in want
    assert ("attention_module3_3.last_blocks.bn1.weight" in want) == (depth == 92)


@pytest.mark.slow
def test_attention56_forward_matches_reference():
    """One whole-model forward in eval mode at the reference's 224x224 (catalogue `attention56`: grads)."""
    check_parity(catalogue.get("attention56"), check_grads=False)


def test_bad_input():
    k = jax.random.PRNGKey(0)
    with pytest.raises(
        ValueError, match=r"AttentionModule_stage3: `size1`=\(14, 14\) must equal the spatial size \(9, 9\)"
    ):
        jax.eval_shape(residual_attention.AttentionModule_stage3(4, 4).init, k, jnp.ones((1, 9, 9, 4)))
    with pytest.raises(
        ValueError, match=r"AttentionModule_stage1: `size3`=\(4, 4\) must equal the spatial size \(4, 5\)"
    ):
        jax.eval_shape(
            residual_attention.AttentionModule_stage1(4, 4, size1=(13, 17), size2=(7, 9), size3=(4, 4)).init,
            k,
            jnp.ones((1, 13, 17, 4)),
        )
    with pytest.raises(ValueError, match=r"AttentionModule_stage2: `in_channels`=4 must equal `out_channels`=8"):
        jax.eval_shape(residual_attention.AttentionModule_stage2(4, 8).init, k, jnp.ones((1, 28, 28, 4)))
    with pytest.raises(ValueError, match=r"ResidualBlock: `output_channels`=6 must be a positive multiple of 4"):
        jax.eval_shape(residual_attention.ResidualBlock(4, 6).init, k, jnp.ones((1, 5, 5, 4)))
    with pytest.raises(ValueError, match=r"ResidualBlock: `x` must have 4 channels"):
        jax.eval_shape(residual_attention.ResidualBlock(4, 8).init, k, jnp.ones((1, 5, 5, 3)))
    with pytest.raises(ValueError, match=r"ResidualAttentionModel_92: `x` must be \(batch, 224, 224, 3\)"):
        jax.eval_shape(residual_attention.ResidualAttentionModel_92().init, k, jnp.ones((1, 112, 112, 3)))
