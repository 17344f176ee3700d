"""Catalogue entries of :mod:`flax_attn.spd` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import family, image_batch
from flax_attn.spd import SPDConv

add = family("spd", paper="Sunkara & Luo, ECML PKDD 2022", arxiv="2208.03641")

add(
    name="spd_conv",
    flax=SPDConv,
    config=dict(c1=8, c2=16, k=3),
    # space-to-depth needs even sizes: non-square 14x18 stands in for the usual odd 13x17.
    inputs=image_batch(3, 14, 18, 8),
    bench_config=dict(c1=64, c2=128, k=3),
    bench_inputs=image_batch(16, 56, 56, 64),
)
