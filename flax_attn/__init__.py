"""flax-attn: attention blocks for JAX/Flax that match their PyTorch originals.

Blocks are Flax linen modules (NHWC images, ``(batch, length, features)`` sequences) that take
``train`` in the constructor or positionally in ``__call__`` (so they work inside ``nn.scan``,
``nn.remat`` and ``nn.vmap``) and follow one dtype rule (:mod:`flax_attn.ops.dtypes`); the math
lives in :mod:`flax_attn.ops`, checkpoints move through :mod:`flax_attn.convert`,
:mod:`flax_attn.catalogue` lists every block with its PyTorch reference, and
:mod:`flax_attn.nnx` wraps any block for Flax NNX. Importing this package never imports torch.
"""

from flax_attn import catalogue, convert, layers, ops
from flax_attn.a2n import A2N, AAB, PA, AttentionBranch
from flax_attn.aanet import AANet, AdaptiveAggregation, AdaptiveAggregationModule, DeformSimpleBottleneck
from flax_attn.acmix import ACmix, WindowAttention
from flax_attn.attention import MultiheadAttention, ProjectedMultiHeadAttention
from flax_attn.augmented_conv import AugmentedConv
from flax_attn.cbam import CBAM, ChannelAttention, ChannelGate, SpatialAttention, SpatialGate
from flax_attn.ccnet import CrissCrossAttention, RCCAModule
from flax_attn.coordatt import CoordAtt
from flax_attn.danet import CAM_Module, DANetHead, PAM_Module
from flax_attn.deform import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack
from flax_attn.detr import (
    DETR,
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from flax_attn.eca import ECALayer
from flax_attn.gcnet import ContextBlock
from flax_attn.hard_attention import RecurrentAttention, ram_hybrid_loss
from flax_attn.neighborhood import (
    NeighborhoodAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
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
from flax_attn.se import SEBasicBlock, SEBottleneck, SELayer, SEResNet, se_resnet18, se_resnet34, se_resnet50
from flax_attn.spd import SPDConv
from flax_attn.stn import SpatialTransformer, STNTutorialNet, TutorialLocalization

__version__ = "0.1.0"

# The block families. Their catalogue entries live in flax_attn/catalogue/ and load on first use.
__all__ = [
    "A2N",
    "AAB",
    "AANet",
    "ACmix",
    "AdaptiveAggregation",
    "AdaptiveAggregationModule",
    "AttentionBranch",
    "AttentionModule_stage1",
    "AttentionModule_stage2",
    "AttentionModule_stage3",
    "AugmentedConv",
    "CAM_Module",
    "CBAM",
    "ChannelAttention",
    "ChannelGate",
    "ContextBlock",
    "CoordAtt",
    "CrissCrossAttention",
    "DANetHead",
    "DETR",
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformSimpleBottleneck",
    "ECALayer",
    "ModulatedDeformConv2dPack",
    "MultiheadAttention",
    "NeighborhoodAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "NONLocalBlock1D",
    "NONLocalBlock2D",
    "NONLocalBlock3D",
    "NonLocalBlockND",
    "NonLocalMNISTNet",
    "PA",
    "PAM_Module",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "ProjectedMultiHeadAttention",
    "RCCAModule",
    "RecurrentAttention",
    "ResidualAttentionModel_56",
    "ResidualAttentionModel_92",
    "ResidualBlock",
    "SEBasicBlock",
    "SEBottleneck",
    "SELayer",
    "SEResNet",
    "SPDConv",
    "STNTutorialNet",
    "SpatialAttention",
    "SpatialGate",
    "SpatialTransformer",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "TutorialLocalization",
    "WindowAttention",
    "catalogue",
    "convert",
    "layers",
    "ops",
    "ram_hybrid_loss",
    "se_resnet18",
    "se_resnet34",
    "se_resnet50",
]
