"""Catalogue entries of :mod:`flax_attn.deform` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

import numpy as np

from flax_attn.catalogue import family, image_batch
from flax_attn.deform import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack


def _deform_inputs(n, h, w, c, ho, wo, k, og, scale=2.0):
    def make(rng):
        return {
            "x": rng.standard_normal((n, h, w, c), dtype=np.float32),
            "offset": (scale * rng.standard_normal((n, ho, wo, 2 * og * k))).astype(np.float32),
            "mask": rng.uniform(0.0, 1.0, (n, ho, wo, og * k)).astype(np.float32),
        }

    return make


# The serial op a deformable convolution's train step lowers to, and why (aanet's blocks share it).
DEFORM_CONV_HLO = {
    "stablehlo.scatter": (
        "deform_conv2d: bilinear sampling at learned, data-dependent offsets; the transposes of its corner "
        "gathers (one packed gather measured slower on CPU, see ops/deform.py)"
    )
}

add = family(
    "deform",
    paper="Dai et al., ICCV 2017; Zhu et al., CVPR 2019 (torchvision.ops.DeformConv2d)",
    arxiv="1703.06211",
    allowed_hlo=DEFORM_CONV_HLO,
)

add(
    name="deform_conv2d",
    flax=DeformConv2d,
    # stride 2, padding 1, dilation (1, 2) on 13x17: Ho = 7, Wo = 9; offset groups 2, groups 2.
    config=dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=1, dilation=(1, 2), groups=2),
    inputs=_deform_inputs(3, 13, 17, 4, 7, 9, 6, 2),
    bench_config=dict(in_channels=64, out_channels=64, kernel_size=3, padding=1),
    bench_inputs=_deform_inputs(8, 64, 64, 64, 64, 64, 9, 1),
    image_inputs=("x", "offset", "mask"),
    torch_call=lambda m, x, offset, mask: m(x, offset, mask),  # torchvision names the input `input`
    train_mode=False,
)

add(
    name="deform_conv2d_pack",
    paper="Dai et al., ICCV 2017 (mmcv DeformConv2dPack)",
    flax=DeformConv2dPack,
    config=dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=1, deform_groups=2),
    inputs=image_batch(3, 13, 17, 4),
    bench_config=dict(in_channels=64, out_channels=64, kernel_size=3, padding=1),
    bench_inputs=image_batch(8, 64, 64, 64),
    train_mode=False,
    float64_modes=("eval",),
    conditioning="eval: float32 rounding moves grad[x] by 2.7e-6 (torch) / 2.4e-6 (Flax), 0.22 of the 1e-5 "
    "tolerance (the learned offsets move the bilinear weights, so x's gradient carries offset rounding)",
)

add(
    name="modulated_deform_conv2d_pack",
    paper="Zhu et al., CVPR 2019 (mmcv ModulatedDeformConv2dPack, DCNv2)",
    arxiv="1811.11168",
    flax=ModulatedDeformConv2dPack,
    config=dict(
        in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2, deform_groups=2
    ),
    inputs=image_batch(3, 13, 17, 4),
    bench_config=dict(in_channels=64, out_channels=64, kernel_size=3, padding=1),
    bench_inputs=image_batch(8, 64, 64, 64),
    train_mode=False,
)
