"""Catalogue entries of :mod:`flax_attn.ccnet` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import family, image_batch
from flax_attn.ccnet import CrissCrossAttention, RCCAModule

add = family("ccnet", paper="Huang et al., ICCV 2019 (CCNet)", arxiv="1811.11721")

add(
    name="criss_cross_attention",
    flax=CrissCrossAttention,
    config=dict(in_dim=16),
    inputs=image_batch(3, 13, 17, 16),
    bench_config=dict(in_dim=512),
    bench_inputs=image_batch(8, 97, 97, 512),
    kernel="criss_cross",
    train_mode=False,
)

add(
    name="rcca_module",
    flax=RCCAModule,
    # Dropout off for parity: torch and JAX draw different masks (Dropout2d is tested separately).
    config=dict(in_channels=64, out_channels=24, num_classes=5, recurrence=2, dropout=0.0),
    inputs=image_batch(3, 13, 17, 64),
    bench_config=dict(in_channels=2048, out_channels=512, num_classes=19, recurrence=2),
    bench_inputs=image_batch(2, 97, 97, 2048),
    kernel="criss_cross",
)
