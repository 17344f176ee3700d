"""Catalogue entries of :mod:`flax_attn.gcnet` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import family, image_batch
from flax_attn.gcnet import ContextBlock

add = family("gcnet", paper="Cao et al., ICCVW 2019", arxiv="1904.11492")

add(
    name="context_block",
    flax=ContextBlock,
    config=dict(inplanes=32, ratio=1 / 4, pooling_type="att", fusion_types=("channel_add", "channel_mul")),
    inputs=image_batch(3, 13, 17, 32),
    bench_config=dict(inplanes=256, ratio=1 / 16, pooling_type="att", fusion_types=("channel_add",)),
    bench_inputs=image_batch(16, 28, 28, 256),
    train_mode=False,
    float64_modes=("eval",),
    conditioning="eval: float32 rounding moves grad[x] by 4.5e-6 (torch) / 3.0e-6 (Flax), 0.18 of the 1e-5 "
    "tolerance (the attention-pooling softmax over all 221 positions feeds a channel_mul gate)",
)
