"""Catalogue entries of :mod:`flax_attn.eca` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import Entry, image_batch, register
from flax_attn.eca import ECALayer

register(
    Entry(
        name="eca",
        family="eca",
        paper="Wang et al., CVPR 2020",
        arxiv="1910.03151",
        flax=ECALayer,
        torch="flax_attn.testing.torch_ref.eca:eca_layer",
        config=dict(channel=32, k_size=5),
        inputs=image_batch(3, 13, 17, 32),
        bench_config=dict(channel=256, k_size=5),
        bench_inputs=image_batch(16, 56, 56, 256),
        train_mode=False,
    )
)
