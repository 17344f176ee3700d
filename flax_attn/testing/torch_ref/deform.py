"""References for ``flax_attn.deform``: deformable convolution in plain torch (NCHW).

torchvision has no CPU build in this environment, so ``deform_conv2d`` is written from
torchvision's documented semantics and its CPU kernel's ``bilinear_interpolate`` (offset channel
``2 * (g * kh * kw + i * kw + j)`` is dy, ``+1`` dx; points with ``y <= -1 or y >= H or x <= -1 or
x >= W`` read 0; neighbours outside the image read 0), column by column over the kernel points,
with ``torch.gather`` and autograd for the gradients. The modules carry torchvision's
(``DeformConv2d``: ``weight``, ``bias``) and mmcv's (``DeformConv2dPack``,
``ModulatedDeformConv2dPack``: ``weight``, ``bias``, ``conv_offset.*``) parameter names.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair


def _bilinear_interpolate(img, y, x):
    """torchvision's ``bilinear_interpolate`` for a batch: img (B, C, H, W), y/x (B, P) -> (B, C, P)."""
    b, c, height, width = img.shape
    flat = img.reshape(b, c, height * width)
    zero_region = (y <= -1) | (y >= height) | (x <= -1) | (x >= width)
    y_low = torch.floor(y.detach()).long()
    x_low = torch.floor(x.detach()).long()
    y_high, x_high = y_low + 1, x_low + 1
    ly = y - y_low.to(y.dtype)
    lx = x - x_low.to(x.dtype)
    hy, hx = 1 - ly, 1 - lx

    def pick(yy, xx):
        valid = (yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1) & ~zero_region
        idx = torch.where(valid, yy * width + xx, torch.zeros_like(yy))
        v = torch.gather(flat, 2, idx[:, None, :].expand(b, c, idx.shape[1]))
        return v * valid[:, None, :].to(img.dtype)

    val = (
        (hy * hx)[:, None] * pick(y_low, x_low)
        + (hy * lx)[:, None] * pick(y_low, x_high)
        + (ly * hx)[:, None] * pick(y_high, x_low)
        + (ly * lx)[:, None] * pick(y_high, x_high)
    )
    return val


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None):
    """``torchvision.ops.deform_conv2d`` (NCHW, weight OIHW) in plain torch."""
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dil_h, dil_w = _pair(dilation)
    n, in_c, height, width = input.shape
    out_c, in_c_per_group, kh, kw = weight.shape
    groups = in_c // in_c_per_group
    n_offset_grps = offset.shape[1] // (2 * kh * kw)
    out_h = (height + 2 * pad_h - (dil_h * (kh - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dil_w * (kw - 1) + 1)) // stride_w + 1
    c_per_offset_grp = in_c // n_offset_grps
    oy = torch.arange(out_h, dtype=input.dtype).view(out_h, 1) * stride_h - pad_h
    ox = torch.arange(out_w, dtype=input.dtype).view(1, out_w) * stride_w - pad_w
    cols = []  # per kernel point: (N, C, Ho*Wo)
    for i in range(kh):
        for j in range(kw):
            per_group = []
            for g in range(n_offset_grps):
                ch = 2 * (g * kh * kw + i * kw + j)
                y = (oy + i * dil_h + offset[:, ch]).reshape(n, -1)
                x = (ox + j * dil_w + offset[:, ch + 1]).reshape(n, -1)
                img = input[:, g * c_per_offset_grp : (g + 1) * c_per_offset_grp]
                v = _bilinear_interpolate(img, y, x)
                if mask is not None:
                    v = v * mask[:, g * kh * kw + i * kw + j].reshape(n, 1, -1)
                per_group.append(v)
            cols.append(torch.cat(per_group, dim=1))
    columns = torch.stack(cols, dim=2)  # (N, C, K, P)
    columns = columns.reshape(n, groups, in_c_per_group * kh * kw, out_h * out_w)
    w = weight.reshape(groups, out_c // groups, in_c_per_group * kh * kw)
    out = torch.einsum("gok,ngkp->ngop", w, columns).reshape(n, out_c, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


class DeformConv2d(nn.Module):
    """``torchvision.ops.DeformConv2d``: parameters ``weight`` (O, C/groups, kh, kw) and ``bias``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__()
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *_pair(kernel_size)))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input, offset, mask=None):
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)


class _DeformConvPack(nn.Module):
    """What mmcv's two ``*Pack`` layers construct alike (mmcv passes ``*args, **kwargs`` from the
    ``*Pack`` classes to their conv classes, which share this signature): the deformable ``weight``
    (uniform in ``+-1/sqrt(fan_in)``), an optional zero ``bias`` and ``conv_offset``, a
    zero-initialised conv that predicts ``fields`` values per deformable group and kernel point."""

    fields: int

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias=True,
    ):
        super().__init__()
        ks = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *ks))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        n = in_channels * ks[0] * ks[1]
        self.weight.data.uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n))
        self.conv_offset = nn.Conv2d(
            in_channels,
            deform_groups * self.fields * ks[0] * ks[1],
            kernel_size=ks,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=True,
        )
        self.conv_offset.weight.data.zero_()
        self.conv_offset.bias.data.zero_()


class DeformConv2dPack(_DeformConvPack):
    """mmcv ``DeformConv2dPack`` (v1): ``conv_offset`` (zero-init) predicts offsets (dy, dx); no bias."""

    fields = 2

    def __init__(self, *args, bias=False, **kwargs):
        assert not bias, "mmcv DeformConv2d has no bias"
        super().__init__(*args, bias=False, **kwargs)

    def forward(self, x):
        offset = self.conv_offset(x)
        return deform_conv2d(x, offset, self.weight, None, self.stride, self.padding, self.dilation)


class ModulatedDeformConv2dPack(_DeformConvPack):
    """mmcv ``ModulatedDeformConv2dPack`` (DCNv2): ``conv_offset`` gives offsets and mask logits."""

    fields = 3

    def forward(self, x):
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)
