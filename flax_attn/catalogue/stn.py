"""Catalogue entries of :mod:`flax_attn.stn` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

import jax.numpy as jnp

from flax_attn.catalogue import family, image_batch
from flax_attn.stn import SpatialTransformer, STNTutorialNet, TutorialLocalization


def _spatial_transformer(
    in_channels=1,
    input_size=(28, 28),
    mode="bilinear",
    padding_mode="zeros",
    align_corners=False,
    dtype=None,
    param_dtype=jnp.float32,
):
    """The reference's ``SpatialTransformer``: a :class:`SpatialTransformer` around the tutorial's
    :class:`TutorialLocalization`, built from the reference's flat constructor arguments."""
    loc = TutorialLocalization(in_channels=in_channels, input_size=input_size, dtype=dtype, param_dtype=param_dtype)
    return SpatialTransformer(
        localization=loc, mode=mode, padding_mode=padding_mode, align_corners=align_corners, dtype=dtype
    )


add = family("stn", paper="Jaderberg et al., NeurIPS 2015", arxiv="1506.02025")

add(
    name="spatial_transformer",
    allowed_hlo={
        "stablehlo.scatter": (
            "grid_sample at the affine grid predicted from the input: data-dependent bilinear sampling (packed "
            "corner gather; its transpose is the scatter)"
        )
    },
    flax=_spatial_transformer,
    torch="SpatialTransformer",
    config=dict(in_channels=2, input_size=(29, 33), padding_mode="border"),
    inputs=image_batch(3, 29, 33, 2),
    bench_config=dict(in_channels=3, input_size=(128, 128)),
    bench_inputs=image_batch(32, 128, 128, 3),
    # A whole small model: theta agrees to ~6e-8, but the sampler scales theta's rounding by W/2
    # times the image gradient, so it compares in float64.
    train_mode=False,
    float64_modes=("eval",),
    conditioning="eval: float32 rounding moves grad[x] by 3.2e-5 (torch) / 5.0e-5 (Flax), 0.27 of the "
    "loosened 1e-4 tolerance (2.7x the 1e-5 one)",
)

add(
    name="stn_tutorial_net",
    allowed_hlo={
        "stablehlo.scatter": (
            "grid_sample at the affine grid predicted from the input: data-dependent bilinear sampling (packed "
            "corner gather; its transpose is the scatter)"
        )
    },
    paper="Jaderberg et al., NeurIPS 2015 (PyTorch STN tutorial network)",
    flax=STNTutorialNet,
    torch="Net",
    config={},
    inputs=image_batch(3, 28, 28, 1),
    bench_inputs=image_batch(64, 28, 28, 1),
    output_layout="same",
    atol=1e-4,
    rtol=1e-4,
    # Only dropout differs in training; random masks cannot match torch's, so parity is eval-only.
    train_mode=False,
)
