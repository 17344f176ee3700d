"""References for ``flax_attn.stn``: the PyTorch spatial transformer tutorial, in plain torch.

Written from the tutorial (``intermediate/spatial_transformer_tutorial.py``): ``localization`` and
``fc_loc`` sequentials with the identity-initialised last layer, ``F.affine_grid`` +
``F.grid_sample``; ``SpatialTransformer`` only generalises the input channels and size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _feature_hw(input_size):
    h, w = input_size
    return ((h - 6) // 2 - 4) // 2, ((w - 6) // 2 - 4) // 2


class SpatialTransformer(nn.Module):
    """The tutorial's ``stn`` (localization + fc_loc + affine_grid + grid_sample) as a module."""

    def __init__(self, in_channels=1, input_size=(28, 28), mode="bilinear", padding_mode="zeros", align_corners=False):
        super().__init__()
        fh, fw = _feature_hw(input_size)
        self.feat = 10 * fh * fw
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, align_corners
        self.localization = nn.Sequential(
            nn.Conv2d(in_channels, 8, kernel_size=7),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
            nn.Conv2d(8, 10, kernel_size=5),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
        )
        self.fc_loc = nn.Sequential(nn.Linear(self.feat, 32), nn.ReLU(True), nn.Linear(32, 3 * 2))
        self.fc_loc[2].weight.data.zero_()
        self.fc_loc[2].bias.data.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float))

    def forward(self, x):
        xs = self.localization(x).reshape(-1, self.feat)
        theta = self.fc_loc(xs).view(-1, 2, 3)
        grid = F.affine_grid(theta, x.size(), align_corners=self.align_corners)
        return F.grid_sample(x, grid, mode=self.mode, padding_mode=self.padding_mode, align_corners=self.align_corners)


class Net(nn.Module):
    """The tutorial's ``Net``: STN followed by the conv classifier, log-softmax output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)
        self.localization = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=7),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
            nn.Conv2d(8, 10, kernel_size=5),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
        )
        self.fc_loc = nn.Sequential(nn.Linear(10 * 3 * 3, 32), nn.ReLU(True), nn.Linear(32, 3 * 2))
        self.fc_loc[2].weight.data.zero_()
        self.fc_loc[2].bias.data.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float))

    def stn(self, x):
        xs = self.localization(x).reshape(
            -1, 10 * 3 * 3
        )  # view in the tutorial; reshape also takes channels-last strides
        theta = self.fc_loc(xs).view(-1, 2, 3)
        grid = F.affine_grid(theta, x.size(), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)

    def forward(self, x):
        x = self.stn(x)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.reshape(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)
