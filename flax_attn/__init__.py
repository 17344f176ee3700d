"""flax-attn: attention blocks for JAX/Flax that match their PyTorch originals.

Blocks are Flax linen modules (NHWC images, ``(batch, length, features)`` sequences) that take
``train=`` in ``__call__``; the math lives in :mod:`flax_attn.ops`, checkpoints move through
:mod:`flax_attn.convert`, and :mod:`flax_attn.catalogue` lists every block with its PyTorch
reference. Importing this package never imports torch.
"""

from flax_attn import catalogue, convert, layers, ops
from flax_attn.attention import MultiheadAttention, ProjectedMultiHeadAttention
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

__version__ = "0.1.0"

# Block families: each module registers its catalogue entries on import.
__all__ = [
    "DETR",
    "MultiheadAttention",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "ProjectedMultiHeadAttention",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "catalogue",
    "convert",
    "layers",
    "ops",
]
