"""Catalogue entries of :mod:`flax_attn.a2n` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.a2n import A2N, AAB, PA
from flax_attn.catalogue import family, image_batch

add = family(
    "a2n", paper="Chen et al., Attention in Attention Network for Image Super-Resolution, 2021", arxiv="2104.09497"
)

add(
    name="aab",
    flax=AAB,
    config=dict(nf=8, reduction=4, K=2, t=30),
    inputs=image_batch(3, 13, 17, 8),
    bench_config=dict(nf=40, reduction=4, K=2, t=30),
    bench_inputs=image_batch(16, 64, 64, 40),
    train_mode=False,
)

add(
    name="pixel_attention",
    paper="Zhao et al., Efficient Image Super-Resolution Using Pixel Attention (PA of A2N), 2020",
    arxiv="2010.01073",
    flax=PA,
    config=dict(nf=6),
    inputs=image_batch(3, 13, 17, 6),
    bench_config=dict(nf=24),
    bench_inputs=image_batch(16, 128, 128, 24),
    train_mode=False,
)

add(
    name="a2n",
    flax=A2N,
    torch="AAN",
    # Tiny network with the reference's argument names; scale 4 exercises both reconstruction stages.
    config=dict(in_nc=3, out_nc=3, nf=8, unf=6, nb=2, scale=4),
    inputs=image_batch(3, 13, 17, 3),
    bench_config=dict(in_nc=3, out_nc=3, nf=40, unf=24, nb=16, scale=4),
    bench_inputs=image_batch(1, 64, 64, 3),
    atol=1e-4,
    rtol=1e-4,
    train_mode=False,
)
