"""Catalogue entries of :mod:`flax_attn.residual_attention` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn import residual_attention
from flax_attn.catalogue import family, image_batch

add = family("residual_attention", paper="Wang et al., CVPR 2017", arxiv="1704.06904")

add(
    name="residual_attention_block",
    flax=residual_attention.ResidualBlock,
    config=dict(input_channels=12, output_channels=16, stride=2),
    inputs=image_batch(3, 13, 17, 12),
    bench_config=dict(input_channels=256, output_channels=256),
    bench_inputs=image_batch(8, 56, 56, 256),
)

add(
    name="attention_module_stage1",
    flax=residual_attention.AttentionModule_stage1,
    config=dict(in_channels=8, out_channels=8, size1=(13, 17), size2=(7, 9), size3=(4, 5)),
    inputs=image_batch(3, 13, 17, 8),
    bench_config=dict(in_channels=256, out_channels=256),
    bench_inputs=image_batch(8, 56, 56, 256),
    # 18 pre-activation residual blocks (55 BatchNorms) deep, and in train mode the deepest mask level
    # (2x3 pixels x batch 3) normalises over 18 values per channel, amplifying float32 rounding in
    # the input gradient: train mode compares in float64.
    float64_modes=("train",),
    conditioning="train: float32 rounding moves grad[x] by 1.3e-5 (torch) / 1.1e-5 (Flax), 0.56 of the "
    "1e-5 tolerance (float32 needed 1e-4); eval uses 0.06",
)

add(
    name="attention_module_stage2",
    flax=residual_attention.AttentionModule_stage2,
    config=dict(in_channels=8, out_channels=8, size1=(13, 17), size2=(7, 9)),
    inputs=image_batch(3, 13, 17, 8),
    bench_config=dict(in_channels=512, out_channels=512),
    bench_inputs=image_batch(8, 28, 28, 512),
    float64_modes=("train",),
    conditioning="train: float32 rounding moves grad[x] by 4.2e-6 (torch) / 4.7e-6 (Flax), 0.29 of the "
    "1e-5 tolerance; eval uses 0.036",
)

add(
    name="attention_module_stage3",
    flax=residual_attention.AttentionModule_stage3,
    config=dict(in_channels=8, out_channels=8, size1=(13, 17)),
    inputs=image_batch(3, 13, 17, 8),
    bench_config=dict(in_channels=1024, out_channels=1024),
    bench_inputs=image_batch(8, 14, 14, 1024),
    float64_modes=("train",),
    conditioning="train: float32 rounding moves grad[x] by 2.7e-6 (torch) / 4.7e-6 (Flax), 0.40 of the "
    "1e-5 tolerance; eval uses 0.022",
)

for _depth, _cls in (
    (56, residual_attention.ResidualAttentionModel_56),
    (92, residual_attention.ResidualAttentionModel_92),
):
    add(
        name=f"attention{_depth}",
        flax=_cls,
        torch=f"residual_attention_model_{_depth}",
        # The reference only takes 224x224 (fixed mask sizes, 7x7 average pool): batch 1 keeps it
        # to a few CPU seconds per pass; train mode is covered by the stage entries.
        config=dict(num_classes=10),
        inputs=image_batch(1, 224, 224, 3),
        bench_inputs=image_batch(8, 224, 224, 3),
        atol=1e-4,
        rtol=1e-4,
        train_mode=False,
        slow=True,
    )
