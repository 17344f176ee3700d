"""Squeeze-and-Excitation: the SE layer, SE residual blocks and SE-ResNet-18/34/50.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018, arXiv 1709.01507.

Two families of PyTorch checkpoints are read (and written) exactly:

* ``se_style="senet"``: the seed's plain ResNet + SE (moskomule/senet.pytorch): torchvision ResNet
  keys (``conv1``, ``layer1.0.conv1``, ``downsample.0``, ``fc``) with ``se.fc.0``/``se.fc.2``
  Linear layers *without* bias and ``channel // reduction`` hidden units.
* ``se_style="timm"``: timm's ``seresnet18/34/50``: the same ResNet keys, but timm's ``SEModule``
  with 1x1 convs ``se.fc1``/``se.fc2`` *with* bias and ``make_divisible(channels / 16, 8)`` hidden
  units (64 channels -> 8, where senet.pytorch has 4), and zero-initialised last BN of each block.

The SE layer alone also reads the 1x1-conv form of the seed blog (``fc1.0``/``fc1.2``, no bias):
the same math as the Linear form, so it is a layout (``layout="conv"``) of the same module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn import backbones
from flax_attn.convert.engine import Conv1x1AsLinear, Rename, sequential_rules
from flax_attn.layers import BatchNorm, BatchStatsFields, BlockFields, Conv, Linear, merge_train
from flax_attn.ops.channel import global_pool
from flax_attn.ops.checks import check_channels, check_rank
from flax_attn.ops.dtypes import compute_dtype, statistics_dtype
from flax_attn.ops.max_pool import max_pool

__all__ = [
    "SEBasicBlock",
    "SEBottleneck",
    "SELayer",
    "SEResNet",
    "make_divisible",
    "se_resnet18",
    "se_resnet34",
    "se_resnet50",
]


_SE_STYLES = ("senet", "timm")
_NHWC = "(batch, height, width, channels)"


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of ``divisor`` (at least ``min_value``), bumped up one
    step if rounding lost more than ``1 - round_limit`` of ``v``. timm's SE uses ``round_limit=0``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def se_hidden_channels(where: str, channels: int, reduction: int, se_style: str) -> int:
    """Hidden width of an SE bottleneck: ``channels // reduction`` (senet) or timm's rounding."""
    if se_style == "timm":
        return make_divisible(channels / reduction, 8, round_limit=0.0)
    if reduction <= 0 or channels % reduction or channels // reduction == 0:
        raise ValueError(
            f"{where}: `channel`={channels} must be a positive multiple of `reduction`={reduction} "
            f"(the bottleneck has channel // reduction = {channels // max(reduction, 1)} units)"
        )
    return channels // reduction


def _se_layout(layout: str | None, se_style: str) -> str:
    """The SE-level layout for a model-level layout name (``None`` follows the layer's style)."""
    if layout in ("official", "conv", "timm"):
        return layout
    return "timm" if se_style == "timm" else "official"


class SELayer(BlockFields):
    """The Squeeze-and-Excitation layer (Hu et al., CVPR 2018, arXiv 1709.01507).

    ``x * sigmoid(W2 relu(W1 avgpool(x)))`` with a per-channel gate. ``se_style="senet"`` is
    senet.pytorch's ``SELayer(channel, reduction=16)`` (``fc.0``/``fc.2`` Linear, no bias,
    ``channel // reduction`` hidden units); ``se_style="timm"`` is timm's ``SEModule(channel)``
    (``fc1``/``fc2`` 1x1 convs with bias, hidden width ``make_divisible(channel / reduction, 8)``).

    State-dict layouts: ``"official"`` (``fc.0.weight``, ``fc.2.weight``), ``"conv"`` (the seed blog's
    1x1-conv form ``fc1.0.weight``/``fc1.2.weight`` of shape ``(out, in, 1, 1)``, same math) and
    ``"timm"`` (``fc1.weight``/``fc1.bias``/``fc2.*``). The default (``layout=None``) is the style's
    own layout: ``"official"`` (senet.pytorch's SELayer is the paper's official code) for
    ``se_style="senet"``, ``"timm"`` for ``se_style="timm"``; ``torch_layouts`` lists the default
    style's first.

    Attributes:
      channel: input channels C.
      reduction: bottleneck ratio (default 16). With the senet style, C must be a positive
        multiple of it (a ValueError otherwise; the reference silently floors).
      se_style: ``"senet"`` (default) or ``"timm"``, the argument of the same name as in
        :class:`SEBasicBlock`, :class:`SEBottleneck` and :class:`SEResNet`.
      rd_channels: explicit hidden width (overrides ``reduction``), as timm's ``rd_channels``.

    Input ``(B, H, W, C)``; output the same shape.

    Example:
      >>> se = SELayer(channel=32, reduction=4)
      >>> x = jnp.ones((2, 7, 9, 32))
      >>> variables = se.init(jax.random.PRNGKey(0), x)
      >>> se.apply(variables, x).shape
      (2, 7, 9, 32)
    """

    channel: int
    reduction: int = 16
    se_style: str = "senet"
    rd_channels: int | None = None

    torch_layouts: ClassVar[tuple[str, ...]] = ("official", "conv", "timm")

    @nn.nowrap
    def torch_rules(self, layout):
        layout = _se_layout(layout, self.se_style)
        if layout == "timm":
            return [
                Rename(r"fc_0\.weight", "fc1.weight", Conv1x1AsLinear()),
                Rename(r"fc_0\.bias", "fc1.bias"),
                Rename(r"fc_2\.weight", "fc2.weight", Conv1x1AsLinear()),
                Rename(r"fc_2\.bias", "fc2.bias"),
            ]
        if layout == "conv":
            return [
                Rename(r"fc_(0|2)\.weight", r"fc1.\1.weight", Conv1x1AsLinear()),
                Rename(r"fc_(0|2)\.bias", r"fc1.\1.bias"),
            ]
        return sequential_rules("fc")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "SELayer"
        if self.se_style not in _SE_STYLES:
            raise ValueError(f"{where}: `se_style` must be one of {_SE_STYLES}, got {self.se_style!r}")
        x = self.image_input(x, self.channel, layout=_NHWC)
        hidden = self.rd_channels or se_hidden_channels(where, self.channel, self.reduction, self.se_style)
        bias = self.se_style == "timm"
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=bias)
        y = global_pool(x, "avg")
        y = nn.relu(Linear(hidden, name="fc_0", **kw)(y))
        y = nn.sigmoid(Linear(self.channel, name="fc_2", **kw)(y))
        return x * y[:, None, None, :].astype(x.dtype)


# --------------------------------------------------------------------------- residual blocks


def _check_style(where: str, se_style: str) -> None:
    if se_style not in _SE_STYLES:
        raise ValueError(f"{where}: `se_style` must be one of {_SE_STYLES}, got {se_style!r}")


class _SEBlock(nn.Module):
    """What the SE residual blocks add to :mod:`flax_attn.backbones`' blocks: the SE layer (``se``)
    on the residual branch, built from ``reduction`` and ``se_style``, torchvision's conv init, and
    the layouts."""

    kernel_init: Callable = backbones.resnet_conv_init
    reduction: int = 16
    se_style: str = "senet"

    # The default se_style's layout first: it is what layout=None converts as.
    torch_layouts: ClassVar[tuple[str, ...]] = ("senet", "timm")

    @nn.nowrap
    def check_config(self, where: str) -> None:
        _check_style(where, self.se_style)
        super().check_config(where)

    @nn.nowrap
    def attention(self, channels: int) -> nn.Module:
        _check_style(type(self).__name__, self.se_style)
        return SELayer(
            channels, self.reduction, se_style=self.se_style, name="se", dtype=self.dtype, param_dtype=self.param_dtype
        )


class SEBasicBlock(_SEBlock, backbones.BasicBlock):
    """ResNet basic block with SE before the residual sum (senet.pytorch ``SEBasicBlock``, timm
    ``BasicBlock(attn_layer="se")``): conv3x3-BN-ReLU-conv3x3-BN-SE, + shortcut, ReLU.

    :class:`flax_attn.backbones.BasicBlock` with the SE layer as its attention and torchvision's conv
    init.

    Attributes:
      inplanes, planes, stride: as in torchvision; ``expansion`` is 1.
      reduction: SE ratio (16).
      downsample: projection shortcut (1x1 conv + BN, keys ``downsample.0``/``downsample.1``);
        ``None`` = when ``stride != 1`` or ``inplanes != planes``, as torchvision's ``_make_layer``.
      se_style: ``"senet"`` (SE without bias, C // 16) or ``"timm"`` (see :class:`SELayer`).
      zero_init_last: zero-init ``bn2``'s scale (timm's default in its ResNet).

    Input ``(B, H, W, inplanes)``; output ``(B, ceil(H / stride), ceil(W / stride), planes)``.

    Example:
      >>> block = SEBasicBlock(inplanes=16, planes=32, stride=2)
      >>> x = jnp.ones((2, 9, 11, 16))
      >>> variables = block.init(jax.random.PRNGKey(0), x)
      >>> block.apply(variables, x).shape
      (2, 5, 6, 32)
    """


class SEBottleneck(_SEBlock, backbones.Bottleneck):
    """ResNet bottleneck with SE before the residual sum (senet.pytorch ``SEBottleneck``, timm
    ``Bottleneck(attn_layer="se")``): 1x1-BN-ReLU, 3x3 (stride here, "ResNet v1.5")-BN-ReLU,
    1x1 to ``4 * planes``-BN, SE, + shortcut, ReLU.

    :class:`flax_attn.backbones.Bottleneck` with the SE layer as its attention.

    Attributes:
      inplanes, planes, stride: as in torchvision; output channels are ``4 * planes``.
      reduction, downsample, se_style, zero_init_last: as :class:`SEBasicBlock` (``bn3`` is last).

    Input ``(B, H, W, inplanes)``; output ``(B, ceil(H / stride), ceil(W / stride), 4 * planes)``.

    Example:
      >>> block = SEBottleneck(inplanes=32, planes=16, stride=2)
      >>> x = jnp.ones((2, 9, 11, 32))
      >>> variables = block.init(jax.random.PRNGKey(0), x)
      >>> block.apply(variables, x).shape
      (2, 5, 6, 64)
    """


# --------------------------------------------------------------------------- SE-ResNet

_BLOCKS = {"basic": SEBasicBlock, "bottleneck": SEBottleneck}


class SEResNet(BatchStatsFields):
    """SE-ResNet (Hu et al., CVPR 2018, arXiv 1709.01507) with torchvision's ResNet layout.

    Stem conv7x7/2 (``conv1``, no bias) - ``bn1`` - ReLU - maxpool3x3/2, four stages
    ``layer1..layer4`` of SE blocks (64, 128, 256, 512 planes; stride 2 from stage 2 on, in the
    first block's 3x3 conv), global average pool and ``fc``. Loads timm's ``seresnet18/34/50``
    (``se_style="timm"``, layout ``"timm"``) or senet.pytorch's ``se_resnet18/34/50``
    (``se_style="senet"``, layout ``"senet"``); the two differ in the SE layers (see module doc).
    The default is timm's (``se_style="timm"``), so ``torch_layouts`` lists ``"timm"`` first;
    ``layout=None`` converts as the model's ``se_style``, and a layout of the other style is refused.

    Attributes:
      block: ``"basic"`` (SE-ResNet-18/34) or ``"bottleneck"`` (SE-ResNet-50).
      layers: blocks per stage, e.g. ``(2, 2, 2, 2)``.
      num_classes: classifier outputs; 0 returns the pooled features.
      in_chans: input channels (3).
      reduction: SE ratio (16).
      se_style: ``"timm"`` (default) or ``"senet"``.

    Input ``(B, H, W, in_chans)`` images; output ``(B, num_classes)`` logits.

    Example:
      >>> model = se_resnet18(num_classes=10)
      >>> x = jnp.ones((1, 33, 29, 3))
      >>> variables = model.init(jax.random.PRNGKey(0), x)
      >>> model.apply(variables, x).shape
      (1, 10)
    """

    block: str = "basic"
    layers: Sequence[int] = (2, 2, 2, 2)
    num_classes: int = 1000
    in_chans: int = 3
    reduction: int = 16
    se_style: str = "timm"

    # The default se_style's layout first (timm here, unlike the blocks): what layout=None converts as.
    torch_layouts: ClassVar[tuple[str, ...]] = ("timm", "senet")

    @nn.nowrap
    def torch_rules(self, layout):
        if layout is not None and layout != self.se_style:
            raise ValueError(
                f"SEResNet: layout {layout!r} does not match se_style={self.se_style!r}; the SE layers "
                f"differ between the two (bias, hidden width): build the model with se_style={layout!r}"
            )
        return sequential_rules(r"layer\d")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "SEResNet"
        x = x.astype(compute_dtype(where, self.dtype, x=x))
        _check_style(where, self.se_style)
        if self.block not in _BLOCKS:
            raise ValueError(f"{where}: `block` must be one of {tuple(_BLOCKS)}, got {self.block!r}")
        if len(self.layers) != 4:
            raise ValueError(f"{where}: `layers` must give 4 stage depths, got {tuple(self.layers)}")
        check_rank(where, "x", x, 4, "(batch, height, width, in_chans)")
        check_channels(where, "x", x, self.in_chans)
        kw = self.precision()
        block_cls = _BLOCKS[self.block]
        x = Conv(
            64, 7, stride=2, padding=3, use_bias=False, kernel_init=backbones.resnet_conv_init, name="conv1", **kw
        )(x)
        x = nn.relu(BatchNorm(name="bn1", **kw)(x, train=train))
        # torch MaxPool2d(3, 2, padding=1); the op's gradient is a mask, not select_and_scatter.
        x = max_pool(x, 3, 2, 1)
        inplanes = 64
        for stage, (planes, depth) in enumerate(zip((64, 128, 256, 512), self.layers), start=1):
            for i in range(depth):
                stride = 2 if (stage > 1 and i == 0) else 1
                x = block_cls(
                    inplanes=inplanes,
                    planes=planes,
                    stride=stride,
                    reduction=self.reduction,
                    se_style=self.se_style,
                    zero_init_last=self.se_style == "timm",
                    name=f"layer{stage}_{i}",
                    **kw,
                )(x, train=train)
                inplanes = planes * block_cls.expansion
        x = jnp.mean(x, axis=(1, 2), dtype=statistics_dtype(x.dtype)).astype(x.dtype)
        if self.num_classes:
            x = Linear(self.num_classes, name="fc", **kw)(x)
        return x


def se_resnet18(num_classes: int = 1000, **kwargs) -> SEResNet:
    """SE-ResNet-18: basic blocks ``(2, 2, 2, 2)`` (timm ``seresnet18`` / senet.pytorch ``se_resnet18``)."""
    return SEResNet(block="basic", layers=(2, 2, 2, 2), num_classes=num_classes, **kwargs)


def se_resnet34(num_classes: int = 1000, **kwargs) -> SEResNet:
    """SE-ResNet-34: basic blocks ``(3, 4, 6, 3)``."""
    return SEResNet(block="basic", layers=(3, 4, 6, 3), num_classes=num_classes, **kwargs)


def se_resnet50(num_classes: int = 1000, **kwargs) -> SEResNet:
    """SE-ResNet-50: bottleneck blocks ``(3, 4, 6, 3)``."""
    return SEResNet(block="bottleneck", layers=(3, 4, 6, 3), num_classes=num_classes, **kwargs)
