"""Catalogue entries of :mod:`flax_attn.augmented_conv` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.augmented_conv import AugmentedConv
from flax_attn.catalogue import family, image_batch

add = family("augmented_conv", paper="Bello et al., ICCV 2019", arxiv="1904.09925", train_mode=False)

add(
    name="augmented_conv",
    flax=AugmentedConv,
    config=dict(in_channels=6, out_channels=20, kernel_size=3, dk=8, dv=6, Nh=2),
    inputs=image_batch(3, 13, 17, 6),
    bench_config=dict(in_channels=64, out_channels=128, kernel_size=3, dk=64, dv=64, Nh=8),
    bench_inputs=image_batch(8, 32, 32, 64),
)

add(
    name="augmented_conv_relative",
    flax=AugmentedConv,
    # Relative logits fix the output to shape x shape; stride 2 lets the input stay odd and non-square.
    config=dict(in_channels=6, out_channels=20, kernel_size=3, dk=8, dv=6, Nh=2, shape=13, relative=True, stride=2),
    inputs=image_batch(3, 25, 26, 6),
    bench_config=dict(in_channels=64, out_channels=128, kernel_size=3, dk=64, dv=64, Nh=8, shape=32, relative=True),
    bench_inputs=image_batch(8, 32, 32, 64),
)
