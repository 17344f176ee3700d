"""Catalogue entries of :mod:`flax_attn.neighborhood` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

import numpy as np

from flax_attn.catalogue import family
from flax_attn.neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D


def _inputs(*shape):
    def make(rng: np.random.Generator):
        return {"x": rng.standard_normal(shape).astype(np.float32)}

    return make


add = family(
    "neighborhood",
    paper="Hassani et al., CVPR 2023 (NAT) / arXiv 2209.15001 (DiNAT)",
    arxiv="2204.07143",
    image_inputs=(),
    output_layout="same",
    train_mode=False,
)

# The 2-D layer without relative positional bias (NAT-style, the same keys as NATTEN 0.21's module:
# qkv, proj; NATTEN's own module (stride, causal) has no CPU backward, tests/test_neighborhood_module.py
# compares its forward) and with it (NAT/DiNAT's layer), both with a dilated window.
for _name, _bias in (("neighborhood_attention_2d", False), ("neighborhood_attention_2d_rpb", True)):
    add(
        name=_name,
        kernel="neighborhood",  # ops.na2d(implementation="pallas"): kernels.neighborhood.na2d_pallas
        flax=NeighborhoodAttention2D,
        torch="nat_neighborhood_attention",
        config=dict(embed_dim=16, num_heads=2, kernel_size=5, dilation=2, bias=_bias),
        inputs=_inputs(3, 13, 17, 16),
        bench_config=dict(embed_dim=64, num_heads=2, kernel_size=7, bias=_bias),
        bench_inputs=_inputs(4, 56, 56, 64),
    )

add(
    name="neighborhood_attention_1d_rpb",
    flax=NeighborhoodAttention1D,
    torch="nat_neighborhood_attention_1d",
    config=dict(embed_dim=16, num_heads=2, kernel_size=7, dilation=3, bias=True),
    inputs=_inputs(3, 23, 16),
)

add(
    name="neighborhood_attention_3d_rpb",
    flax=NeighborhoodAttention3D,
    torch="nat_neighborhood_attention_3d",
    config=dict(embed_dim=16, num_heads=2, kernel_size=3, bias=True),
    inputs=_inputs(2, 4, 7, 9, 16),
    bench_config=dict(embed_dim=64, num_heads=2, kernel_size=3, bias=True),
    bench_inputs=_inputs(1, 8, 28, 28, 64),
)
