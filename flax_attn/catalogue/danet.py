"""Catalogue entries of :mod:`flax_attn.danet` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.catalogue import family, image_batch
from flax_attn.danet import CAM_Module, DANetHead, PAM_Module

add = family("danet", paper="Fu et al., CVPR 2019", arxiv="1809.02983")

add(
    name="pam",
    flax=PAM_Module,
    config=dict(in_dim=16),
    inputs=image_batch(3, 13, 17, 16),
    bench_config=dict(in_dim=512),
    bench_inputs=image_batch(2, 64, 64, 512),
    train_mode=False,
)

add(
    name="cam",
    flax=CAM_Module,
    config=dict(in_dim=12),
    inputs=image_batch(3, 13, 17, 12),
    bench_config=dict(in_dim=512),
    bench_inputs=image_batch(2, 64, 64, 512),
    # CAM's logits are un-normalised sums over all H*W pixels (~221 here for unit inputs), so float32
    # rounding alone moves them by ~221 * 6e-8 ~ 1e-5 and the softmax carries that into the output;
    # it compares in float64. tests/test_danet.py checks float32 at 1e-5 on well-conditioned inputs.
    train_mode=False,
    float64_modes=("eval",),
    conditioning="eval: float32 rounding moves grad[x] by 4.3e-5 (torch) / 1.3e-4 (Flax), 0.41 of the "
    "loosened 1e-4 tolerance (4x the 1e-5 one)",
)

add(
    name="danet_head",
    flax=DANetHead,
    torch="danet_head",
    # Dropout off so train-mode parity checks the BatchNorm statistics (torch's dropout RNG differs);
    # tests/test_danet.py checks the Dropout2d semantics separately.
    config=dict(in_channels=64, out_channels=5, dropout=0.0),
    inputs=image_batch(3, 13, 17, 64),
    bench_config=dict(in_channels=2048, out_channels=19),
    bench_inputs=image_batch(2, 64, 64, 2048),
)
