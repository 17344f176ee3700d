"""AANet adaptive aggregation: variants, key names, deformable-conv initial state, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import catalogue  # noqa: E402
from flax_attn.aanet import AANetDeformConv2d, AdaptiveAggregation, AdaptiveAggregationModule  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.testing.parity import check_parity  # noqa: E402
from flax_attn.testing.torch_ref import aanet as tref  # noqa: E402


def _volumes(rng, n=2, hw=(9, 11), max_disp=8, scales=3):
    out, (h, w) = {}, hw
    for i in range(scales):
        out[f"cost{i}"] = rng.standard_normal((n, h, w, max_disp // 2**i)).astype(np.float32)
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_without_intermediate_supervision(train):
    entry = catalogue.get("aanet_adaptive_aggregation")
    cfg = dict(max_disp=8, num_scales=2, num_fusions=2, num_deform_blocks=1, intermediate_supervision=False)
    check_parity(entry, config=cfg, inputs=_volumes(np.random.default_rng(0), scales=2), train=train)


def test_deform_bottleneck_variants():
    entry = catalogue.get("aanet_deform_simple_bottleneck")
    x = {"x": np.random.default_rng(1).standard_normal((2, 9, 10, 4)).astype(np.float32)}
    check_parity(
        entry,
        config=dict(inplanes=4, planes=4, mdconv_dilation=1, deformable_groups=1, modulation=False),
        inputs=x,
        train=True,
    )
    check_parity(
        entry,
        config=dict(inplanes=4, planes=4, mdconv_dilation=3, deformable_groups=4, double_mask=False),
        inputs=x,
    )


def test_single_scale_module_returns_isa_output():
    entry = catalogue.get("aanet_adaptive_aggregation_module")
    check_parity(
        entry,
        config=dict(num_scales=1, num_output_branches=1, max_disp=8, num_blocks=2),
        inputs=_volumes(np.random.default_rng(2), scales=1),
    )


def test_state_dict_names_and_round_trip():
    torch.manual_seed(0)
    t = tref.AdaptiveAggregation(max_disp=8, num_scales=3, num_fusions=2, num_deform_blocks=1)
    sd = {k: v.numpy() for k, v in t.state_dict().items()}
    for key in (
        "fusions.1.branches.2.0.conv2.offset_conv.weight",
        "fusions.1.branches.0.0.conv2.deform_conv.weight",
        "fusions.0.branches.1.0.conv2.weight",
        "fusions.0.fuse_layers.2.0.1.0.weight",
        "fusions.0.fuse_layers.2.0.0.1.running_var",
        "fusions.1.fuse_layers.0.2.1.weight",
        "final_conv.2.bias",
    ):
        assert key in sd, key
    m = AdaptiveAggregation(max_disp=8, num_scales=3, num_fusions=2, num_deform_blocks=1)
    cv = [jnp.asarray(v) for v in _volumes(np.random.default_rng(3)).values()]
    back = to_torch(m, from_torch(m, sd, cv), cv)
    assert sorted(back) == sorted(k for k in sd if not k.endswith("num_batches_tracked"))
    for k in back:
        np.testing.assert_array_equal(back[k], sd[k])


def test_deform_conv_starts_as_plain_dilated_conv():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 9, 10, 4)), jnp.float32)
    m = AANetDeformConv2d(4, 6, dilation=2, deformable_groups=2)  # mask = 2 * sigmoid(0) = 1
    v = m.init(jax.random.PRNGKey(0), x)
    k = v["params"]["deform_conv"]["kernel"]
    want = jax.lax.conv_general_dilated(
        x, k, (1, 1), [(2, 2), (2, 2)], rhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(m.apply(v, x), want, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    key = jax.random.PRNGKey(0)
    m = AdaptiveAggregationModule(num_scales=2, num_output_branches=2, max_disp=8)
    with pytest.raises(
        ValueError, match="AdaptiveAggregationModule: `cost_volume` must be a list of 2 cost volumes, got 1"
    ):
        jax.eval_shape(m.init, key, [jnp.zeros((1, 8, 8, 8))])
    with pytest.raises(ValueError, match=r"AdaptiveAggregationModule: `cost_volume\[1\]` must have 4 channels"):
        jax.eval_shape(m.init, key, [jnp.zeros((1, 8, 8, 8)), jnp.zeros((1, 4, 4, 5))])
    with pytest.raises(
        ValueError, match="AANetDeformConv2d: `in_channels`=5 must be divisible by `deformable_groups`=2"
    ):
        jax.eval_shape(AANetDeformConv2d(5, 5).init, key, jnp.zeros((1, 8, 8, 5)))


def test_bfloat16_close_to_float32(assert_bfloat16_close):
    from flax_attn.aanet import DeformSimpleBottleneck

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 9, 10, 4)), jnp.float32)
    assert_bfloat16_close(DeformSimpleBottleneck(4, 4), x, rng)
