"""Deformable convolution blocks (DCN v1, Dai et al., arXiv 1703.06211; DCN v2, Zhu et al., arXiv 1811.11168).

* :class:`DeformConv2d`: ``torchvision.ops.DeformConv2d`` (offsets and mask given by the caller).
* :class:`DeformConv2dPack`: mmcv's ``DeformConv2dPack``, an ordinary conv ``conv_offset``
  (zero-initialised, so training starts from a plain convolution) predicts the offsets.
* :class:`ModulatedDeformConv2dPack`: mmcv's ``ModulatedDeformConv2dPack`` (``DCNv2``):
  ``conv_offset`` predicts offsets and mask logits (``sigmoid``), zero-initialised.

The weight is stored in Flax's HWIO layout (``kernel``); the converter maps it to torch's OIHW
``weight``. The math is :func:`flax_attn.ops.deform_conv2d`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.layers import BlockFields, Conv, merge_train, torch_default_kernel_init
from flax_attn.ops.checks import check_channels, check_divisible, check_rank
from flax_attn.ops.deform import deform_conv2d
from flax_attn.ops.dtypes import compute_dtype, statistics_dtype

__all__ = ["DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack"]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _uniform_fan_in(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class _DeformWeights(BlockFields):
    """What the three deformable convs share: the ``nn.Conv2d`` fields (each subclass adds its own after
    ``groups``), the ``kernel`` (kh, kw, C/groups, O) HWIO with optional ``bias``, mmcv's zero-initialised
    ``conv_offset`` and the deformable conv itself."""

    in_channels: int
    out_channels: int
    kernel_size: int | Sequence[int]
    stride: int | Sequence[int] = 1
    padding: int | Sequence[int] = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1

    @nn.nowrap
    def _offsets(self, x, modulated: bool):
        """mmcv's ``conv_offset`` (zero-initialised): the offsets, and with ``modulated`` the sigmoid
        mask from the last third of its ``3 * deform_groups * kh * kw`` channels (else ``None``)."""
        kh, kw = _pair(self.kernel_size)
        n_off = self.deform_groups * 2 * kh * kw
        out = Conv(
            self.deform_groups * (3 if modulated else 2) * kh * kw,
            (kh, kw),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            kernel_init=nn.initializers.zeros,
            name="conv_offset",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)
        if not modulated:
            return out, None
        mask = jax.nn.sigmoid(out[..., n_off:].astype(statistics_dtype(out.dtype))).astype(out.dtype)
        return out[..., :n_off], mask

    @nn.nowrap
    def _mmcv_params(self, where, x, bias: bool):
        """``kernel`` and ``bias`` with mmcv's init: weight ``U(+-1/sqrt(in_channels * kh * kw))``, zero bias."""
        kh, kw = _pair(self.kernel_size)
        return self._params(where, x, bias, _uniform_fan_in(self.in_channels * kh * kw), nn.initializers.zeros)

    def _params(self, where, x, bias: bool, kernel_init, bias_init):
        compute_dtype(where, self.dtype, x=x)
        check_rank(where, "x", x, 4, "(N, H, W, C)")
        check_channels(where, "x", x, self.in_channels)
        check_divisible(where, "in_channels", self.in_channels, "groups", self.groups)
        check_divisible(where, "out_channels", self.out_channels, "groups", self.groups)
        kh, kw = _pair(self.kernel_size)
        kernel = self.param(
            "kernel",
            kernel_init,
            (kh, kw, self.in_channels // self.groups, self.out_channels),
            self.param_dtype,
        )
        b = self.param("bias", bias_init, (self.out_channels,), self.param_dtype) if bias else None
        return kernel, b

    def _conv(self, x, offset, kernel, bias, mask):
        dtype = compute_dtype(type(self).__name__, self.dtype, x=x, offset=offset, mask=mask)
        return deform_conv2d(
            x.astype(dtype),
            offset,
            kernel.astype(dtype),
            None if bias is None else bias.astype(dtype),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=None if mask is None else mask.astype(dtype),
        )


class DeformConv2d(_DeformWeights):
    """``torchvision.ops.DeformConv2d`` in NHWC (deformable conv v1, or v2 when a mask is given).

    Attributes:
      in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as in
        torchvision (torch init: kaiming-uniform weight, uniform(+-1/sqrt(fan_in)) bias).

    Call: ``(x (N, H, W, in_channels), offset (N, Ho, Wo, 2 * offset_groups * kh * kw),
    mask=None (N, Ho, Wo, offset_groups * kh * kw))`` -> ``(N, Ho, Wo, out_channels)``. Offsets
    use torchvision's channel order ((dy, dx) per kernel point), moved to the last axis.
    State-dict keys: ``weight`` (O, C/groups, kh, kw), ``bias``.

    Example:
      >>> m = DeformConv2d(4, 8, 3, padding=1)
      >>> x, off = jnp.ones((1, 5, 6, 4)), jnp.zeros((1, 5, 6, 18))
      >>> variables = m.init(jax.random.PRNGKey(0), x, off)
      >>> m.apply(variables, x, off).shape
      (1, 5, 6, 8)
    """

    bias: bool = True

    torch_layouts: ClassVar[tuple[str, ...]] = ("torchvision",)

    @nn.compact
    def __call__(self, x, offset, mask=None, train: bool | None = None):
        train = merge_train(self, train)
        kh, kw = _pair(self.kernel_size)
        fan_in = self.in_channels // self.groups * kh * kw
        kernel, bias = self._params("DeformConv2d", x, self.bias, torch_default_kernel_init, _uniform_fan_in(fan_in))
        return self._conv(x, offset, kernel, bias, mask)


class DeformConv2dPack(_DeformWeights):
    """mmcv ``DeformConv2dPack`` (DCN v1 as a drop-in conv): offsets from a zero-initialised ``conv_offset``.

    Attributes:
      in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as ``nn.Conv2d``.
      deform_groups: offset groups (mmcv's ``deform_groups``).
      bias: must be False, as in mmcv's ``DeformConv2d``.

    Input ``(N, H, W, in_channels)``; output ``(N, Ho, Wo, out_channels)``. State-dict keys:
    ``weight``, ``conv_offset.weight``, ``conv_offset.bias``. mmcv's weight init
    ``U(+-1/sqrt(in_channels * kh * kw))``.

    Example:
      >>> conv = DeformConv2dPack(in_channels=4, out_channels=8, kernel_size=3, padding=1)
      >>> x = jnp.ones((2, 9, 11, 4))
      >>> conv.apply(conv.init(jax.random.PRNGKey(0), x), x).shape
      (2, 9, 11, 8)
    """

    deform_groups: int = 1
    bias: bool = False

    torch_layouts: ClassVar[tuple[str, ...]] = ("mmcv",)

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train = merge_train(self, train)
        where = "DeformConv2dPack"
        if self.bias:
            raise ValueError(f"{where}: `bias` must be False (mmcv's DeformConv2d has no bias)")
        kernel, _ = self._mmcv_params(where, x, False)
        offset, _ = self._offsets(x, modulated=False)
        return self._conv(x, offset, kernel, None, None)


class ModulatedDeformConv2dPack(_DeformWeights):
    """mmcv ``ModulatedDeformConv2dPack`` (``DCNv2``): offsets and sigmoid mask from ``conv_offset``.

    ``conv_offset`` (zero-initialised) outputs ``3 * deform_groups * kh * kw`` channels; the first
    two thirds are the offsets (torchvision/mmcv order), the last third the mask logits.

    Attributes:
      in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
        ``nn.Conv2d`` (mmcv init: weight ``U(+-1/sqrt(in_channels * kh * kw))``, zero bias).
      deform_groups: offset groups.

    Input ``(N, H, W, in_channels)``; output ``(N, Ho, Wo, out_channels)``. State-dict keys:
    ``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``.

    Example:
      >>> m = ModulatedDeformConv2dPack(4, 8, 3, padding=1)
      >>> x = jnp.ones((1, 5, 6, 4))
      >>> m.apply(m.init(jax.random.PRNGKey(0), x), x).shape
      (1, 5, 6, 8)
    """

    deform_groups: int = 1
    bias: bool = True

    torch_layouts: ClassVar[tuple[str, ...]] = ("mmcv",)

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train = merge_train(self, train)
        kernel, bias = self._mmcv_params("ModulatedDeformConv2dPack", x, self.bias)
        offset, mask = self._offsets(x, modulated=True)
        return self._conv(x, offset, kernel, bias, mask)
