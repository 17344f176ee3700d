"""References for ``flax_attn.cbam``: the official CBAM (Jongchan/attention-module, MODELS/cbam.py)
and the seed blog's ChannelAttention/SpatialAttention (typos fixed: ``nn.ReLU``, ``nn.Sigmoid``,
``torch.max(...)[0]``, ``self.sigmoid``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv(nn.Module):
    def __init__(
        self,
        in_planes,
        out_planes,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        relu=True,
        bn=True,
        bias=False,
    ):
        super().__init__()
        self.out_channels = out_planes
        self.conv = nn.Conv2d(
            in_planes,
            out_planes,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


def logsumexp_2d(tensor):
    flat = tensor.view(tensor.size(0), tensor.size(1), -1)
    s, _ = torch.max(flat, dim=2, keepdim=True)
    return s + (flat - s).exp().sum(dim=2, keepdim=True).log()


class ChannelGate(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max")):
        super().__init__()
        self.gate_channels = gate_channels
        self.mlp = nn.Sequential(
            Flatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels),
        )
        self.pool_types = pool_types

    def forward(self, x):
        total = None
        hw = (x.size(2), x.size(3))
        for pool_type in self.pool_types:
            if pool_type == "avg":
                raw = self.mlp(F.avg_pool2d(x, hw, stride=hw))
            elif pool_type == "max":
                raw = self.mlp(F.max_pool2d(x, hw, stride=hw))
            elif pool_type == "lp":
                raw = self.mlp(F.lp_pool2d(x, 2, hw, stride=hw))
            elif pool_type == "lse":
                raw = self.mlp(logsumexp_2d(x))
            total = raw if total is None else total + raw
        scale = torch.sigmoid(total).unsqueeze(2).unsqueeze(3).expand_as(x)
        return x * scale


class ChannelPool(nn.Module):
    def forward(self, x):
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class SpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        kernel_size = 7
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False)

    def forward(self, x):
        return x * torch.sigmoid(self.spatial(self.compress(x)))


class CBAM(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"), no_spatial=False):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x):
        out = self.ChannelGate(x)
        if not self.no_spatial:
            out = self.SpatialGate(out)
        return out


class ChannelAttention(nn.Module):
    """Seed blog: shared 1x1-conv MLP (no bias) on avg- and max-pooled features."""

    def __init__(self, channel, rate=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Sequential(
            nn.Conv2d(channel, channel // rate, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channel // rate, channel, 1, bias=False),
        )
        self.sig = nn.Sigmoid()

    def forward(self, x):
        avg_feature = self.fc1(self.avg_pool(x))
        max_feature = self.fc1(self.max_pool(x))
        return x * self.sig(max_feature + avg_feature)


class SpatialAttention(nn.Module):
    """Seed blog: conv on [mean, max] over channels, no BatchNorm (the blog fixes a 3x3 kernel)."""

    def __init__(self, kernel_size=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        mean_f = torch.mean(x, dim=1, keepdim=True)
        max_f = torch.max(x, dim=1, keepdim=True)[0]
        return x * self.sigmoid(self.conv1(torch.cat([mean_f, max_f], dim=1)))
