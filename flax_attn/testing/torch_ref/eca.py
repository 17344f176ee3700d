"""Reference for ``flax_attn.eca``: the official ``eca_layer`` (BangguWu/ECANet, models/eca_module.py),
plus the adaptive kernel size of the paper (used in the official ECA-MobileNetV2)."""

from __future__ import annotations

import math

from torch import nn


class _ECA(nn.Module):
    def __init__(self, channel, k_size=3):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = self.avg_pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(y).expand_as(x)


def adaptive_k(channel, gamma=2, b=1):
    t = int(abs((math.log(channel, 2) + b) / gamma))
    return t if t % 2 else t + 1


def eca_layer(channel, k_size=3, gamma=2, b=1):
    """``eca_layer(channel, k_size)``; ``k_size=None`` takes the paper's adaptive size."""
    return _ECA(channel, adaptive_k(channel, gamma, b) if k_size is None else k_size)
