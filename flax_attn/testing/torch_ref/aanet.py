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
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)


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


# --------------------------------------------------------------------------- network
# nets/resnet.py (Bottleneck, AANetFeature), nets/deform.py (DeformBottleneck), nets/feature.py
# (FeaturePyramidNetwork, BasicBlock), nets/cost.py, nets/estimation.py, nets/warp.py,
# nets/refinement.py (StereoDRNetRefinement) and nets/aanet.py (AANet), same attribute names.


class Bottleneck(_BottleneckForward):
    """nets/resnet.py ``Bottleneck`` (expansion 4)."""

    expansion = 4

    def __init__(
        self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride


class DeformBottleneck(_BottleneckForward):
    """nets/deform.py ``DeformBottleneck``: conv2 is ``DeformConv2d(width, width, stride=stride)``."""

    expansion = 4

    def __init__(
        self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = DeformConv2d(width, width, stride=stride)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride


class AANetFeature(nn.Module):
    def __init__(
        self,
        in_channels=32,
        zero_init_residual=True,
        groups=1,
        width_per_group=64,
        feature_mdconv=True,
        norm_layer=None,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        layers = [3, 4, 6]
        self.inplanes = in_channels
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, self.inplanes, kernel_size=7, stride=3, padding=3, bias=False),
            nn.BatchNorm2d(self.inplanes),
            nn.ReLU(inplace=True),
        )
        self.layer1 = self._make_layer(Bottleneck, in_channels, layers[0])
        self.layer2 = self._make_layer(Bottleneck, in_channels * 2, layers[1], stride=2)
        block = DeformBottleneck if feature_mdconv else Bottleneck
        self.layer3 = self._make_layer(block, in_channels * 4, layers[2], stride=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                # AANet tests isinstance(m, Bottleneck); its DeformBottleneck is a separate class.
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                norm_layer(planes * block.expansion),
            )
        layers = [
            block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, self.dilation, norm_layer)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=norm_layer,
                )
            )
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        layer1 = self.layer1(x)
        layer2 = self.layer2(layer1)
        layer3 = self.layer3(layer2)
        return [layer1, layer2, layer3]


class FeaturePyramidNetwork(nn.Module):
    def __init__(self, in_channels, out_channels=128, num_levels=3):
        super().__init__()
        in_channels = list(in_channels)
        self.in_channels = in_channels
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(num_levels):
            self.lateral_convs.append(nn.Conv2d(in_channels[i], out_channels, 1))
            self.fpn_convs.append(
                nn.Sequential(
                    nn.Conv2d(out_channels, out_channels, 3, padding=1),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                )
            )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=1)
                nn.init.constant_(m.bias, 0)

    def forward(self, inputs):
        assert len(self.in_channels) == len(inputs)
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], scale_factor=2, mode="nearest")
        return [self.fpn_convs[i](laterals[i]) for i in range(len(laterals))]


class CostVolume(nn.Module):
    """nets/cost.py ``CostVolume``, correlation only."""

    def __init__(self, max_disp, feature_similarity="correlation"):
        super().__init__()
        assert feature_similarity == "correlation"
        self.max_disp = max_disp
        self.feature_similarity = feature_similarity

    def forward(self, left_feature, right_feature):
        b, c, h, w = left_feature.size()
        cost_volume = left_feature.new_zeros(b, self.max_disp, h, w)
        for i in range(self.max_disp):
            if i > 0:
                cost_volume[:, i, :, i:] = (left_feature[:, :, :, i:] * right_feature[:, :, :, :-i]).mean(dim=1)
            else:
                cost_volume[:, i, :, :] = (left_feature * right_feature).mean(dim=1)
        return cost_volume.contiguous()


class CostVolumePyramid(nn.Module):
    def __init__(self, max_disp, feature_similarity="correlation"):
        super().__init__()
        self.max_disp = max_disp
        self.feature_similarity = feature_similarity

    def forward(self, left_feature_pyramid, right_feature_pyramid):
        out = []
        for s in range(len(left_feature_pyramid)):
            module = CostVolume(self.max_disp // (2**s), self.feature_similarity)
            out.append(module(left_feature_pyramid[s], right_feature_pyramid[s]))
        return out


class DisparityEstimation(nn.Module):
    def __init__(self, max_disp, match_similarity=True):
        super().__init__()
        self.max_disp = max_disp
        self.match_similarity = match_similarity

    def forward(self, cost_volume):
        assert cost_volume.dim() == 4
        cost_volume = cost_volume if self.match_similarity else -cost_volume
        prob_volume = F.softmax(cost_volume, dim=1)
        disp_candidates = torch.arange(0, cost_volume.size(1)).type_as(prob_volume)
        disp_candidates = disp_candidates.view(1, cost_volume.size(1), 1, 1)
        return torch.sum(prob_volume * disp_candidates, 1, keepdim=False)


def disp_warp(img, disp, padding_mode="border"):
    """nets/warp.py ``disp_warp`` (the warped image only)."""
    assert disp.min() >= 0
    b, _, h, w = img.size()
    x_range = torch.arange(0, w).view(1, 1, w).expand(1, h, w).type_as(img)
    y_range = torch.arange(0, h).view(1, h, 1).expand(1, h, w).type_as(img)
    grid = torch.cat((x_range, y_range), dim=0).unsqueeze(0).expand(b, 2, h, w)
    sample_grid = grid + torch.cat((-disp, torch.zeros_like(disp)), dim=1)
    gx = 2 * (sample_grid[:, 0] / (w - 1)) - 1
    gy = 2 * (sample_grid[:, 1] / (h - 1)) - 1
    sample_grid = torch.stack((gx, gy), dim=-1)
    # AANet ran on PyTorch 1.2, whose grid_sample behaved as align_corners=True (matching the
    # (size - 1) normalisation above); later versions default to False, so say it explicitly.
    return F.grid_sample(img, sample_grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def conv2d(in_channels, out_channels, kernel_size=3, stride=1, dilation=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=False,
            groups=groups,
        ),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


class BasicBlock(nn.Module):
    """nets/feature.py ``BasicBlock`` (LeakyReLU(0.2) by default)."""

    expansion = 1

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
        leaky_relu=True,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride=stride, dilation=dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.LeakyReLU(0.2, inplace=True) if leaky_relu else nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class StereoDRNetRefinement(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = conv2d(6, 16)
        self.conv2 = conv2d(1, 16)
        self.dilation_list = [1, 2, 4, 8, 1, 1]
        self.dilated_blocks = nn.Sequential(*[BasicBlock(32, 32, stride=1, dilation=d) for d in self.dilation_list])
        self.final_conv = nn.Conv2d(32, 1, 3, 1, 1)

    def forward(self, low_disp, left_img, right_img):
        assert low_disp.dim() == 3
        low_disp = low_disp.unsqueeze(1)
        scale_factor = left_img.size(-1) / low_disp.size(-1)
        if scale_factor == 1.0:
            disp = low_disp
        else:
            disp = F.interpolate(low_disp, size=left_img.size()[-2:], mode="bilinear", align_corners=False)
            disp = disp * scale_factor
        warped_right = disp_warp(right_img, disp)
        error = warped_right - left_img
        concat1 = torch.cat((error, left_img), dim=1)
        conv1 = self.conv1(concat1)
        conv2 = self.conv2(disp)
        out = self.dilated_blocks(torch.cat((conv1, conv2), dim=1))
        residual_disp = self.final_conv(out)
        disp = F.relu(disp + residual_disp)
        return disp.squeeze(1)


class AANet(nn.Module):
    """nets/aanet.py ``AANet`` for feature_type='aanet', adaptive aggregation, stereodrnet refinement."""

    def __init__(
        self,
        max_disp,
        num_downsample=2,
        feature_type="aanet",
        no_feature_mdconv=False,
        feature_pyramid=False,
        feature_pyramid_network=False,
        feature_similarity="correlation",
        aggregation_type="adaptive",
        num_scales=3,
        num_fusions=6,
        deformable_groups=2,
        mdconv_dilation=2,
        refinement_type="stereodrnet",
        no_intermediate_supervision=False,
        num_stage_blocks=1,
        num_deform_blocks=3,
    ):
        super().__init__()
        assert feature_type == "aanet" and aggregation_type == "adaptive" and not feature_pyramid
        self.refinement_type = refinement_type
        self.feature_type = feature_type
        self.feature_pyramid = feature_pyramid
        self.feature_pyramid_network = feature_pyramid_network
        self.num_downsample = num_downsample
        self.aggregation_type = aggregation_type
        self.num_scales = num_scales
        self.feature_extractor = AANetFeature(feature_mdconv=(not no_feature_mdconv))
        self.max_disp = max_disp // 3
        if feature_pyramid_network:
            self.fpn = FeaturePyramidNetwork(in_channels=[32 * 4, 32 * 8, 32 * 16], out_channels=32 * 4)
        self.cost_volume = CostVolumePyramid(self.max_disp, feature_similarity=feature_similarity)
        self.aggregation = AdaptiveAggregation(
            max_disp=self.max_disp,
            num_scales=num_scales,
            num_fusions=num_fusions,
            num_stage_blocks=num_stage_blocks,
            num_deform_blocks=num_deform_blocks,
            mdconv_dilation=mdconv_dilation,
            deformable_groups=deformable_groups,
            intermediate_supervision=not no_intermediate_supervision,
        )
        self.disparity_estimation = DisparityEstimation(self.max_disp, True)
        if refinement_type is not None and refinement_type != "None":
            assert refinement_type == "stereodrnet"
            self.refinement = nn.ModuleList([StereoDRNetRefinement() for _ in range(num_downsample)])

    def feature_extraction(self, img):
        feature = self.feature_extractor(img)
        if self.feature_pyramid_network:
            feature = self.fpn(feature)
        return feature

    def forward(self, left_img, right_img):
        cost_volume = self.cost_volume(self.feature_extraction(left_img), self.feature_extraction(right_img))
        if self.num_scales == 1:
            cost_volume = [cost_volume[0]]
        aggregation = self.aggregation(cost_volume)
        n = len(aggregation)
        disparity_pyramid = [self.disparity_estimation(aggregation[n - 1 - i]) for i in range(n)]
        if self.refinement_type is None or self.refinement_type == "None":
            return disparity_pyramid
        disparity = disparity_pyramid[-1]
        for i in range(self.num_downsample):
            scale_factor = 1.0 / pow(2, self.num_downsample - i - 1)
            if scale_factor == 1.0:
                curr_left, curr_right = left_img, right_img
            else:
                curr_left = F.interpolate(left_img, scale_factor=scale_factor, mode="bilinear", align_corners=False)
                curr_right = F.interpolate(right_img, scale_factor=scale_factor, mode="bilinear", align_corners=False)
            disparity = self.refinement[i](disparity, curr_left, curr_right)
            disparity_pyramid.append(disparity)
        return disparity_pyramid
