"""Catalogue entries of :mod:`flax_attn.hard_attention` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

import numpy as np

from flax_attn.catalogue import family
from flax_attn.hard_attention import RecurrentAttention


def _ram_inputs(b, hw, c, t):
    def make(rng):
        return {
            "x": rng.standard_normal((b, hw, hw, c), dtype=np.float32),
            "l_0": rng.uniform(-1.0, 1.0, (b, 2)).astype(np.float32),
            "noise": rng.standard_normal((b, t, 2), dtype=np.float32),
        }

    return make


add = family(
    "hard_attention", paper="Mnih et al., NeurIPS 2014 (kevinzakka/recurrent-visual-attention)", arxiv="1406.6247"
)

add(
    name="recurrent_attention",
    flax=RecurrentAttention,
    torch="RecurrentAttentionRollout",
    config=dict(g=4, k=3, s=2, c=2, h_g=16, h_l=8, std=0.17, hidden_size=24, num_classes=10, num_glimpses=3),
    # The official retina takes square images (its denormalize uses the height for both axes).
    inputs=_ram_inputs(3, 29, 2, 3),
    bench_config=dict(g=8, k=3, s=2, c=1, h_g=128, h_l=128, std=0.17, hidden_size=256, num_classes=10, num_glimpses=6),
    bench_inputs=_ram_inputs(256, 28, 1, 6),
    image_inputs=("x",),
    output_layout="same",
    train_mode=False,
)
