"""Pallas kernels: alternative implementations of ops in :mod:`flax_attn.ops`, and the table that
decides when ``implementation=None`` may pick one.

One contract for every kernel here: ``backend`` is ``"triton"`` (GPU) or ``"mosaic_tpu"`` (TPU)
and only selects tiling rules (the window kernel also has a ``"mosaic_gpu"`` port, see
``docs/mosaic_gpu.md``); ``interpret=None`` interprets exactly where the local platform has
no Pallas lowering; tiling is one :class:`BlockSizes`; arguments are checked by
:mod:`flax_attn.kernels.checks`, which the ops import too. Imports run one way: ``ops`` ->
``kernels``; nothing here imports ``flax_attn.ops``.
"""

from flax_attn.kernels._common import BACKENDS, BlockSizes
from flax_attn.kernels.criss_cross import criss_cross_attention_pallas
from flax_attn.kernels.dispatch import OPS, VERIFIED, VerifiedRecord, default_implementation
from flax_attn.kernels.neighborhood import na2d_pallas, neighborhood_attention_pallas
from flax_attn.kernels.window import window_attention_pallas

__all__ = [
    "BACKENDS",
    "OPS",
    "VERIFIED",
    "BlockSizes",
    "VerifiedRecord",
    "criss_cross_attention_pallas",
    "default_implementation",
    "na2d_pallas",
    "neighborhood_attention_pallas",
    "window_attention_pallas",
]
