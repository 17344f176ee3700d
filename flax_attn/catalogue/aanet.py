"""Catalogue entries of :mod:`flax_attn.aanet` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

import numpy as np

from flax_attn.aanet import (
    AANet,
    AANetFeature,
    AdaptiveAggregation,
    AdaptiveAggregationModule,
    CostVolumePyramid,
    DeformSimpleBottleneck,
    DisparityEstimation,
    FeaturePyramidNetwork,
    StereoDRNetRefinement,
)
from flax_attn.catalogue import family, image_batch
from flax_attn.catalogue.deform import DEFORM_CONV_HLO


def _by_scale(module, cost0, cost1=None, cost2=None, cost3=None, *, train=None):
    """``flax_call``: the cost volumes arrive as keyword arrays ``cost0``, ``cost1``, ... and the
    block takes them as one list (finest first)."""
    return module([c for c in (cost0, cost1, cost2, cost3) if c is not None], train=train)


def _volumes(n, hw, max_disp, scales):
    def make(rng):
        h, w = hw
        out = {}
        for i in range(scales):
            out[f"cost{i}"] = rng.standard_normal((n, h, w, max_disp // 2**i), dtype=np.float32)
            h, w = (h + 1) // 2, (w + 1) // 2
        return out

    return make


_VOLUME_NAMES = ("cost0", "cost1", "cost2")

# Each entry names the part of AANet it is.
add = family("aanet", paper="Xu & Zhang, CVPR 2020", arxiv="2004.09548")

add(
    name="aanet_deform_simple_bottleneck",
    paper="Xu & Zhang, CVPR 2020 (AANet intra-scale aggregation)",
    allowed_hlo=DEFORM_CONV_HLO,
    flax=DeformSimpleBottleneck,
    config=dict(inplanes=6, planes=6, mdconv_dilation=2, deformable_groups=2),
    inputs=image_batch(3, 13, 17, 6),
    bench_config=dict(inplanes=64, planes=64),
    bench_inputs=image_batch(4, 96, 160, 64),
    float64_modes=("train",),
    conditioning="train: float32 rounding moves grad[x] by 4.6e-6 (torch) / 7.7e-6 (Flax), 0.63 of the 1e-5 "
    "tolerance (train-mode BN around a deformable conv whose offsets move its sampling weights); eval 0.007",
)

add(
    name="aanet_adaptive_aggregation_module",
    allowed_hlo=DEFORM_CONV_HLO,
    paper="Xu & Zhang, CVPR 2020 (AANet ISA + cross-scale aggregation)",
    flax=AdaptiveAggregationModule,
    flax_call=_by_scale,
    config=dict(num_scales=3, num_output_branches=3, max_disp=8),
    inputs=_volumes(3, (13, 17), 8, 3),
    bench_config=dict(num_scales=3, num_output_branches=3, max_disp=64),
    bench_inputs=_volumes(4, (96, 160), 64, 3),
    image_inputs=_VOLUME_NAMES,
    torch_call=lambda m, **kw: m([kw[k] for k in _VOLUME_NAMES if k in kw]),
    float64_modes=("eval", "train"),
    conditioning="float32 rounding moves grad[cost1] by 2.1e-6 / 1.0e-5 (torch, eval / train) and 1.9e-6 / "
    "1.1e-5 (Flax), 0.17 / 0.65 of the 1e-5 tolerance",
)

add(
    name="aanet_adaptive_aggregation",
    allowed_hlo=DEFORM_CONV_HLO,
    paper="Xu & Zhang, CVPR 2020 (AANet stacked adaptive aggregation)",
    flax=AdaptiveAggregation,
    flax_call=_by_scale,
    config=dict(max_disp=8, num_scales=3, num_fusions=2, num_deform_blocks=1),
    inputs=_volumes(3, (13, 17), 8, 3),
    bench_config=dict(max_disp=64),
    bench_inputs=_volumes(4, (96, 160), 64, 3),
    image_inputs=_VOLUME_NAMES,
    torch_call=lambda m, **kw: m([kw[k] for k in _VOLUME_NAMES if k in kw]),
    atol=1e-4,  # a whole model: stages of bottlenecks and fusions (11 BatchNorms per stage)
    rtol=1e-4,
    float64_modes=("train",),
    conditioning="train: float32 rounding moves grad[cost2] by 1.4e-5 (torch) / 7.6e-6 (Flax), 0.10-0.15 of "
    "the whole-model 1e-4 tolerance (two runs); eval uses 0.019",
)


def _by_level(module, x0, x1, x2, *, train=None):
    """``flax_call``: the pyramid levels as keyword arrays ``x0..x2``, the FPN takes one list."""
    return module([x0, x1, x2], train=train)


def _left_right_by_scale(module, left0, left1, left2, right0, right1, right2, *, train=None):
    """``flax_call``: ``left0..2`` and ``right0..2`` keyword arrays, the pyramid takes two lists."""
    return module([left0, left1, left2], [right0, right1, right2], train=train)


def _fpn_inputs(n, hw, channels):
    def make(rng):
        h, w = hw
        out = {}
        for i, c in enumerate(channels):
            out[f"x{i}"] = rng.standard_normal((n, h, w, c), dtype=np.float32)
            h, w = h // 2, w // 2
        return out

    return make


def _pyramid_pair(n, hw, c):
    def make(rng):
        h, w = hw
        out = {}
        for i in range(3):
            out[f"left{i}"] = rng.standard_normal((n, h, w, c), dtype=np.float32)
            out[f"right{i}"] = rng.standard_normal((n, h, w, c), dtype=np.float32)
            h, w = (h + 1) // 2, (w + 1) // 2
        return out

    return make


def _refinement_inputs(n, low_hw, hw):
    def make(rng):
        return {
            # Disparities are non-negative (soft-argmin output); AANet's warp asserts it.
            "low_disp": rng.uniform(0.0, 3.0, (n, *low_hw)).astype(np.float32),
            "left_img": rng.standard_normal((n, *hw, 3), dtype=np.float32),
            "right_img": rng.standard_normal((n, *hw, 3), dtype=np.float32),
        }

    return make


def _stereo_pair(n, hw):
    def make(rng):
        return {
            "left_img": rng.standard_normal((n, *hw, 3), dtype=np.float32),
            "right_img": rng.standard_normal((n, *hw, 3), dtype=np.float32),
        }

    return make


_FPN_LEVELS = ("x0", "x1", "x2")
_COST_LEVELS = ("left0", "left1", "left2", "right0", "right1", "right2")

add(
    name="aanet_feature",
    allowed_hlo={
        "stablehlo.scatter": (
            "deform_conv2d in the deformable layer3: bilinear sampling at learned, data-dependent offsets; the "
            "transposes of its corner gathers (one packed gather measured slower on CPU, see ops/deform.py)"
        )
    },
    paper="Xu & Zhang, CVPR 2020 (AANet ResNet-40 feature extractor, deformable layer3)",
    flax=AANetFeature,
    # AANet's default deformable layer3: its train-mode gradient through BatchNorm over 2x2 maps is
    # ill-conditioned, so train mode compares in float64.
    config=dict(in_channels=4),
    inputs=image_batch(3, 13, 17, 3),
    bench_config=dict(in_channels=32),
    bench_inputs=image_batch(2, 288, 576, 3),
    atol=1e-4,  # 13 bottlenecks (40 conv/BN layers) deep
    rtol=1e-4,
    float64_modes=("train",),
    conditioning="train: float32 rounding moves grad[x] by 2.4e-3 (torch) / 1.0e-2 (Flax) with the deformable "
    "layer3, 22x the 1e-4 tolerance (with a plain layer3 0.094 of it); eval uses 0.004",
)

add(
    name="aanet_feature_pyramid_network",
    paper="Xu & Zhang, CVPR 2020 (AANet's FPN over the feature levels)",
    flax=FeaturePyramidNetwork,
    flax_call=_by_level,
    config=dict(in_channels=(8, 12, 16), out_channels=8),
    inputs=_fpn_inputs(3, (12, 20), (8, 12, 16)),
    bench_config=dict(in_channels=(128, 256, 512), out_channels=128),
    bench_inputs=_fpn_inputs(2, (96, 192), (128, 256, 512)),
    image_inputs=_FPN_LEVELS,
    torch_call=lambda m, **kw: m([kw[k] for k in _FPN_LEVELS]),
    float64_modes=("eval",),
    conditioning="eval: float32 rounding moves the output by 1.6e-6 (torch) / 2.1e-6 (Flax), 0.11 of the "
    "1e-5 tolerance (three upsample-and-add levels of 3x3 convs); train uses 0.078",
)

add(
    name="aanet_cost_volume_pyramid",
    paper="Xu & Zhang, CVPR 2020 (AANet multi-scale correlation cost volume)",
    flax=CostVolumePyramid,
    flax_call=_left_right_by_scale,
    config=dict(max_disp=8),
    inputs=_pyramid_pair(3, (13, 17), 6),
    bench_config=dict(max_disp=64),
    bench_inputs=_pyramid_pair(2, (96, 192), 128),
    image_inputs=_COST_LEVELS,
    torch_call=lambda m, **kw: m([kw[f"left{i}"] for i in range(3)], [kw[f"right{i}"] for i in range(3)]),
    train_mode=False,
)

add(
    name="aanet_disparity_estimation",
    paper="Xu & Zhang, CVPR 2020 (AANet soft-argmin disparity regression)",
    flax=DisparityEstimation,
    config=dict(max_disp=8),
    inputs=lambda rng: {"cost_volume": 3 * rng.standard_normal((3, 13, 17, 8), dtype=np.float32)},
    bench_config=dict(max_disp=64),
    bench_inputs=lambda rng: {"cost_volume": rng.standard_normal((2, 96, 192, 64), dtype=np.float32)},
    image_inputs=("cost_volume",),
    output_layout="same",  # (N, H, W) disparity maps, no channel axis
    train_mode=False,
    float64_modes=("eval",),
    conditioning="eval: float32 rounding moves grad[cost_volume] by 1.4e-6 (torch) / 1.9e-6 (Flax), 0.15 of "
    "the 1e-5 tolerance (soft-argmin over disparities weights the gradient by up to max_disp)",
)

add(
    name="aanet_stereodrnet_refinement",
    allowed_hlo={
        "stablehlo.scatter": (
            "disparity_warp: grid_sample of the right image at disparity-shifted, data-dependent positions "
            "(packed corner gather; its transpose is the scatter)"
        )
    },
    paper="Xu & Zhang, CVPR 2020 (AANet's StereoDRNet disparity refinement)",
    flax=StereoDRNetRefinement,
    config={},
    inputs=_refinement_inputs(3, (7, 9), (13, 17)),
    bench_inputs=_refinement_inputs(2, (144, 288), (288, 576)),
    image_inputs=("left_img", "right_img"),
    output_layout="same",  # (N, H, W) disparity maps, no channel axis
    # 8 conv/BN stages after a bilinear warp whose weights move with the disparity
    float64_modes=("eval", "train"),
    conditioning="float32 rounding moves grad[low_disp] by 7.4e-6 / 1.3e-5 (torch, eval / train) and "
    "6.1e-7 / 5.4e-6 (Flax): 0.37 / 0.56 of the 1e-5 tolerance (float32 needed 1e-4)",
)

add(
    name="aanet",
    allowed_hlo={
        "stablehlo.scatter": (
            "deformable convolutions (bilinear sampling at learned offsets) and the disparity warp (grid_sample "
            "at data-dependent positions): the transposes of their corner gathers"
        )
    },
    paper="Xu & Zhang, CVPR 2020 (AANet stereo network)",
    flax=AANet,
    config=dict(
        max_disp=48,
        num_fusions=2,
        num_deform_blocks=1,
        feature_pyramid_network=True,
    ),
    inputs=_stereo_pair(2, (24, 36)),
    bench_config=dict(max_disp=192, feature_pyramid_network=True, no_intermediate_supervision=True),
    bench_inputs=_stereo_pair(1, (288, 576)),
    image_inputs=("left_img", "right_img"),
    output_layout="same",  # a list of (N, H, W) disparity maps
    atol=1e-4,  # a whole model
    rtol=1e-4,
    # The input gradients through BatchNorm on 2x3 coarse maps are ill-conditioned in train mode:
    # it compares in float64.
    float64_modes=("train",),
    conditioning="train: float32 rounding moves grad[left_img] by 49 (torch) / 242 (Flax), 6e5x the 1e-4 "
    "tolerance; eval uses 0.009 of it",
    slow=True,
)
