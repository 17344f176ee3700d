"""Catalogue entries of :mod:`flax_attn.cbam` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import Entry, image_batch, register
from flax_attn.cbam import CBAM, ChannelAttention, SpatialAttention

_PAPER = "Woo et al., ECCV 2018"
_ARXIV = "1807.06521"

register(
    Entry(
        name="cbam",
        family="cbam",
        paper=_PAPER,
        arxiv=_ARXIV,
        flax=CBAM,
        torch="flax_attn.testing.torch_ref.cbam:CBAM",
        config=dict(gate_channels=32, reduction_ratio=4),
        inputs=image_batch(3, 13, 17, 32),
        bench_config=dict(gate_channels=64, reduction_ratio=16),
        bench_inputs=image_batch(16, 56, 56, 64),
    )
)

register(
    Entry(
        name="cbam_channel_attention_seed",
        family="cbam",
        paper=_PAPER + " (seed blog variant)",
        arxiv=_ARXIV,
        flax=ChannelAttention,
        torch="flax_attn.testing.torch_ref.cbam:ChannelAttention",
        config=dict(channel=32, rate=4),
        inputs=image_batch(3, 13, 17, 32),
        bench_config=dict(channel=64, rate=4),
        bench_inputs=image_batch(16, 56, 56, 64),
        train_mode=False,
    )
)

register(
    Entry(
        name="cbam_spatial_attention_seed",
        family="cbam",
        paper=_PAPER + " (seed blog variant)",
        arxiv=_ARXIV,
        flax=SpatialAttention,
        torch="flax_attn.testing.torch_ref.cbam:SpatialAttention",
        config=dict(kernel_size=3),
        inputs=image_batch(3, 13, 17, 8),
        bench_config=dict(kernel_size=7),
        bench_inputs=image_batch(16, 56, 56, 64),
        train_mode=False,
    )
)
