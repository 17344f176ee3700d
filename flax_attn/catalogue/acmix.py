"""Catalogue entries of :mod:`flax_attn.acmix` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

from flax_attn.acmix import ACmix, WindowAttention
from flax_attn.catalogue import family, image_batch

add = family("acmix", paper="Pan et al., CVPR 2022", arxiv="2111.14556", train_mode=False)
# ACmix at stride 1 and 2. Stride 2 needs even sizes (the official view(h // 2, w // 2) of the
# strided unfold): 10x14 in, 5x7 out.
for _name, _stride, _hw in (("acmix", 1, (13, 17)), ("acmix_stride2", 2, (10, 14))):
    add(
        name=_name,
        flax=ACmix,
        kernel="neighborhood",
        config=dict(in_planes=8, out_planes=16, kernel_att=7, head=4, kernel_conv=3, stride=_stride),
        inputs=image_batch(3, *_hw, 8),
        bench_config=dict(in_planes=256, out_planes=256, kernel_att=7, head=8, kernel_conv=3, stride=_stride),
        bench_inputs=image_batch(4, 56, 56, 256),
    )

add(
    name="window_attention",
    paper="Liu et al., ICCV 2021 (Swin Transformer)",
    arxiv="2103.14030",
    flax=WindowAttention,
    torch="ShiftedWindowAttention",
    config=dict(dim=12, window_size=3, num_heads=3, shift_size=1),
    inputs=image_batch(3, 9, 15, 12),
    bench_config=dict(dim=96, window_size=7, num_heads=3, shift_size=3),
    bench_inputs=image_batch(32, 56, 56, 96),
    output_layout="same",
    image_inputs=(),
)
