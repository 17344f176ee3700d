"""References for ``flax_attn.se``: senet.pytorch's SE layer and SE blocks, the seed's 1x1-conv SE,
a torchvision-layout ResNet to hold the blocks, and timm's SE-ResNets (through the import shim).

Written from moskomule/senet.pytorch (``senet/se_module.py``, ``senet/se_resnet.py``) and
torchvision's ResNet attribute names; torchvision itself is not needed.
"""

from __future__ import annotations

import torch
from torch import nn

_DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50}


class SELayer(nn.Module):
    """senet.pytorch ``SELayer``: avgpool, Linear(no bias)-ReLU-Linear(no bias)-Sigmoid, rescale."""

    def __init__(self, channel, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c = x.shape[:2]
        w = self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)
        return x * w.expand_as(x)


class SELayerConv(nn.Module):
    """The seed blog's SE with 1x1 convs ``fc1`` (no bias). The blog returns ``x * y`` with the
    pooled ``y`` by mistake; the evident intent, ``x * fc1(y)``, is what this computes."""

    def __init__(self, channel, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Sequential(
            nn.Conv2d(channel, channel // reduction, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channel // reduction, channel, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.fc1(self.avg_pool(x))


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class SEBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, *, reduction=16):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SELayer(planes, reduction)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class SEBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, *, reduction=16):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.se = SELayer(planes * 4, reduction)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


def _downsample(inplanes, out_planes, stride):
    return nn.Sequential(
        nn.Conv2d(inplanes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


def _block(cls, inplanes, planes, stride, reduction, downsample=None):
    out = planes * cls.expansion
    if downsample is None:
        downsample = stride != 1 or inplanes != out
    return cls(
        inplanes, planes, stride, _downsample(inplanes, out, stride) if downsample else None, reduction=reduction
    )


def se_basic_block(inplanes, planes, stride=1, reduction=16, downsample=None):
    """``SEBasicBlock`` with the projection shortcut torchvision's ``_make_layer`` would give it."""
    return _block(SEBasicBlock, inplanes, planes, stride, reduction, downsample)


def se_bottleneck(inplanes, planes, stride=1, reduction=16, downsample=None):
    """``SEBottleneck`` with the projection shortcut torchvision's ``_make_layer`` would give it."""
    return _block(SEBottleneck, inplanes, planes, stride, reduction, downsample)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` (v1.5: stride in the 3x3 conv) with its attribute names, for SE blocks."""

    def __init__(self, block, layers, num_classes=1000, reduction=16):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, reduction)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, reduction)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, reduction)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, reduction)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride, reduction):
        layers = [_block(block, self.inplanes, planes, stride, reduction)]
        self.inplanes = planes * block.expansion
        layers += [_block(block, self.inplanes, planes, 1, reduction) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def timm_seresnet(depth: int, num_classes: int = 1000):
    """timm's ``seresnet{depth}`` (random weights), built through the torchvision import shim."""
    from flax_attn.testing.timm_shim import import_timm

    timm = import_timm()
    if timm is None:
        raise ImportError("timm is not installed")
    return timm.create_model(f"seresnet{depth}", pretrained=False, num_classes=num_classes)


def se_resnet(block="basic", layers=(2, 2, 2, 2), num_classes=1000, reduction=16, se_style="timm"):
    """The reference SE-ResNet for ``flax_attn.SEResNet(**same arguments)``."""
    if se_style == "timm":
        depth = _DEPTHS.get((block, tuple(layers)))
        if depth is None or reduction != 16:
            raise ValueError(f"no timm seresnet for block={block!r}, layers={layers}, reduction={reduction}")
        return timm_seresnet(depth, num_classes)
    cls = {"basic": SEBasicBlock, "bottleneck": SEBottleneck}[block]
    return ResNet(cls, layers, num_classes, reduction)


def se_resnet18(num_classes=1000, **kw):
    return se_resnet("basic", (2, 2, 2, 2), num_classes, **kw)


def se_resnet34(num_classes=1000, **kw):
    return se_resnet("basic", (3, 4, 6, 3), num_classes, **kw)


def se_resnet50(num_classes=1000, **kw):
    return se_resnet("bottleneck", (3, 4, 6, 3), num_classes, **kw)


def timm_se_module(channel, reduction=16, se_style="timm"):
    """timm's ``SEModule(channel, rd_ratio=1 / reduction)`` (through the torchvision import shim)."""
    from flax_attn.testing.timm_shim import import_timm

    if se_style != "timm" or import_timm() is None:
        raise ValueError("timm_se_module needs se_style='timm' and timm installed")
    from timm.layers.squeeze_excite import SEModule

    return SEModule(channel, rd_ratio=1.0 / reduction)
