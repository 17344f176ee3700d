"""Catalogue entries of :mod:`flax_attn.attention` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

import numpy as np

from flax_attn.attention import MultiheadAttention, ProjectedMultiHeadAttention
from flax_attn.catalogue import family


def _mha_inputs(b, l, s, pad=True):
    """Inputs sized from the config (embed_dim, kdim, vdim), so overrides get matching inputs."""

    def make(rng, config):
        e = config["embed_dim"]
        kdim, vdim = config.get("kdim") or e, config.get("vdim") or e
        out = {
            "query": rng.standard_normal((b, l, e), dtype=np.float32),
            "key": rng.standard_normal((b, s, kdim), dtype=np.float32),
            "value": rng.standard_normal((b, s, vdim), dtype=np.float32),
        }
        if pad:
            kpm = np.zeros((b, s), dtype=bool)
            kpm[0, -2:] = True  # batch 0 has two padded keys
            out["key_padding_mask"] = kpm
        return out

    return make


add = family("attention", paper="Vaswani et al., NeurIPS 2017", arxiv="1706.03762")

add(
    name="multihead_attention",
    flax=MultiheadAttention,
    torch="multihead_attention",
    config=dict(embed_dim=24, num_heads=4, kdim=20, vdim=12, add_bias_kv=True),
    inputs=_mha_inputs(3, 13, 17),
    bench_config=dict(embed_dim=256, num_heads=8),
    bench_inputs=_mha_inputs(8, 256, 256, pad=False),
    image_inputs=(),
    output_layout="same",
    call_kwargs=dict(need_weights=True, average_attn_weights=False),
    train_mode=False,
)

add(
    name="projected_multi_head_attention",
    paper="Vaswani et al., NeurIPS 2017 (blog variant with separate projections)",
    flax=ProjectedMultiHeadAttention,
    config=dict(n_head=3, d_k=8, d_k_=20, d_v=6, d_v_=12, d_o=10),
    inputs=lambda rng: {
        "q": rng.standard_normal((3, 13, 20), dtype=np.float32),
        "k": rng.standard_normal((3, 17, 20), dtype=np.float32),
        "v": rng.standard_normal((3, 17, 12), dtype=np.float32),
    },
    bench_config=dict(n_head=8, d_k=32, d_k_=256, d_v=32, d_v_=256, d_o=256),
    bench_inputs=lambda rng: {
        "q": rng.standard_normal((8, 256, 256), dtype=np.float32),
        "k": rng.standard_normal((8, 256, 256), dtype=np.float32),
        "v": rng.standard_normal((8, 256, 256), dtype=np.float32),
    },
    image_inputs=(),
    output_layout="same",
    train_mode=False,
)
