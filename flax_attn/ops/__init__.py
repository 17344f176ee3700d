"""The math of flax-attn as plain functions: arrays in, arrays out, no parameters.

Every block module calls into these; the Pallas kernels in ``flax_attn.kernels`` are alternative
implementations of the same ops, chosen with ``implementation=`` (``None`` = best for the backend,
``"xla"``, ``"pallas"``). The pure-JAX function here is the reference every kernel is tested against.
"""

from flax_attn.ops.attention import masked_softmax, scaled_dot_product_attention
from flax_attn.ops.attention_in_attention import attention_dropout_weights, mix_branches, sigmoid_gate
from flax_attn.ops.channel import (
    attention_pool2d,
    channel_pool,
    directional_avg_pool,
    eca_kernel_size,
    global_pool,
)
from flax_attn.ops.criss_cross import criss_cross_attention
from flax_attn.ops.danet import channel_attention, position_attention
from flax_attn.ops.deform import deform_conv2d
from flax_attn.ops.max_pool import max_pool
from flax_attn.ops.neighborhood import na1d, na2d, na3d, neighborhood_attention
from flax_attn.ops.non_local import non_local_attention
from flax_attn.ops.pooling import adaptive_avg_pool2d, adaptive_max_pool2d
from flax_attn.ops.position import sine_position_embedding
from flax_attn.ops.relative_logits import augmented_attention, relative_logits_2d
from flax_attn.ops.resize import interpolate
from flax_attn.ops.sampling import affine_grid, foveate, grid_sample
from flax_attn.ops.space_to_depth import space_to_depth
from flax_attn.ops.stereo import correlation_cost_volume, disparity_regression, disparity_warp
from flax_attn.ops.window import window_attention

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "affine_grid",
    "attention_dropout_weights",
    "attention_pool2d",
    "augmented_attention",
    "channel_attention",
    "channel_pool",
    "correlation_cost_volume",
    "criss_cross_attention",
    "deform_conv2d",
    "directional_avg_pool",
    "disparity_regression",
    "disparity_warp",
    "eca_kernel_size",
    "foveate",
    "global_pool",
    "grid_sample",
    "interpolate",
    "masked_softmax",
    "max_pool",
    "mix_branches",
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "non_local_attention",
    "position_attention",
    "relative_logits_2d",
    "scaled_dot_product_attention",
    "sigmoid_gate",
    "sine_position_embedding",
    "space_to_depth",
    "window_attention",
]
