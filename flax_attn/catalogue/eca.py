"""Catalogue entries of :mod:`flax_attn.eca` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import family, image_batch
from flax_attn.eca import ECALayer

add = family("eca", paper="Wang et al., CVPR 2020", arxiv="1910.03151")

add(
    name="eca",
    flax=ECALayer,
    torch="eca_layer",
    config=dict(channel=32, k_size=5),
    inputs=image_batch(3, 13, 17, 32),
    bench_config=dict(channel=256, k_size=5),
    bench_inputs=image_batch(16, 56, 56, 256),
    train_mode=False,
)
