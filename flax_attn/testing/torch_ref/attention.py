"""References for ``flax_attn.attention``."""

from __future__ import annotations

import math

import torch
from torch import nn


def multihead_attention(**config) -> nn.MultiheadAttention:
    """``torch.nn.MultiheadAttention`` itself, batch-first, as the reference."""
    return nn.MultiheadAttention(batch_first=True, **config)


class ProjectedMultiHeadAttention(nn.Module):
    """The blog's ``MultiHeadAttention(n_head, d_k, d_k_, d_v, d_v_, d_o)`` with its typos fixed."""

    def __init__(self, n_head, d_k, d_k_, d_v, d_v_, d_o):
        super().__init__()
        self.n_head, self.d_k, self.d_v = n_head, d_k, d_v
        self.fc_q = nn.Linear(d_k_, n_head * d_k)
        self.fc_k = nn.Linear(d_k_, n_head * d_k)
        self.fc_v = nn.Linear(d_v_, n_head * d_v)
        self.fc_o = nn.Linear(n_head * d_v, d_o)
        self.scale = math.sqrt(d_k)

    def forward(self, q, k, v, mask=None):
        b, n_q, _ = q.shape
        n_k = k.shape[1]
        h = self.n_head
        q = self.fc_q(q).view(b, n_q, h, self.d_k).permute(2, 0, 1, 3).reshape(-1, n_q, self.d_k)
        k = self.fc_k(k).view(b, n_k, h, self.d_k).permute(2, 0, 1, 3).reshape(-1, n_k, self.d_k)
        v = self.fc_v(v).view(b, n_k, h, self.d_v).permute(2, 0, 1, 3).reshape(-1, n_k, self.d_v)
        u = torch.bmm(q, k.transpose(1, 2)) / self.scale
        if mask is not None:
            u = u.masked_fill(~mask.repeat(h, 1, 1), float("-inf"))
        attn = torch.softmax(u, dim=2)
        out = torch.bmm(attn, v)
        out = out.view(h, b, n_q, self.d_v).permute(1, 2, 0, 3).reshape(b, n_q, -1)
        return self.fc_o(out)
