"""Catalogue entries of :mod:`flax_attn.se` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import family, image_batch
from flax_attn.se import SEBasicBlock, SEBottleneck, SELayer, se_resnet18, se_resnet50

add = family("se", paper="Hu et al., CVPR 2018", arxiv="1709.01507")

add(
    name="se_layer",
    flax=SELayer,
    config=dict(channel=32, reduction=4),
    inputs=image_batch(3, 13, 17, 32),
    bench_config=dict(channel=64, reduction=16),
    bench_inputs=image_batch(32, 56, 56, 64),
    train_mode=False,
)

add(
    name="se_basic_block",
    flax=SEBasicBlock,
    torch="se_basic_block",
    config=dict(inplanes=16, planes=32, stride=2, reduction=16),
    inputs=image_batch(3, 13, 17, 16),
    bench_config=dict(inplanes=64, planes=64, stride=1, reduction=16),
    bench_inputs=image_batch(16, 56, 56, 64),
)

add(
    name="se_bottleneck",
    flax=SEBottleneck,
    torch="se_bottleneck",
    config=dict(inplanes=32, planes=16, stride=2, reduction=16),
    inputs=image_batch(3, 13, 17, 32),
    bench_config=dict(inplanes=256, planes=64, stride=1, reduction=16),
    bench_inputs=image_batch(16, 56, 56, 256),
)

add(
    name="se_resnet18",
    flax=se_resnet18,
    # senet style so that the generic test needs plain torch only; tests/test_se.py checks the
    # timm style against timm's own model.
    config=dict(num_classes=10, se_style="senet"),
    inputs=image_batch(3, 33, 29, 3),
    bench_config=dict(num_classes=1000, se_style="timm"),
    bench_inputs=image_batch(8, 64, 64, 3),
    atol=1e-4,
    rtol=1e-4,
)

add(
    name="se_resnet50",
    flax=se_resnet50,
    config=dict(num_classes=10, se_style="senet"),
    # Train-mode BatchNorm makes a randomly initialised 50-layer network amplify its input gradient
    # by orders of magnitude (BN gradient explosion at init, Yang et al., ICLR 2019), and float32
    # rounding with it, so train mode compares in float64 (see `conditioning`).
    inputs=image_batch(3, 97, 81, 3),
    # The benchmark compares against timm's seresnet50 itself, on one 3x64x64 image.
    bench_config=dict(num_classes=1000, se_style="timm"),
    bench_inputs=image_batch(1, 64, 64, 3),
    atol=1e-4,
    rtol=1e-4,
    slow=True,
    float64_modes=("train",),
    conditioning="train: float32 rounding alone moves grad[x] by 6.4e-3 in torch and in Flax (each against "
    "its own float64 run; 63x the 1e-4 tolerance at 3x97x81, 111x at 2x65x57), so float32 agreement depends "
    "on the CPU; eval uses 0.002 of it",
)
