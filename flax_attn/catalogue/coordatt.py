"""Catalogue entries of :mod:`flax_attn.coordatt` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import family, image_batch
from flax_attn.coordatt import CoordAtt

add = family("coordatt", paper="Hou et al., CVPR 2021", arxiv="2103.02907")

add(
    name="coord_att",
    flax=CoordAtt,
    config=dict(inp=32, oup=32, reduction=2),
    inputs=image_batch(3, 13, 17, 32),
    bench_config=dict(inp=64, oup=64, reduction=32),
    bench_inputs=image_batch(16, 56, 56, 64),
)
