"""Reference for ``flax_attn.gcnet``: the official GCNet ``ContextBlock`` (xvjiarui/GCNet /
mmdetection ``mmdet/ops/gcb/context_block.py``), with mmcv's two init helpers written out."""

from __future__ import annotations

import torch
from torch import nn


def _kaiming_init_fan_in(module):
    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    nn.init.constant_(module.bias, 0)


def last_zero_init(m):
    last = m[-1] if isinstance(m, nn.Sequential) else m
    nn.init.constant_(last.weight, 0)
    nn.init.constant_(last.bias, 0)


class ContextBlock(nn.Module):
    def __init__(self, inplanes, ratio, pooling_type="att", fusion_types=("channel_add",)):
        super().__init__()
        assert pooling_type in ["avg", "att"]
        assert all(f in ["channel_add", "channel_mul"] for f in fusion_types) and len(fusion_types) > 0
        self.inplanes = inplanes
        self.ratio = ratio
        self.planes = int(inplanes * ratio)
        self.pooling_type = pooling_type
        self.fusion_types = fusion_types
        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(inplanes, 1, kernel_size=1)
            self.softmax = nn.Softmax(dim=2)
        else:
            self.avg_pool = nn.AdaptiveAvgPool2d(1)

        def branch():
            return nn.Sequential(
                nn.Conv2d(self.inplanes, self.planes, kernel_size=1),
                nn.LayerNorm([self.planes, 1, 1]),
                nn.ReLU(inplace=True),
                nn.Conv2d(self.planes, self.inplanes, kernel_size=1),
            )

        self.channel_add_conv = branch() if "channel_add" in fusion_types else None
        self.channel_mul_conv = branch() if "channel_mul" in fusion_types else None
        self.reset_parameters()

    def reset_parameters(self):
        if self.pooling_type == "att":
            _kaiming_init_fan_in(self.conv_mask)
        if self.channel_add_conv is not None:
            last_zero_init(self.channel_add_conv)
        if self.channel_mul_conv is not None:
            last_zero_init(self.channel_mul_conv)

    def spatial_pool(self, x):
        batch, channel, height, width = x.size()
        if self.pooling_type == "att":
            input_x = x.view(batch, channel, height * width).unsqueeze(1)  # [N, 1, C, HW]
            mask = self.conv_mask(x).view(batch, 1, height * width)
            mask = self.softmax(mask).unsqueeze(-1)  # [N, 1, HW, 1]
            return torch.matmul(input_x, mask).view(batch, channel, 1, 1)
        return self.avg_pool(x)

    def forward(self, x):
        context = self.spatial_pool(x)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out
