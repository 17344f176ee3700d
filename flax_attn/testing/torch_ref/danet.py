"""PyTorch references for ``flax_attn.danet``: junfu1115/DANet ``encoding/nn/da_att.py`` and ``DANetHead``."""

from __future__ import annotations

import torch
from torch import nn


class PAM_Module(nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.chanel_in = in_dim
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.size()
        q = self.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)
        k = self.key_conv(x).view(b, -1, w * h)
        attention = self.softmax(torch.bmm(q, k))
        v = self.value_conv(x).view(b, -1, w * h)
        out = torch.bmm(v, attention.permute(0, 2, 1)).view(b, c, h, w)
        return self.gamma * out + x


class CAM_Module(nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.chanel_in = in_dim
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.size()
        q = x.view(b, c, -1)
        k = x.view(b, c, -1).permute(0, 2, 1)
        energy = torch.bmm(q, k)
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        attention = self.softmax(energy_new)
        out = torch.bmm(attention, x.view(b, c, -1)).view(b, c, h, w)
        return self.gamma * out + x


class DANetHead(nn.Module):
    def __init__(self, in_channels, out_channels, norm_layer=nn.BatchNorm2d):
        super().__init__()
        inter_channels = in_channels // 4

        def cbr(cin):
            return nn.Sequential(
                nn.Conv2d(cin, inter_channels, 3, padding=1, bias=False),
                norm_layer(inter_channels),
                nn.ReLU(),
            )

        self.conv5a = cbr(in_channels)
        self.conv5c = cbr(in_channels)
        self.sa = PAM_Module(inter_channels)
        self.sc = CAM_Module(inter_channels)
        self.conv51 = cbr(inter_channels)
        self.conv52 = cbr(inter_channels)
        self.conv6 = nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(inter_channels, out_channels, 1))
        self.conv7 = nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(inter_channels, out_channels, 1))
        self.conv8 = nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(inter_channels, out_channels, 1))

    def forward(self, x):
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sa_output = self.conv6(sa_conv)
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        sc_output = self.conv7(sc_conv)
        sasc_output = self.conv8(sa_conv + sc_conv)
        return tuple([sasc_output, sa_output, sc_output])


def danet_head(in_channels, out_channels, dropout=0.1):
    head = DANetHead(in_channels, out_channels)
    for seq in (head.conv6, head.conv7, head.conv8):
        seq[0].p = dropout
    return head
