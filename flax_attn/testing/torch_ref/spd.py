"""Reference for ``flax_attn.spd``: LabSAINT/SPD-Conv's ``space_to_depth`` followed by its YOLOv5
``Conv`` (conv without bias, BatchNorm2d, SiLU), stride 1, "same" padding ``k // 2``."""

from __future__ import annotations

import torch
from torch import nn


class space_to_depth(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)


def autopad(k, p=None):
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class Conv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SPDConv(Conv):
    """``Conv(4 * c1, c2, k, 1)`` applied after ``space_to_depth``: the state dict is the Conv's."""

    def __init__(self, c1, c2, k=3, g=1, act=True, bn_eps=1e-5, bn_momentum=0.1):
        super().__init__(4 * c1, c2, k, 1, None, g, act)
        self.bn.eps, self.bn.momentum = bn_eps, bn_momentum
        self.spd = space_to_depth()

    def forward(self, x):
        return super().forward(self.spd(x))
