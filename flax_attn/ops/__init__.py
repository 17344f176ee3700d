"""The math of flax-attn as plain functions: arrays in, arrays out, no parameters.

Every block module calls into these; the Pallas kernels in ``flax_attn.kernels`` are alternative
implementations of the same ops, chosen with ``implementation=`` (``None`` = best for the backend,
``"xla"``, ``"pallas"``). The pure-JAX function here is the reference every kernel is tested against.
"""

from flax_attn.ops.attention import masked_softmax, scaled_dot_product_attention
from flax_attn.ops.pooling import adaptive_avg_pool2d, adaptive_max_pool2d
from flax_attn.ops.position import sine_position_embedding
from flax_attn.ops.resize import interpolate

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "interpolate",
    "masked_softmax",
    "scaled_dot_product_attention",
    "sine_position_embedding",
]
