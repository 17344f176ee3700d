"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv 1807.06521).

The official module (Jongchan/attention-module, ``MODELS/cbam.py``) is a channel gate followed by a
spatial gate:

* ``ChannelGate``: global avg and max pooling (also ``lp``/``lse``), one shared MLP
  ``mlp = Sequential(Flatten, Linear, ReLU, Linear)`` (keys ``mlp.1``, ``mlp.3``, with bias), the
  branch outputs summed, sigmoid, rescale.
* ``SpatialGate``: ``ChannelPool`` stacks ``[max, mean]`` over channels, a 7x7 ``BasicConv`` (conv
  without bias + ``BatchNorm2d(eps=1e-5, momentum=0.01, affine=True)``, ``relu=False``), sigmoid,
  rescale.

The seed blog's variant is kept apart, as :class:`ChannelAttention` and :class:`SpatialAttention`:
1x1-conv MLP without bias (``fc1.0``/``fc1.2``, reduction ``rate=4``) and a 3x3 (or 7x7) conv
without bias or BatchNorm on ``[mean, max]``, the opposite order to the official ``[max, mean]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp  # noqa: F401  (the docstring examples use it)

from flax_attn.convert.engine import Conv1x1AsLinear, Rename
from flax_attn.layers import BatchNorm, BatchStatsFields, BlockFields, Conv, Linear, merge_train
from flax_attn.ops.channel import channel_pool, global_pool
from flax_attn.ops.checks import check_channels
from flax_attn.ops.dtypes import compute_dtype

__all__ = ["BasicConv", "CBAM", "ChannelAttention", "ChannelGate", "SpatialAttention", "SpatialGate"]

_NHWC = "(batch, height, width, channels)"
_POOL_TYPES = ("avg", "max", "lp", "lse")


def _hidden(where: str, name: str, channels: int, ratio_name: str, ratio: int) -> int:
    if ratio <= 0 or channels % ratio or channels // ratio == 0:
        raise ValueError(
            f"{where}: `{name}`={channels} must be a positive multiple of `{ratio_name}`={ratio} "
            f"(the shared MLP has {name} // {ratio_name} = {channels // max(ratio, 1)} hidden units)"
        )
    return channels // ratio


def _channel_gate(x: jax.Array, fc1: nn.Module, fc2: nn.Module, pool_types: Sequence[str]) -> jax.Array:
    """``x`` times the sigmoid of the shared MLP ``fc2(relu(fc1(.)))`` summed over the global poolings."""
    att = None
    for pool_type in pool_types:
        raw = fc2(nn.relu(fc1(global_pool(x, pool_type))))
        att = raw if att is None else att + raw
    return x * nn.sigmoid(att)[:, None, None, :].astype(x.dtype)


class BasicConv(BatchStatsFields):
    """CBAM's ``BasicConv``: conv (no bias by default), optional BatchNorm (eps 1e-5, torch momentum
    0.01, affine) and optional ReLU; submodules ``conv`` and ``bn`` as in the official code."""

    out_planes: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    relu: bool = True
    bn: bool = True
    bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        x = x.astype(compute_dtype("BasicConv", self.dtype, x=x))
        kw = self.precision()
        x = Conv(
            self.out_planes,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            use_bias=self.bias,
            name="conv",
            **kw,
        )(x)
        if self.bn:
            x = BatchNorm(momentum=0.01, eps=1e-5, name="bn", **kw)(x, train=train)
        if self.relu:
            x = nn.relu(x)
        return x


class ChannelGate(BlockFields):
    """CBAM's channel attention (official ``ChannelGate``).

    Attributes:
      gate_channels: input channels C.
      reduction_ratio: MLP bottleneck ratio (16); C must be a positive multiple of it.
      pool_types: global poolings whose MLP outputs are summed, from ``avg``, ``max``, ``lp``, ``lse``.

    Input ``(B, H, W, C)``; output the same shape.
    """

    gate_channels: int
    reduction_ratio: int = 16
    pool_types: Sequence[str] = ("avg", "max")

    @nn.nowrap
    def torch_rules(self, layout):
        return [Rename(r"mlp_(1|3)\.(.*)", r"mlp.\1.\2")]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "ChannelGate"
        x = self.image_input(x, layout=_NHWC)
        check_channels(where, "x", x, self.gate_channels)
        if not self.pool_types or any(p not in _POOL_TYPES for p in self.pool_types):
            raise ValueError(
                f"{where}: `pool_types` must be a non-empty subset of {_POOL_TYPES}, got {tuple(self.pool_types)!r}"
            )
        hidden = _hidden(where, "gate_channels", self.gate_channels, "reduction_ratio", self.reduction_ratio)
        kw = self.precision()
        fc1 = Linear(hidden, name="mlp_1", **kw)
        fc2 = Linear(self.gate_channels, name="mlp_3", **kw)
        return _channel_gate(x, fc1, fc2, self.pool_types)


class SpatialGate(BatchStatsFields):
    """CBAM's spatial attention (official ``SpatialGate``): ``[max, mean]`` over channels, 7x7
    ``BasicConv`` with BatchNorm and no ReLU, sigmoid. Submodule ``spatial`` (keys
    ``spatial.conv.weight``, ``spatial.bn.*``).

    Attributes:
      kernel_size: spatial conv size (official: 7), odd; "same" padding ``(k - 1) // 2``.

    Input ``(B, H, W, C)``; output the same shape.
    """

    kernel_size: int = 7

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "SpatialGate"
        x = self.image_input(x, layout=_NHWC)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{where}: `kernel_size` must be odd to keep the size, got {self.kernel_size}")
        compressed = channel_pool(x, ("max", "mean"))
        logits = BasicConv(
            1,
            self.kernel_size,
            padding=(self.kernel_size - 1) // 2,
            relu=False,
            name="spatial",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        logits = logits(compressed, train=train)
        return x * nn.sigmoid(logits).astype(x.dtype)


class CBAM(BatchStatsFields):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv 1807.06521).

    ``SpatialGate(ChannelGate(x))`` as the official ``CBAM``; submodules ``ChannelGate`` and
    ``SpatialGate`` keep the official attribute names, so keys read
    ``ChannelGate.mlp.1.weight``, ``SpatialGate.spatial.conv.weight``, ``SpatialGate.spatial.bn.*``.

    Attributes:
      gate_channels: input channels C.
      reduction_ratio: channel-MLP ratio (16); C must be a positive multiple of it.
      pool_types: channel-gate poolings (``("avg", "max")``).
      no_spatial: channel gate only (the official ``no_spatial`` flag).

    Input ``(B, H, W, C)``; output the same shape. The spatial gate's BatchNorm uses batch
    statistics with ``train=True`` (``mutable=["batch_stats"]``).

    Example:
      >>> cbam = CBAM(gate_channels=32, reduction_ratio=4)
      >>> x = jnp.ones((2, 7, 9, 32))
      >>> variables = cbam.init(jax.random.PRNGKey(0), x)
      >>> cbam.apply(variables, x).shape
      (2, 7, 9, 32)
    """

    gate_channels: int
    reduction_ratio: int = 16
    pool_types: Sequence[str] = ("avg", "max")
    no_spatial: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        x = self.image_input(x, layout=_NHWC)
        kw = self.precision()
        out = ChannelGate(self.gate_channels, self.reduction_ratio, tuple(self.pool_types), name="ChannelGate", **kw)(x)
        if not self.no_spatial:
            out = SpatialGate(name="SpatialGate", **kw)(out, train=train)
        return out


class ChannelAttention(BlockFields):
    """The seed blog's CBAM channel attention: shared 1x1-conv MLP without bias (``fc1.0``,
    ``fc1.2``) on global avg and max pooling, summed, sigmoid, rescale.

    Attributes:
      channel: input channels C.
      rate: bottleneck ratio (the blog's default 4); C must be a positive multiple of it.

    Input ``(B, H, W, C)``; output the same shape.

    Example:
      >>> ca = ChannelAttention(channel=16)
      >>> x = jnp.ones((2, 5, 6, 16))
      >>> ca.apply(ca.init(jax.random.PRNGKey(0), x), x).shape
      (2, 5, 6, 16)
    """

    channel: int
    rate: int = 4

    torch_layouts: ClassVar[tuple[str, ...]] = ("seed",)

    @nn.nowrap
    def torch_rules(self, layout):
        return [Rename(r"fc1_(0|2)\.weight", r"fc1.\1.weight", Conv1x1AsLinear())]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "ChannelAttention"
        x = self.image_input(x, layout=_NHWC)
        check_channels(where, "x", x, self.channel)
        hidden = _hidden(where, "channel", self.channel, "rate", self.rate)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        fc_a = Linear(hidden, name="fc1_0", **kw)
        fc_b = Linear(self.channel, name="fc1_2", **kw)
        # The blog sums max + avg; the two-term sum is the same either way round.
        return _channel_gate(x, fc_a, fc_b, ("avg", "max"))


class SpatialAttention(BlockFields):
    """The seed blog's CBAM spatial attention: ``[mean, max]`` over channels, one conv without bias
    (``conv1``, 3x3 in the blog, 7x7 in the paper) and no BatchNorm, sigmoid, rescale.

    Attributes:
      kernel_size: 3 or 7 (padding ``kernel_size // 2``).

    Input ``(B, H, W, C)``; output the same shape.

    Example:
      >>> sa = SpatialAttention(kernel_size=7)
      >>> x = jnp.ones((2, 5, 6, 16))
      >>> sa.apply(sa.init(jax.random.PRNGKey(0), x), x).shape
      (2, 5, 6, 16)
    """

    kernel_size: int = 3

    torch_layouts: ClassVar[tuple[str, ...]] = ("seed",)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "SpatialAttention"
        x = self.image_input(x, layout=_NHWC)
        if self.kernel_size not in (3, 7):
            raise ValueError(f"{where}: `kernel_size` must be 3 or 7, got {self.kernel_size}")
        cat = channel_pool(x, ("mean", "max"))
        logits = Conv(
            1,
            self.kernel_size,
            padding=self.kernel_size // 2,
            use_bias=False,
            name="conv1",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(cat)
        return x * nn.sigmoid(logits).astype(x.dtype)
