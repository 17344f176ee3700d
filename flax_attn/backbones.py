"""ResNet's residual blocks, written once: the basic block and the bottleneck (He et al., arXiv 1512.03385).

Every ResNet-shaped network in the package builds its stages from these two modules, the way Flax's
ImageNet example has one ``BottleneckResNetBlock(filters, conv, norm, act)`` and timm one
``Bottleneck(attn_layer=...)``: SE-ResNet (:mod:`flax_attn.se`, attention = SE), AANet's feature
extractor and aggregation blocks (:mod:`flax_attn.aanet`, deformable ``conv2``, no expansion, LeakyReLU)
and DETR's backbone (:mod:`flax_attn.detr`, frozen BatchNorm). Submodules carry torchvision's names
(``conv1``, ``bn1``, ..., ``downsample.0``/``downsample.1``), so every family's state dicts load with
the same rename table.

What varies is a field (``conv``, ``norm``, ``act``, ``attn``, ``kernel_init``) or, where it depends on
a family's own arguments, a ``nn.nowrap`` hook a subclass overrides (:meth:`BasicBlock.attention`,
:meth:`Bottleneck.make_conv2`, :meth:`BasicBlock.check_config`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp  # noqa: F401  (the docstring examples use it)

from flax_attn.layers import BatchNorm, BatchStatsFields, Conv, merge_train, torch_default_kernel_init

__all__ = ["BasicBlock", "Bottleneck", "resnet_conv_init"]

ModuleDef = Any

# torchvision, timm and AANet: nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu") on every conv.
resnet_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_NHWC = "(batch, height, width, channels)"


class BasicBlock(BatchStatsFields):
    """ResNet's basic block: conv3x3-norm-act-conv3x3-norm-[attn], + shortcut, act.

    Attributes:
      inplanes, planes, stride: as torchvision's ``BasicBlock``; the output has ``expansion * planes``
        channels (``expansion`` is 1 here, 4 in :class:`Bottleneck`).
      dilation: dilation and padding of the 3x3 convs.
      downsample: projection shortcut (strided 1x1 conv + norm, keys ``downsample.0``/``downsample.1``);
        ``None`` = when ``stride != 1`` or ``inplanes != expansion * planes`` (torchvision's
        ``_make_layer``); ``False`` with mismatched shapes is a ValueError.
      kernel_init: init of every conv (torch's default; :data:`resnet_conv_init` is torchvision's).
      conv: the conv layer, called ``conv(features, kernel_size, stride=, padding=, dilation=, groups=,
        use_bias=False, kernel_init=, dtype=, param_dtype=, name=)`` (:class:`flax_attn.layers.Conv`).
      norm: the norm layer, called ``norm(name=, dtype=, param_dtype=)`` (plus ``scale_init`` on the last
        one with ``zero_init_last``), then ``(x, train=)`` (:class:`flax_attn.layers.BatchNorm`).
      act: the activation (ReLU).
      attn: attention on the residual branch before the sum, called ``attn(channels, name="se",
        dtype=, param_dtype=)`` (``None``: none); e.g. ``functools.partial(SELayer, reduction=16)``.
      zero_init_last: the last norm starts with zero scale (timm's and torchvision's
        ``zero_init_residual``), so the block starts as its shortcut.

    Input ``(B, H, W, inplanes)``; output ``(B, ceil(H / stride), ceil(W / stride), expansion * planes)``.

    Example (timm's ``BasicBlock(attn_layer="se")``, with GELU):
      >>> import functools
      >>> from flax_attn.se import SELayer
      >>> se = functools.partial(SELayer, se_style="timm")
      >>> gelu = functools.partial(jax.nn.gelu, approximate=False)
      >>> block = BasicBlock(inplanes=16, planes=32, stride=2, attn=se, act=gelu)
      >>> x = jnp.ones((2, 9, 11, 16))
      >>> jax.eval_shape(lambda: block.init_with_output(jax.random.PRNGKey(0), x)[0]).shape
      (2, 5, 6, 32)
    """

    inplanes: int
    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool | None = None
    kernel_init: Callable = torch_default_kernel_init
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    act: Callable[[jax.Array], jax.Array] = nn.relu
    attn: ModuleDef | None = None
    zero_init_last: bool = False

    expansion: int = 1

    torch_sequential: ClassVar[tuple[str, ...]] = ("downsample",)

    # ---------------------------------------------------------------- hooks for the families

    @nn.nowrap
    def check_config(self, where: str) -> None:
        """Validate the configuration before any layer is built (a family adds its own arguments)."""
        out = self.planes * self.expansion
        if self.downsample is False and (self.stride != 1 or self.inplanes != out):
            raise ValueError(
                f"{where}: without `downsample` the shortcut needs stride 1 and inplanes == {self.expansion} * "
                f"planes, got inplanes={self.inplanes}, planes={self.planes}, stride={self.stride}"
            )

    @nn.nowrap
    def activation(self) -> Callable[[jax.Array], jax.Array]:
        return self.act

    @nn.nowrap
    def attention(self, channels: int) -> nn.Module | None:
        """The attention module on the residual branch (``se`` in torchvision/timm's key names)."""
        if self.attn is None:
            return None
        return self.attn(channels, name="se", dtype=self.dtype, param_dtype=self.param_dtype)

    # ---------------------------------------------------------------- shared pieces

    @nn.nowrap
    def _conv(self, features, kernel_size, name, *, stride=1, padding=0, dilation=1, groups=1):
        return self.conv(
            features,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            use_bias=False,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.nowrap
    def _norm(self, name, *, last=False):
        extra = {"scale_init": nn.initializers.zeros} if (last and self.zero_init_last) else {}
        return self.norm(name=name, dtype=self.dtype, param_dtype=self.param_dtype, **extra)

    @nn.nowrap
    def _check_input(self, x, train: bool | None) -> tuple[jax.Array, bool]:
        """Validate config and input; the input in the compute dtype and the merged train flag."""
        where = type(self).__name__
        train = merge_train(self, train)
        self.check_config(where)
        x = self.image_input(x, self.inplanes, layout=_NHWC)
        return x, train

    @nn.nowrap
    def _finish(self, x, out, train):
        """Attention, the shortcut (projected where needed) and the last activation."""
        out_ch = self.planes * self.expansion
        attn = self.attention(out_ch)
        if attn is not None:
            out = attn(out)
        project = self.downsample
        if project is None:
            project = self.stride != 1 or self.inplanes != out_ch
        shortcut = x
        if project:
            shortcut = self._conv(out_ch, 1, "downsample_0", stride=self.stride)(x)
            shortcut = self._norm("downsample_1")(shortcut, train=train)
        return self.activation()(out + shortcut)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        x, train = self._check_input(x, train)
        act, d = self.activation(), self.dilation
        out = self._conv(self.planes, 3, "conv1", stride=self.stride, padding=d, dilation=d)(x)
        out = act(self._norm("bn1")(out, train=train))
        out = self._conv(self.planes * self.expansion, 3, "conv2", padding=d, dilation=d)(out)
        out = self._norm("bn2", last=True)(out, train=train)
        return self._finish(x, out, train)


class Bottleneck(BasicBlock):
    """ResNet v1.5's bottleneck (stride on the 3x3 conv): 1x1-norm-act, 3x3-norm-act, 1x1-norm-[attn],
    + shortcut, act.

    Attributes:
      As :class:`BasicBlock`, and:
      groups, base_width: the 3x3 conv's groups and width ``int(planes * base_width / 64) * groups``
        (torchvision's ResNeXt/wide arguments).
      expansion: output channels per ``planes`` (4; AANet's aggregation blocks use 1).

    Input ``(B, H, W, inplanes)``; output ``(B, ceil(H / stride), ceil(W / stride), expansion * planes)``.

    Example (a ResNeXt-style grouped block):
      >>> x = jnp.ones((2, 9, 11, 32))
      >>> out, _ = Bottleneck(32, 16, stride=2, groups=4).init_with_output(jax.random.PRNGKey(0), x)
      >>> out.shape
      (2, 5, 6, 64)
    """

    groups: int = 1
    base_width: int = 64
    expansion: int = 4

    @nn.nowrap
    def width(self) -> int:
        return int(self.planes * (self.base_width / 64.0)) * self.groups

    @nn.nowrap
    def make_conv2(self, width: int) -> nn.Module:
        """The 3x3 conv (AANet's deformable blocks put a deformable conv here)."""
        d = self.dilation
        return self._conv(width, 3, "conv2", stride=self.stride, padding=d, dilation=d, groups=self.groups)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        x, train = self._check_input(x, train)
        act, width = self.activation(), self.width()
        out = self._conv(width, 1, "conv1")(x)
        out = act(self._norm("bn1")(out, train=train))
        out = self.make_conv2(width)(out)
        out = act(self._norm("bn2")(out, train=train))
        out = self._conv(self.planes * self.expansion, 1, "conv3")(out)
        out = self._norm("bn3", last=True)(out, train=train)
        return self._finish(x, out, train)
