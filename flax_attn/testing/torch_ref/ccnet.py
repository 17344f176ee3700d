"""PyTorch references for ``flax_attn.ccnet`` (speedinghzl/CCNet, arXiv 1811.11721).

The official ``CrissCrossAttention`` calls the CUDA ops ``ca_weight``/``ca_map`` (``src/ca.cu``).
They are re-expressed here in plain torch from the CUDA kernels' index arithmetic:

* ``ca_weight(t, f)`` -> energy ``(N, H + W - 1, H, W)``: channel ``i < W`` is
  ``sum_c t[c, y, x] * f[c, y, i]``; channel ``W + i`` (``i < H - 1``) is
  ``sum_c t[c, y, x] * f[c, j, x]`` with ``j = i if i < y else i + 1``.
* ``ca_map(w, g)`` -> ``out[c, y, x] = sum_i w[i, y, x] g[c, y, i] + sum_i w[W + i, y, x] g[c, j, x]``.

``InPlaceABNSync`` (inplace_abn) is BatchNorm followed by its default activation, leaky ReLU with
slope 0.01; its state dict has BatchNorm's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _column_index(h: int, device=None) -> torch.Tensor:
    """``J[i, y] = i if i < y else i + 1``: the column row of energy channel ``W + i`` at row ``y``."""
    i = torch.arange(h - 1, device=device)[:, None]
    y = torch.arange(h, device=device)[None, :]
    return i + (i >= y).long()


def ca_weight(t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    n, c, h, w = t.shape
    row = torch.einsum("ncyx,ncyi->niyx", t, f)  # (N, W, H, W)
    col_full = torch.einsum("ncyx,ncjx->njyx", t, f)  # (N, H, H, W): [n, j, y, x]
    idx = _column_index(h, t.device)[None, :, :, None].expand(n, h - 1, h, w)
    col = torch.gather(col_full, 1, idx)
    return torch.cat([row, col], dim=1)


def ca_map(weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n, c, h, w = g.shape
    w_row, w_col = weight[:, :w], weight[:, w:]
    out = torch.einsum("niyx,ncyi->ncyx", w_row, g)
    idx = _column_index(h, g.device)[None, :, :, None].expand(n, h - 1, h, w)
    full = torch.zeros(n, h, h, w, dtype=weight.dtype, device=weight.device).scatter(1, idx, w_col)
    return out + torch.einsum("njyx,ncjx->ncyx", full, g)


class CrissCrossAttention(nn.Module):
    """Official ``cc_attention.CrissCrossAttention`` with the CUDA ops in plain torch."""

    def __init__(self, in_dim):
        super().__init__()
        self.chanel_in = in_dim
        self.query_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        proj_query = self.query_conv(x)
        proj_key = self.key_conv(x)
        proj_value = self.value_conv(x)
        energy = ca_weight(proj_query, proj_key)
        attention = F.softmax(energy, 1)
        out = ca_map(attention, proj_value)
        return self.gamma * out + x


class InPlaceABNSync(nn.BatchNorm2d):
    """inplace_abn's ``InPlaceABNSync`` on one device: BatchNorm, then leaky ReLU (slope 0.01)."""

    def __init__(
        self, num_features, eps=1e-5, momentum=0.1, affine=True, activation="leaky_relu", activation_param=0.01
    ):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.activation, self.activation_param = activation, activation_param

    def forward(self, x):
        x = super().forward(x)
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, negative_slope=self.activation_param)
        if self.activation == "identity":
            return x
        raise ValueError(f"unsupported activation {self.activation!r}")


class RCCAModule(nn.Module):
    """Official ``networks/ccnet.py`` ``RCCAModule`` head.

    Two deviations, both switchable back: the final classifier takes ``out_channels`` inputs (the
    official code hard-codes 512, its only value of ``out_channels``), and ``recurrence`` and the
    Dropout2d rate are constructor arguments (official: ``forward(x, recurrence)``, rate 0.1).
    """

    def __init__(self, in_channels, out_channels, num_classes, recurrence=2, dropout=0.1):
        super().__init__()
        inter_channels = in_channels // 4
        self.recurrence = recurrence
        self.conva = nn.Sequential(
            nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False), InPlaceABNSync(inter_channels)
        )
        self.cca = CrissCrossAttention(inter_channels)
        self.convb = nn.Sequential(
            nn.Conv2d(inter_channels, inter_channels, 3, padding=1, bias=False), InPlaceABNSync(inter_channels)
        )
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels + inter_channels, out_channels, kernel_size=3, padding=1, dilation=1, bias=False),
            InPlaceABNSync(out_channels),
            nn.Dropout2d(dropout),
            nn.Conv2d(out_channels, num_classes, kernel_size=1, stride=1, padding=0, bias=True),
        )

    def forward(self, x, recurrence=None):
        recurrence = self.recurrence if recurrence is None else recurrence
        output = self.conva(x)
        for _ in range(recurrence):
            output = self.cca(output)
        output = self.convb(output)
        return self.bottleneck(torch.cat([x, output], 1))


def cc_py_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The semantics of CCNet's later pure-PyTorch ``cc.py`` (column energy with ``-inf`` on the
    diagonal, concatenated before the row energy, one softmax), NCHW; used as a cross-check."""
    b, _, h, w = q.shape
    energy_h = torch.einsum("bcyx,bcjx->byxj", q, k)
    energy_h = energy_h.masked_fill(torch.eye(h, dtype=torch.bool)[:, None, :], float("-inf"))
    energy_w = torch.einsum("bcyx,bcyi->byxi", q, k)
    att = torch.softmax(torch.cat([energy_h, energy_w], dim=3), dim=3)
    att_h, att_w = att[..., :h], att[..., h:]
    return torch.einsum("byxj,bcjx->bcyx", att_h, v) + torch.einsum("byxi,bcyi->bcyx", att_w, v)
