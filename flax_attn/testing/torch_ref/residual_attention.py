"""PyTorch references for ``flax_attn.residual_attention``: tengshaofeng/ResidualAttentionNetwork-pytorch.

``model/basic_layers.py`` (``ResidualBlock``), ``model/attention_module.py``
(``AttentionModule_stage1/2/3``) and ``model/residual_attention_network.py``
(``ResidualAttentionModel_56``/``_92``), with the official attribute names and ``nn.Sequential``
indices. The official code is Python 2 (``output_channels/4``); integer division is meant.
"""

from __future__ import annotations

from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, input_channels, output_channels, stride=1):
        super().__init__()
        self.input_channels, self.output_channels, self.stride = input_channels, output_channels, stride
        mid = output_channels // 4
        self.bn1 = nn.BatchNorm2d(input_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(input_channels, mid, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, output_channels, 1, 1, bias=False)
        self.conv4 = nn.Conv2d(input_channels, output_channels, 1, stride, bias=False)

    def forward(self, x):
        residual = x
        out1 = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.conv1(out1)))
        out = self.relu(self.bn3(self.conv2(out)))
        out = self.conv3(out)
        if (self.input_channels != self.output_channels) or (self.stride != 1):
            residual = self.conv4(out1)
        return out + residual


def _mask_head(c):
    return nn.Sequential(
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.Conv2d(c, c, kernel_size=1, stride=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.Conv2d(c, c, kernel_size=1, stride=1, bias=False),
        nn.Sigmoid(),
    )


class AttentionModule_stage1(nn.Module):
    def __init__(self, in_channels, out_channels, size1=(56, 56), size2=(28, 28), size3=(14, 14)):
        super().__init__()
        rb = lambda: ResidualBlock(in_channels, out_channels)  # noqa: E731
        self.first_residual_blocks = rb()
        self.trunk_branches = nn.Sequential(rb(), rb())
        self.mpool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.softmax1_blocks = rb()
        self.skip1_connection_residual_block = rb()
        self.mpool2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.softmax2_blocks = rb()
        self.skip2_connection_residual_block = rb()
        self.mpool3 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.softmax3_blocks = nn.Sequential(rb(), rb())
        self.interpolation3 = nn.UpsamplingBilinear2d(size=size3)
        self.softmax4_blocks = rb()
        self.interpolation2 = nn.UpsamplingBilinear2d(size=size2)
        self.softmax5_blocks = rb()
        self.interpolation1 = nn.UpsamplingBilinear2d(size=size1)
        self.softmax6_blocks = _mask_head(out_channels)
        self.last_blocks = rb()

    def forward(self, x):
        x = self.first_residual_blocks(x)
        out_trunk = self.trunk_branches(x)
        out_softmax1 = self.softmax1_blocks(self.mpool1(x))
        out_skip1 = self.skip1_connection_residual_block(out_softmax1)
        out_softmax2 = self.softmax2_blocks(self.mpool2(out_softmax1))
        out_skip2 = self.skip2_connection_residual_block(out_softmax2)
        out_softmax3 = self.softmax3_blocks(self.mpool3(out_softmax2))
        out = self.interpolation3(out_softmax3) + out_softmax2 + out_skip2
        out_softmax4 = self.softmax4_blocks(out)
        out = self.interpolation2(out_softmax4) + out_softmax1 + out_skip1
        out_softmax5 = self.softmax5_blocks(out)
        out_interp1 = self.interpolation1(out_softmax5) + out_trunk
        out = (1 + self.softmax6_blocks(out_interp1)) * out_trunk
        return self.last_blocks(out)


class AttentionModule_stage2(nn.Module):
    def __init__(self, in_channels, out_channels, size1=(28, 28), size2=(14, 14)):
        super().__init__()
        rb = lambda: ResidualBlock(in_channels, out_channels)  # noqa: E731
        self.first_residual_blocks = rb()
        self.trunk_branches = nn.Sequential(rb(), rb())
        self.mpool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.softmax1_blocks = rb()
        self.skip1_connection_residual_block = rb()
        self.mpool2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.softmax2_blocks = nn.Sequential(rb(), rb())
        self.interpolation2 = nn.UpsamplingBilinear2d(size=size2)
        self.softmax3_blocks = rb()
        self.interpolation1 = nn.UpsamplingBilinear2d(size=size1)
        self.softmax4_blocks = _mask_head(out_channels)
        self.last_blocks = rb()

    def forward(self, x):
        x = self.first_residual_blocks(x)
        out_trunk = self.trunk_branches(x)
        out_softmax1 = self.softmax1_blocks(self.mpool1(x))
        out_skip1 = self.skip1_connection_residual_block(out_softmax1)
        out_softmax2 = self.softmax2_blocks(self.mpool2(out_softmax1))
        out = self.interpolation2(out_softmax2) + out_softmax1 + out_skip1
        out_softmax3 = self.softmax3_blocks(out)
        out_interp1 = self.interpolation1(out_softmax3) + out_trunk
        out = (1 + self.softmax4_blocks(out_interp1)) * out_trunk
        return self.last_blocks(out)


class AttentionModule_stage3(nn.Module):
    def __init__(self, in_channels, out_channels, size1=(14, 14)):
        super().__init__()
        rb = lambda: ResidualBlock(in_channels, out_channels)  # noqa: E731
        self.first_residual_blocks = rb()
        self.trunk_branches = nn.Sequential(rb(), rb())
        self.mpool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.softmax1_blocks = nn.Sequential(rb(), rb())
        self.interpolation1 = nn.UpsamplingBilinear2d(size=size1)
        self.softmax2_blocks = _mask_head(out_channels)
        self.last_blocks = rb()

    def forward(self, x):
        x = self.first_residual_blocks(x)
        out_trunk = self.trunk_branches(x)
        out_softmax1 = self.softmax1_blocks(self.mpool1(x))
        out_interp1 = self.interpolation1(out_softmax1) + out_trunk
        out = (1 + self.softmax2_blocks(out_interp1)) * out_trunk
        return self.last_blocks(out)


class _ResidualAttentionModel(nn.Module):
    def __init__(self, depth, num_classes=10):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.mpool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.residual_block1 = ResidualBlock(64, 256)
        self.attention_module1 = AttentionModule_stage1(256, 256)
        self.residual_block2 = ResidualBlock(256, 512, 2)
        self.attention_module2 = AttentionModule_stage2(512, 512)
        if depth == 92:
            self.attention_module2_2 = AttentionModule_stage2(512, 512)
        self.residual_block3 = ResidualBlock(512, 1024, 2)
        self.attention_module3 = AttentionModule_stage3(1024, 1024)
        if depth == 92:
            self.attention_module3_2 = AttentionModule_stage3(1024, 1024)
            self.attention_module3_3 = AttentionModule_stage3(1024, 1024)
        self.residual_block4 = ResidualBlock(1024, 2048, 2)
        self.residual_block5 = ResidualBlock(2048, 2048)
        self.residual_block6 = ResidualBlock(2048, 2048)
        self.mpool2 = nn.Sequential(nn.BatchNorm2d(2048), nn.ReLU(inplace=True), nn.AvgPool2d(kernel_size=7, stride=1))
        self.fc = nn.Linear(2048, num_classes)
        self.depth = depth

    def forward(self, x):
        out = self.mpool1(self.conv1(x))
        out = self.attention_module1(self.residual_block1(out))
        out = self.attention_module2(self.residual_block2(out))
        if self.depth == 92:
            out = self.attention_module2_2(out)
        out = self.attention_module3(self.residual_block3(out))
        if self.depth == 92:
            out = self.attention_module3_3(self.attention_module3_2(out))
        out = self.residual_block6(self.residual_block5(self.residual_block4(out)))
        out = self.mpool2(out)
        return self.fc(out.view(out.size(0), -1))


def residual_attention_model_56(num_classes=10):
    return _ResidualAttentionModel(56, num_classes)


def residual_attention_model_92(num_classes=10):
    return _ResidualAttentionModel(92, num_classes)
