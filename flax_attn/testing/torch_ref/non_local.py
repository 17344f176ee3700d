"""PyTorch references for ``flax_attn.non_local``: AlexHex7/Non-local_pytorch semantics and keys.

The official repository has one file per pairwise function, each with the same ``_NonLocalBlockND``
attributes (``g``, ``theta``, ``phi``, ``W``, ``concat_project``); here one class takes ``mode`` and
builds exactly the attributes the corresponding official file builds. The official Gaussian file
reads an attribute it never sets (``store_last_batch_nl_map``); that line is left out.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _NonLocalBlockND(nn.Module):
    def __init__(
        self,
        in_channels,
        inter_channels=None,
        dimension=3,
        sub_sample=True,
        bn_layer=True,
        mode="embedded_gaussian",
    ):
        super().__init__()
        assert dimension in (1, 2, 3)
        assert mode in ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
        self.mode = mode
        self.dimension = dimension
        self.sub_sample = sub_sample
        self.in_channels = in_channels
        self.inter_channels = inter_channels
        if self.inter_channels is None:
            self.inter_channels = in_channels // 2
            if self.inter_channels == 0:
                self.inter_channels = 1
        if dimension == 3:
            conv_nd, pool, bn = nn.Conv3d, nn.MaxPool3d(kernel_size=(1, 2, 2)), nn.BatchNorm3d
        elif dimension == 2:
            conv_nd, pool, bn = nn.Conv2d, nn.MaxPool2d(kernel_size=(2, 2)), nn.BatchNorm2d
        else:
            conv_nd, pool, bn = nn.Conv1d, nn.MaxPool1d(kernel_size=2), nn.BatchNorm1d

        self.g = conv_nd(self.in_channels, self.inter_channels, kernel_size=1, stride=1, padding=0)
        if bn_layer:
            self.W = nn.Sequential(
                conv_nd(self.inter_channels, self.in_channels, kernel_size=1, stride=1, padding=0),
                bn(self.in_channels),
            )
            nn.init.constant_(self.W[1].weight, 0)
            nn.init.constant_(self.W[1].bias, 0)
        else:
            self.W = conv_nd(self.inter_channels, self.in_channels, kernel_size=1, stride=1, padding=0)
            nn.init.constant_(self.W.weight, 0)
            nn.init.constant_(self.W.bias, 0)

        if mode != "gaussian":
            self.theta = conv_nd(self.in_channels, self.inter_channels, kernel_size=1, stride=1, padding=0)
            self.phi = conv_nd(self.in_channels, self.inter_channels, kernel_size=1, stride=1, padding=0)
        if mode == "concatenation":
            self.concat_project = nn.Sequential(nn.Conv2d(self.inter_channels * 2, 1, 1, 1, 0, bias=False), nn.ReLU())
        if sub_sample:
            self.g = nn.Sequential(self.g, pool)
            if mode == "gaussian":
                self.phi = pool
            else:
                self.phi = nn.Sequential(self.phi, pool)

    def forward(self, x, return_nl_map=False):
        b = x.size(0)
        g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
        if self.mode == "gaussian":
            theta_x = x.view(b, self.in_channels, -1).permute(0, 2, 1)
            phi_x = (self.phi(x) if self.sub_sample else x).view(b, self.in_channels, -1)
            f = torch.matmul(theta_x, phi_x)
            f_div_c = F.softmax(f, dim=-1)
        elif self.mode == "embedded_gaussian":
            theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, -1)
            f_div_c = F.softmax(torch.matmul(theta_x, phi_x), dim=-1)
        elif self.mode == "dot_product":
            theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, -1)
            f = torch.matmul(theta_x, phi_x)
            f_div_c = f / f.size(-1)
        else:
            theta_x = self.theta(x).view(b, self.inter_channels, -1, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, 1, -1)
            h, w = theta_x.size(2), phi_x.size(3)
            concat = torch.cat([theta_x.repeat(1, 1, 1, w), phi_x.repeat(1, 1, h, 1)], dim=1)
            f = self.concat_project(concat)
            bb, _, h, w = f.size()
            f = f.view(bb, h, w)
            f_div_c = f / f.size(-1)
        y = torch.matmul(f_div_c, g_x).permute(0, 2, 1).contiguous()
        y = y.view(b, self.inter_channels, *x.size()[2:])
        z = self.W(y) + x
        if return_nl_map:
            return z, f_div_c
        return z


def non_local_block(
    in_channels, inter_channels=None, dimension=3, sub_sample=True, bn_layer=True, mode="embedded_gaussian"
):
    return _NonLocalBlockND(in_channels, inter_channels, dimension, sub_sample, bn_layer, mode)


class Network(nn.Module):
    """``lib/network.py`` of the official repository (embedded-Gaussian blocks)."""

    def __init__(self):
        super().__init__()
        self.conv_1 = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.nl_1 = _NonLocalBlockND(32, dimension=2)
        self.conv_2 = nn.Sequential(nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.nl_2 = _NonLocalBlockND(64, dimension=2)
        self.conv_3 = nn.Sequential(nn.Conv2d(64, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10))

    def forward(self, x, return_nl_map=False):
        b = x.size(0)
        f1, m1 = self.nl_1(self.conv_1(x), return_nl_map=True)
        f2, m2 = self.nl_2(self.conv_2(f1), return_nl_map=True)
        out = self.fc(self.conv_3(f2).view(b, -1))
        return (out, [m1, m2]) if return_nl_map else out


def non_local_mnist_net(dropout=0.5):
    net = Network()
    net.fc[2].p = dropout
    return net
