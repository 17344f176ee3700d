"""References for ``flax_attn.aanet``: AANet's aggregation in plain torch (haofeixu/aanet).

Written from ``nets/aggregation.py`` (``AdaptiveAggregationModule``, ``AdaptiveAggregation``) and
``nets/deform.py`` (``DeformConv2d``, ``SimpleBottleneck``, ``DeformSimpleBottleneck``) with their
attribute names. AANet's CUDA ``ModulatedDeformConv``/``DeformConv`` (from mmdetection) are replaced
by the plain-torch :func:`flax_attn.testing.torch_ref.deform.deform_conv2d`, which follows the same
offset layout and bilinear sampling; their parameters are ``weight`` (and ``bias`` when enabled).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from flax_attn.testing.torch_ref.deform import deform_conv2d


class ModulatedDeformConv(nn.Module):
    """mmdetection v1 ``ModulatedDeformConv`` (used by AANet) on the plain-torch op."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deformable_groups=1,
        bias=True,
    ):
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.deformable_groups = groups, deformable_groups
        self.weight = nn.Parameter(torch.Tensor(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.Tensor(out_channels))
        else:
            self.register_parameter("bias", None)
        n = in_channels * self.kernel_size[0] * self.kernel_size[1]
        stdv = 1.0 / math.sqrt(n)
        self.weight.data.uniform_(-stdv, stdv)
        if self.bias is not None:
            self.bias.data.zero_()

    def forward(self, x, offset, mask=None):
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )


class DeformConv2d(nn.Module):
    """AANet ``nets/deform.DeformConv2d``."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size=3,
        stride=1,
        dilation=2,
        groups=1,
        deformable_groups=2,
        modulation=True,
        double_mask=True,
        bias=False,
    ):
        super().__init__()
        self.modulation = modulation
        self.deformable_groups = deformable_groups
        self.kernel_size = kernel_size
        self.double_mask = double_mask
        # AANet uses DeformConv (no mask) when modulation=False; the op with mask=None is that.
        self.deform_conv = ModulatedDeformConv(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            groups=groups,
            deformable_groups=deformable_groups,
            bias=bias,
        )
        k = 3 if self.modulation else 2
        offset_out_channels = deformable_groups * k * kernel_size * kernel_size
        self.offset_conv = nn.Conv2d(
            in_channels,
            offset_out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            groups=deformable_groups,
            bias=True,
        )
        nn.init.constant_(self.offset_conv.weight, 0.0)
        nn.init.constant_(self.offset_conv.bias, 0.0)

    def forward(self, x):
        if self.modulation:
            offset_mask = self.offset_conv(x)
            offset_channel = self.deformable_groups * 2 * self.kernel_size * self.kernel_size
            offset = offset_mask[:, :offset_channel, :, :]
            mask = offset_mask[:, offset_channel:, :, :].sigmoid()
            if self.double_mask:
                mask = mask * 2
            return self.deform_conv(x, offset, mask)
        offset = self.offset_conv(x)
        return self.deform_conv(x, offset)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(
        in_planes,
        out_planes,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        bias=False,
        dilation=dilation,
    )


class _BottleneckForward(nn.Module):
    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class SimpleBottleneck(_BottleneckForward):
    def __init__(
        self,
        inplanes,
        planes,
        stride=1,
        downsample=None,
        groups=1,
        base_width=64,
        dilation=1,
        norm_layer=None,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes)
        self.bn3 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride


class DeformSimpleBottleneck(_BottleneckForward):
    def __init__(
        self,
        inplanes,
        planes,
        stride=1,
        downsample=None,
        groups=1,
        base_width=64,
        norm_layer=None,
        mdconv_dilation=2,
        deformable_groups=2,
        modulation=True,
        double_mask=True,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = DeformConv2d(
            width,
            width,
            stride=stride,
            dilation=mdconv_dilation,
            deformable_groups=deformable_groups,
            modulation=modulation,
            double_mask=double_mask,
        )
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes)
        self.bn3 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride


class AdaptiveAggregationModule(nn.Module):
    def __init__(
        self,
        num_scales,
        num_output_branches,
        max_disp,
        num_blocks=1,
        simple_bottleneck=False,
        deformable_groups=2,
        mdconv_dilation=2,
    ):
        super().__init__()
        self.num_scales = num_scales
        self.num_output_branches = num_output_branches
        self.max_disp = max_disp
        self.num_blocks = num_blocks
        self.branches = nn.ModuleList()
        for i in range(self.num_scales):
            num_candidates = max_disp // (2**i)
            branch = nn.ModuleList()
            for _ in range(num_blocks):
                if simple_bottleneck:
                    branch.append(SimpleBottleneck(num_candidates, num_candidates))
                else:
                    branch.append(
                        DeformSimpleBottleneck(
                            num_candidates,
                            num_candidates,
                            modulation=True,
                            mdconv_dilation=mdconv_dilation,
                            deformable_groups=deformable_groups,
                        )
                    )
            self.branches.append(nn.Sequential(*branch))
        self.fuse_layers = nn.ModuleList()
        for i in range(self.num_output_branches):
            self.fuse_layers.append(nn.ModuleList())
            for j in range(self.num_scales):
                if i == j:
                    self.fuse_layers[-1].append(nn.Identity())
                elif i < j:
                    self.fuse_layers[-1].append(
                        nn.Sequential(
                            nn.Conv2d(max_disp // (2**j), max_disp // (2**i), kernel_size=1, bias=False),
                            nn.BatchNorm2d(max_disp // (2**i)),
                        )
                    )
                else:
                    layers = nn.ModuleList()
                    for _ in range(i - j - 1):
                        layers.append(
                            nn.Sequential(
                                nn.Conv2d(
                                    max_disp // (2**j),
                                    max_disp // (2**j),
                                    kernel_size=3,
                                    stride=2,
                                    padding=1,
                                    bias=False,
                                ),
                                nn.BatchNorm2d(max_disp // (2**j)),
                                nn.LeakyReLU(0.2, inplace=True),
                            )
                        )
                    layers.append(
                        nn.Sequential(
                            nn.Conv2d(
                                max_disp // (2**j),
                                max_disp // (2**i),
                                kernel_size=3,
                                stride=2,
                                padding=1,
                                bias=False,
                            ),
                            nn.BatchNorm2d(max_disp // (2**i)),
                        )
                    )
                    self.fuse_layers[-1].append(nn.Sequential(*layers))
        self.relu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        assert len(self.branches) == len(x)
        x = list(x)  # the official code rebinds the caller's list entries; a copy keeps inputs intact
        for i in range(len(self.branches)):
            branch = self.branches[i]
            for j in range(self.num_blocks):
                x[i] = branch[j](x[i])
        if self.num_scales == 1:
            return x
        x_fused = []
        for i in range(len(self.fuse_layers)):
            for j in range(len(self.branches)):
                if j == 0:
                    x_fused.append(self.fuse_layers[i][0](x[0]))
                else:
                    exchange = self.fuse_layers[i][j](x[j])
                    if exchange.size()[2:] != x_fused[i].size()[2:]:
                        exchange = F.interpolate(
                            exchange, size=x_fused[i].size()[2:], mode="bilinear", align_corners=False
                        )
                    x_fused[i] = x_fused[i] + exchange
        for i in range(len(x_fused)):
            x_fused[i] = self.relu(x_fused[i])
        return x_fused


class AdaptiveAggregation(nn.Module):
    def __init__(
        self,
        max_disp,
        num_scales=3,
        num_fusions=6,
        num_stage_blocks=1,
        num_deform_blocks=2,
        intermediate_supervision=True,
        deformable_groups=2,
        mdconv_dilation=2,
    ):
        super().__init__()
        self.max_disp = max_disp
        self.num_scales = num_scales
        self.num_fusions = num_fusions
        self.intermediate_supervision = intermediate_supervision
        fusions = nn.ModuleList()
        for i in range(num_fusions):
            if self.intermediate_supervision:
                num_out_branches = self.num_scales
            else:
                num_out_branches = 1 if i == num_fusions - 1 else self.num_scales
            simple_bottleneck_module = not (i >= num_fusions - num_deform_blocks)
            fusions.append(
                AdaptiveAggregationModule(
                    num_scales=self.num_scales,
                    num_output_branches=num_out_branches,
                    max_disp=max_disp,
                    num_blocks=num_stage_blocks,
                    mdconv_dilation=mdconv_dilation,
                    deformable_groups=deformable_groups,
                    simple_bottleneck=simple_bottleneck_module,
                )
            )
        self.fusions = nn.Sequential(*fusions)
        self.final_conv = nn.ModuleList()
        for i in range(self.num_scales):
            in_channels = max_disp // (2**i)
            self.final_conv.append(nn.Conv2d(in_channels, max_disp // (2**i), kernel_size=1))
            if not self.intermediate_supervision:
                break

    def forward(self, cost_volume):
        assert isinstance(cost_volume, list)
        for i in range(self.num_fusions):
            cost_volume = self.fusions[i](cost_volume)
        out = []
        for i in range(len(self.final_conv)):
            out = out + [self.final_conv[i](cost_volume[i])]
        return out
