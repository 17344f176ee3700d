"""flax-attn: attention blocks for JAX/Flax that match their PyTorch originals.

Blocks are Flax linen modules (NHWC images, ``(batch, length, features)`` sequences) that take
``train=`` in ``__call__``; the math lives in :mod:`flax_attn.ops`, checkpoints move through
:mod:`flax_attn.convert`, and :mod:`flax_attn.catalogue` lists every block with its PyTorch
reference. Importing this package never imports torch.
"""

from flax_attn import catalogue, convert, layers, ops
from flax_attn.aanet import AdaptiveAggregation, AdaptiveAggregationModule, DeformSimpleBottleneck
from flax_attn.attention import MultiheadAttention, ProjectedMultiHeadAttention
from flax_attn.deform import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack
from flax_attn.hard_attention import RecurrentAttention, ram_hybrid_loss
from flax_attn.stn import SpatialTransformer, STNTutorialNet, TutorialLocalization

__version__ = "0.1.0"

# Block families: each module registers its catalogue entries on import.
__all__ = [
    "AdaptiveAggregation",
    "AdaptiveAggregationModule",
    "DeformSimpleBottleneck",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2dPack",
    "MultiheadAttention",
    "ProjectedMultiHeadAttention",
    "RecurrentAttention",
    "STNTutorialNet",
    "SpatialTransformer",
    "TutorialLocalization",
    "catalogue",
    "convert",
    "layers",
    "ops",
    "ram_hybrid_loss",
]
