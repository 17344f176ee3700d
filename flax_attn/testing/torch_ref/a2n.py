"""PyTorch reference for ``flax_attn.a2n``, following haoyuc/A2N ``code/model/aan.py``.

Attribute names are the official ones, so the released ``aan_x2.pt``/``aan_x3.pt`` load with
``strict=True``. Differences from the official file, none of which changes the computation:
``AAN`` takes keyword arguments instead of the EDSR ``args`` object (the official one hard-codes
in_nc=out_nc=3, nf=40, unf=24, nb=16 and reads ``args.scale[0]``), ``AAB`` exposes the A2N-M 1x1
non-attention branch (a commented line in the official file) as ``non_attention_kernel=1``, and
activations are not in-place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PA(nn.Module):
    """Pixel attention: ``x * sigmoid(conv1x1(x))``."""

    def __init__(self, nf):
        super().__init__()
        self.conv = nn.Conv2d(nf, nf, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return torch.mul(x, self.sigmoid(self.conv(x)))


class AttentionBranch(nn.Module):
    def __init__(self, nf, k_size=3):
        super().__init__()
        pad = (k_size - 1) // 2
        self.k1 = nn.Conv2d(nf, nf, kernel_size=k_size, padding=pad, bias=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)
        self.k2 = nn.Conv2d(nf, nf, 1)
        self.sigmoid = nn.Sigmoid()
        self.k3 = nn.Conv2d(nf, nf, kernel_size=k_size, padding=pad, bias=False)
        self.k4 = nn.Conv2d(nf, nf, kernel_size=k_size, padding=pad, bias=False)

    def forward(self, x):
        gate = self.sigmoid(self.k2(self.lrelu(self.k1(x))))
        return self.k4(torch.mul(self.k3(x), gate))


class AAB(nn.Module):
    def __init__(self, nf, reduction=4, K=2, t=30, non_attention_kernel=3):
        super().__init__()
        self.t = t
        self.K = K
        self.conv_first = nn.Conv2d(nf, nf, kernel_size=1, bias=False)
        self.conv_last = nn.Conv2d(nf, nf, kernel_size=1, bias=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.ADM = nn.Sequential(
            nn.Linear(nf, nf // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(nf // reduction, K, bias=False),
        )
        self.attention = AttentionBranch(nf)
        k = non_attention_kernel
        self.non_attention = nn.Conv2d(nf, nf, kernel_size=k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        residual = x
        b, c = x.shape[:2]
        x = self.lrelu(self.conv_first(x))
        ax = F.softmax(self.ADM(self.avg_pool(x).view(b, c)) / self.t, dim=1)
        x = self.attention(x) * ax[:, 0].view(b, 1, 1, 1) + self.non_attention(x) * ax[:, 1].view(b, 1, 1, 1)
        return self.conv_last(self.lrelu(x)) + residual


class AAN(nn.Module):
    """The official ``AAN`` (A2N) with its hyper-parameters as keyword arguments."""

    def __init__(
        self, in_nc=3, out_nc=3, nf=40, unf=24, nb=16, scale=4, reduction=4, K=2, t=30, non_attention_kernel=3
    ):
        super().__init__()
        self.scale = scale
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1, bias=True)
        self.AAB_trunk = nn.Sequential(*[AAB(nf, reduction, K, t, non_attention_kernel) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.upconv1 = nn.Conv2d(nf, unf, 3, 1, 1, bias=True)
        self.att1 = PA(unf)
        self.HRconv1 = nn.Conv2d(unf, unf, 3, 1, 1, bias=True)
        if scale == 4:
            self.upconv2 = nn.Conv2d(unf, unf, 3, 1, 1, bias=True)
            self.att2 = PA(unf)
            self.HRconv2 = nn.Conv2d(unf, unf, 3, 1, 1, bias=True)
        self.conv_last = nn.Conv2d(unf, out_nc, 3, 1, 1, bias=True)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x):
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.AAB_trunk(fea))
        if self.scale in (2, 3):
            fea = self.upconv1(F.interpolate(fea, scale_factor=self.scale, mode="nearest"))
            fea = self.lrelu(self.att1(fea))
            fea = self.lrelu(self.HRconv1(fea))
        elif self.scale == 4:
            fea = self.upconv1(F.interpolate(fea, scale_factor=2, mode="nearest"))
            fea = self.lrelu(self.att1(fea))
            fea = self.lrelu(self.HRconv1(fea))
            fea = self.upconv2(F.interpolate(fea, scale_factor=2, mode="nearest"))
            fea = self.lrelu(self.att2(fea))
            fea = self.lrelu(self.HRconv2(fea))
        out = self.conv_last(fea)
        return out + F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
