"""GCNet global context block (Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation
Networks and Beyond", ICCVW 2019, arXiv 1904.11492).

Follows the official ``ContextBlock`` (xvjiarui/GCNet and mmdetection, ``mmdet/ops/gcb/context_block.py``):
context modelling by attention pooling (``conv_mask`` 1x1 conv to one logit per position, softmax
over all H*W positions, weighted sum of the features) or global average pooling, then one or two
bottleneck transforms ``Conv1x1 - LayerNorm([planes, 1, 1]) - ReLU - Conv1x1`` fused by
broadcast addition (``channel_add``) and/or sigmoid multiplication (``channel_mul``).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from flax_attn.convert.engine import Rename, Reshape, sequential_rules
from flax_attn.layers import BlockFields, Conv, LayerNorm, merge_train
from flax_attn.ops.channel import attention_pool2d, global_pool
from flax_attn.ops.checks import check_channels, check_rank
from flax_attn.ops.dtypes import compute_dtype

__all__ = ["ContextBlock"]


# mmcv kaiming_init(mode="fan_in"): kaiming_normal_(nonlinearity="relu"), i.e. N(0, 2 / fan_in), bias 0.
_kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_FUSIONS = ("channel_add", "channel_mul")


class ContextBlock(BlockFields):
    """GCNet's global context block (Cao et al., arXiv 1904.11492), official ``ContextBlock``.

    Attributes:
      inplanes: input channels C.
      ratio: bottleneck ratio; ``planes = int(inplanes * ratio)`` must be at least 1.
      pooling_type: ``"att"`` (attention pooling, the paper's) or ``"avg"``.
      fusion_types: non-empty subset of ``("channel_add", "channel_mul")`` (default ``channel_add``).

    Init follows the official ``reset_parameters``: ``conv_mask`` kaiming-normal (fan_in, bias 0)
    and the last conv of each fusion branch zero (weight and bias), so a fresh block is the
    identity; other layers use torch's defaults.

    Torch keys: ``conv_mask.*``, ``channel_add_conv.{0,1,3}.*``, ``channel_mul_conv.{0,1,3}.*``;
    the LayerNorm's ``[planes, 1, 1]`` weight and bias are reshaped to ``(planes,)`` on conversion.

    Input ``(B, H, W, C)``; output the same shape.

    Example:
      >>> gc = ContextBlock(inplanes=32, ratio=1 / 4, fusion_types=("channel_add", "channel_mul"))
      >>> x = jax.numpy.ones((2, 7, 9, 32))
      >>> variables = gc.init(jax.random.PRNGKey(0), x)
      >>> gc.apply(variables, x).shape
      (2, 7, 9, 32)
    """

    inplanes: int
    ratio: float
    pooling_type: str = "att"
    fusion_types: Sequence[str] = ("channel_add",)

    @property
    def planes(self) -> int:
        return int(self.inplanes * self.ratio)

    @nn.nowrap
    def torch_rules(self, layout):
        p = self.planes
        return [
            Rename(r"(channel_(?:add|mul)_conv)_1\.(weight|bias)", r"\1.1.\2", Reshape((p, 1, 1), (p,))),
            *sequential_rules("channel_(?:add|mul)_conv"),
        ]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "ContextBlock"
        x = x.astype(compute_dtype(where, self.dtype, x=x))
        if self.pooling_type not in ("avg", "att"):
            raise ValueError(f"{where}: `pooling_type` must be 'avg' or 'att', got {self.pooling_type!r}")
        fusions = tuple(self.fusion_types)
        if not fusions or any(f not in _FUSIONS for f in fusions):
            raise ValueError(f"{where}: `fusion_types` must be a non-empty subset of {_FUSIONS}, got {fusions!r}")
        if self.planes < 1:
            raise ValueError(
                f"{where}: `inplanes`={self.inplanes} * `ratio`={self.ratio} gives {self.planes} bottleneck "
                f"planes; need at least 1"
            )
        check_rank(where, "x", x, 4, "(batch, height, width, channels)")
        check_channels(where, "x", x, self.inplanes)
        kw = self.precision()
        if self.pooling_type == "att":
            logits = Conv(1, 1, kernel_init=_kaiming_fan_in, name="conv_mask", **kw)(x)
            context = attention_pool2d(x, logits)
        else:
            context = global_pool(x, "avg")
        context = context[:, None, None, :]  # (B, 1, 1, C), torch's [N, C, 1, 1]

        def transform(prefix):
            y = Conv(self.planes, 1, name=f"{prefix}_0", **kw)(context)
            y = LayerNorm(name=f"{prefix}_1", **kw)(y)
            y = nn.relu(y)
            return Conv(self.inplanes, 1, kernel_init=nn.initializers.zeros, name=f"{prefix}_3", **kw)(y)

        out = x
        if "channel_mul" in fusions:
            out = out * nn.sigmoid(transform("channel_mul_conv")).astype(x.dtype)
        if "channel_add" in fusions:
            out = out + transform("channel_add_conv").astype(x.dtype)
        return out
