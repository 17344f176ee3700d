"""PyTorch reference for ``flax_attn.augmented_conv``: leaderj1001/Attention-Augmented-Conv2d semantics.

Rewritten from the official ``attention_augmented_conv.py`` (version with ``shape``/``relative``/
``stride``): the same parameters, the relative logits built with ``rel_to_abs`` and repeated to
``(H*W, H*W)`` as there, and the same reshape of the attention output.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class AugmentedConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, dk, dv, Nh, shape=0, relative=False, stride=1):
        super().__init__()
        assert Nh != 0 and dk % Nh == 0 and dv % Nh == 0 and stride in (1, 2)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.dk, self.dv, self.Nh, self.shape, self.relative, self.stride = (
            dk,
            dv,
            Nh,
            shape,
            relative,
            stride,
        )
        self.padding = (kernel_size - 1) // 2
        self.conv_out = nn.Conv2d(in_channels, out_channels - dv, kernel_size, stride=stride, padding=self.padding)
        self.qkv_conv = nn.Conv2d(
            in_channels, 2 * dk + dv, kernel_size=kernel_size, stride=stride, padding=self.padding
        )
        self.attn_out = nn.Conv2d(dv, dv, kernel_size=1, stride=1)
        if relative:
            self.key_rel_w = nn.Parameter(torch.randn((2 * shape - 1, dk // Nh)))
            self.key_rel_h = nn.Parameter(torch.randn((2 * shape - 1, dk // Nh)))

    def forward(self, x):
        conv_out = self.conv_out(x)
        batch, _, height, width = conv_out.size()
        qkv = self.qkv_conv(x)
        n, _, h, w = qkv.size()
        q, k, v = torch.split(qkv, [self.dk, self.dk, self.dv], dim=1)
        q = q.reshape(n, self.Nh, self.dk // self.Nh, h, w) * (self.dk // self.Nh) ** -0.5
        k = k.reshape(n, self.Nh, self.dk // self.Nh, h, w)
        v = v.reshape(n, self.Nh, self.dv // self.Nh, h, w)
        flat_q = q.reshape(n, self.Nh, -1, h * w)
        flat_k = k.reshape(n, self.Nh, -1, h * w)
        flat_v = v.reshape(n, self.Nh, -1, h * w)
        logits = torch.matmul(flat_q.transpose(2, 3), flat_k)
        if self.relative:
            h_rel, w_rel = self.relative_logits(q)
            logits = logits + h_rel
            logits = logits + w_rel
        weights = F.softmax(logits, dim=-1)
        attn = torch.matmul(weights, flat_v.transpose(2, 3))
        attn = torch.reshape(attn, (batch, self.Nh, self.dv // self.Nh, height, width))
        attn = attn.reshape(batch, self.dv, height, width)
        return torch.cat((conv_out, self.attn_out(attn)), dim=1)

    def relative_logits(self, q):
        b, nh, dk, h, w = q.size()
        q = q.transpose(2, 4).transpose(2, 3)  # (B, Nh, H, W, dkh)
        rel_w = self.relative_logits_1d(q, self.key_rel_w, h, w, nh, "w")
        rel_h = self.relative_logits_1d(q.transpose(2, 3), self.key_rel_h, w, h, nh, "h")
        return rel_h, rel_w

    def relative_logits_1d(self, q, rel_k, h, w, nh, case):
        rel = torch.einsum("bhxyd,md->bhxym", q, rel_k)
        rel = rel.reshape(-1, nh * h, w, 2 * w - 1)
        rel = self.rel_to_abs(rel).reshape(-1, nh, h, w, w)
        rel = rel.unsqueeze(3).repeat((1, 1, 1, h, 1, 1))
        if case == "w":
            rel = rel.transpose(3, 4)
        else:
            rel = rel.transpose(2, 4).transpose(4, 5).transpose(3, 5)
        return rel.reshape(-1, nh, h * w, h * w)

    @staticmethod
    def rel_to_abs(x):
        b, nh, length, _ = x.size()
        x = torch.cat((x, torch.zeros((b, nh, length, 1)).to(x)), dim=3)
        flat = x.reshape(b, nh, length * 2 * length)
        flat = torch.cat((flat, torch.zeros((b, nh, length - 1)).to(x)), dim=2)
        return flat.reshape(b, nh, length + 1, 2 * length - 1)[:, :, :length, length - 1 :]
