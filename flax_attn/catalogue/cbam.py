"""Catalogue entries of :mod:`flax_attn.cbam` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import family, image_batch
from flax_attn.cbam import CBAM, ChannelAttention, SpatialAttention

add = family("cbam", paper="Woo et al., ECCV 2018", arxiv="1807.06521")

add(
    name="cbam",
    flax=CBAM,
    config=dict(gate_channels=32, reduction_ratio=4),
    inputs=image_batch(3, 13, 17, 32),
    bench_config=dict(gate_channels=64, reduction_ratio=16),
    bench_inputs=image_batch(16, 56, 56, 64),
)

add(
    name="cbam_channel_attention_seed",
    paper="Woo et al., ECCV 2018 (seed blog variant)",
    flax=ChannelAttention,
    config=dict(channel=32, rate=4),
    inputs=image_batch(3, 13, 17, 32),
    bench_config=dict(channel=64, rate=4),
    bench_inputs=image_batch(16, 56, 56, 64),
    train_mode=False,
)

add(
    name="cbam_spatial_attention_seed",
    paper="Woo et al., ECCV 2018 (seed blog variant)",
    flax=SpatialAttention,
    config=dict(kernel_size=3),
    inputs=image_batch(3, 13, 17, 8),
    bench_config=dict(kernel_size=7),
    bench_inputs=image_batch(16, 56, 56, 64),
    train_mode=False,
)
