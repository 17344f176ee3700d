"""Catalogue entries of :mod:`flax_attn.se` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import Entry, image_batch, register
from flax_attn.se import SEBasicBlock, SEBottleneck, SELayer, se_resnet18, se_resnet50

_PAPER = "Hu et al., CVPR 2018"
_ARXIV = "1709.01507"

register(
    Entry(
        name="se_layer",
        family="se",
        paper=_PAPER,
        arxiv=_ARXIV,
        flax=SELayer,
        torch="flax_attn.testing.torch_ref.se:SELayer",
        config=dict(channel=32, reduction=4),
        inputs=image_batch(3, 13, 17, 32),
        bench_config=dict(channel=64, reduction=16),
        bench_inputs=image_batch(32, 56, 56, 64),
        train_mode=False,
    )
)

register(
    Entry(
        name="se_basic_block",
        family="se",
        paper=_PAPER,
        arxiv=_ARXIV,
        flax=SEBasicBlock,
        torch="flax_attn.testing.torch_ref.se:se_basic_block",
        config=dict(inplanes=16, planes=32, stride=2, reduction=16),
        inputs=image_batch(3, 13, 17, 16),
        bench_config=dict(inplanes=64, planes=64, stride=1, reduction=16),
        bench_inputs=image_batch(16, 56, 56, 64),
    )
)

register(
    Entry(
        name="se_bottleneck",
        family="se",
        paper=_PAPER,
        arxiv=_ARXIV,
        flax=SEBottleneck,
        torch="flax_attn.testing.torch_ref.se:se_bottleneck",
        config=dict(inplanes=32, planes=16, stride=2, reduction=16),
        inputs=image_batch(3, 13, 17, 32),
        bench_config=dict(inplanes=256, planes=64, stride=1, reduction=16),
        bench_inputs=image_batch(16, 56, 56, 256),
    )
)

register(
    Entry(
        name="se_resnet18",
        family="se",
        paper=_PAPER,
        arxiv=_ARXIV,
        flax=se_resnet18,
        torch="flax_attn.testing.torch_ref.se:se_resnet18",
        # senet style so that the generic test needs plain torch only; tests/test_se.py checks the
        # timm style against timm's own model.
        config=dict(num_classes=10, se_style="senet"),
        inputs=image_batch(3, 33, 29, 3),
        bench_config=dict(num_classes=1000, se_style="timm"),
        bench_inputs=image_batch(8, 64, 64, 3),
        atol=1e-4,
        rtol=1e-4,
    )
)

register(
    Entry(
        name="se_resnet50",
        family="se",
        paper=_PAPER,
        arxiv=_ARXIV,
        flax=se_resnet50,
        torch="flax_attn.testing.torch_ref.se:se_resnet50",
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
)
