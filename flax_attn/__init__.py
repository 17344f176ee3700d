"""flax-attn: attention blocks for JAX/Flax that match their PyTorch originals.

Blocks are Flax linen modules (NHWC images, ``(batch, length, features)`` sequences) that take
``train=`` in ``__call__``; the math lives in :mod:`flax_attn.ops`, checkpoints move through
:mod:`flax_attn.convert`, and :mod:`flax_attn.catalogue` lists every block with its PyTorch
reference. Importing this package never imports torch.
"""

from flax_attn import catalogue, convert, layers, ops
from flax_attn.attention import MultiheadAttention, ProjectedMultiHeadAttention
from flax_attn.augmented_conv import AugmentedConv
from flax_attn.danet import CAM_Module, DANetHead, PAM_Module
from flax_attn.non_local import (
    NONLocalBlock1D,
    NONLocalBlock2D,
    NONLocalBlock3D,
    NonLocalBlockND,
    NonLocalMNISTNet,
)
from flax_attn.residual_attention import (
    AttentionModule_stage1,
    AttentionModule_stage2,
    AttentionModule_stage3,
    ResidualAttentionModel_56,
    ResidualAttentionModel_92,
    ResidualBlock,
)

__version__ = "0.1.0"

# Block families: each module registers its catalogue entries on import.
__all__ = [
    "AttentionModule_stage1",
    "AttentionModule_stage2",
    "AttentionModule_stage3",
    "AugmentedConv",
    "CAM_Module",
    "DANetHead",
    "MultiheadAttention",
    "NONLocalBlock1D",
    "NONLocalBlock2D",
    "NONLocalBlock3D",
    "NonLocalBlockND",
    "NonLocalMNISTNet",
    "PAM_Module",
    "ResidualAttentionModel_56",
    "ResidualAttentionModel_92",
    "ResidualBlock",
    "ProjectedMultiHeadAttention",
    "catalogue",
    "convert",
    "layers",
    "ops",
]
