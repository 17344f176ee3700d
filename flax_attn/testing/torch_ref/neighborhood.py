"""PyTorch references for ``flax_attn.neighborhood``.

``NATNeighborhoodAttention`` follows NAT/DiNAT's layer as NATTEN 0.14 shipped it
(``natten/natten2d.py``, ``NeighborhoodAttention2D``: ``qkv``, ``rpb``, ``attn_drop``, ``proj``,
``proj_drop``; the input is zero-padded at the end when it is smaller than the window) with the
``natten2dqkrpb`` / ``natten2dav`` arithmetic of NATTEN 0.14's CPU kernels
(``natten/src/cpp/natten_cpu_commons.h``: ``get_window_start`` and ``get_pb_start``), written as
per-query index tables and advanced indexing, in 1, 2 or 3 dims. Odd kernels, no stride, no
causal: NAT had neither. For those (and no ``rpb``), the reference is NATTEN 0.21's own
``natten.NeighborhoodAttention{1,2,3}D`` (:func:`natten_module`).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from flax_attn.testing.neighborhood_ref import natten014_window_start


def _pb_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    """NATTEN 0.14 ``get_pb_start``: the rpb row of window offset 0."""
    ns = kernel_size // 2
    if dilation <= 1:
        return ns + (index < ns) * (ns - index) + (index + ns >= length) * (length - index - 1 - ns)
    if index - ns * dilation < 0:
        return kernel_size - 1 - (index // dilation)
    if index + ns * dilation >= length:
        return (length - index - 1) // dilation
    return ns


def _tables(length: int, kernel_size: int, dilation: int):
    """(key index, rpb index) per (query, window offset) along one axis: two ``(length, k)`` tensors."""
    keys = [
        [natten014_window_start(i, length, kernel_size, dilation) + t * dilation for t in range(kernel_size)]
        for i in range(length)
    ]
    pbs = [[_pb_start(i, length, kernel_size, dilation) + t for t in range(kernel_size)] for i in range(length)]
    return torch.tensor(keys), torch.tensor(pbs)


def na_qk_rpb_av(q, k, v, rpb, kernel_size: int, dilation: int, attn_drop=None):
    """``softmax(q k_window^T + rpb) v_window`` on ``(B, heads, *spatial, D)`` (``q`` already scaled)."""
    spatial = q.shape[2:-1]
    n = len(spatial)
    tables = [_tables(length, kernel_size, dilation) for length in spatial]
    grids = torch.meshgrid(*(torch.arange(length) for length in spatial), indexing="ij")
    key_idx, pb_idx = [], []
    for offs in itertools.product(range(kernel_size), repeat=n):
        key_idx.append([tables[a][0][grids[a], offs[a]] for a in range(n)])
        pb_idx.append([tables[a][1][grids[a], offs[a]] for a in range(n)])
    # (B, heads, *spatial, k^n, D) windows of keys and values
    kw = torch.stack([k[(slice(None), slice(None), *idx)] for idx in key_idx], dim=-2)
    vw = torch.stack([v[(slice(None), slice(None), *idx)] for idx in key_idx], dim=-2)
    attn = (q.unsqueeze(-2) * kw).sum(-1)
    if rpb is not None:
        attn = attn + torch.stack([rpb[(slice(None), *idx)] for idx in pb_idx], dim=-1).unsqueeze(0)
    attn = attn.softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    return (attn.unsqueeze(-1) * vw).sum(-2)


class NATNeighborhoodAttention(nn.Module):
    """NAT/DiNAT's neighbourhood attention layer (NATTEN 0.14), channels-last ``(B, *spatial, C)``."""

    def __init__(
        self,
        dim,
        kernel_size,
        num_heads,
        qkv_bias=True,
        qk_scale=None,
        attn_drop=0.0,
        proj_drop=0.0,
        dilation=None,
        bias=True,
        na_dim=2,
    ):
        super().__init__()
        assert kernel_size > 1 and kernel_size % 2 == 1
        self.na_dim = na_dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.kernel_size = kernel_size
        self.dilation = dilation or 1
        self.window_size = self.kernel_size * self.dilation
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *((2 * kernel_size - 1,) * na_dim)))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        b, *spatial_in, c = x.shape
        pads = [max(0, self.window_size - s) for s in spatial_in]
        if any(pads):
            flat = [0, 0]
            for p in reversed(pads):
                flat += [0, p]
            x = nn.functional.pad(x, flat)
        spatial = x.shape[1:-1]
        n = self.na_dim
        qkv = self.qkv(x).reshape(b, *spatial, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(n + 1, 0, n + 2, *range(1, n + 1), n + 3)  # (3, B, heads, *spatial, D)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        out = na_qk_rpb_av(q, k, v, self.rpb, self.kernel_size, self.dilation, self.attn_drop)
        out = out.permute(0, *range(2, n + 2), 1, n + 2).reshape(b, *spatial, c)
        out = out[(slice(None), *(slice(0, s) for s in spatial_in))]
        return self.proj_drop(self.proj(out))


def nat_neighborhood_attention(embed_dim, num_heads, kernel_size, dilation=1, bias=True, na_dim=2, **kwargs):
    """Catalogue factory: the NAT-style layer with the Flax block's argument names."""
    stride, causal = kwargs.pop("stride", 1), kwargs.pop("is_causal", False)
    if stride not in (1, (1,) * na_dim) or causal not in (False, (False,) * na_dim):
        raise ValueError(f"NAT's layer has no stride or causal mask, got stride={stride!r}, is_causal={causal!r}")
    return NATNeighborhoodAttention(
        embed_dim, kernel_size, num_heads, dilation=dilation, bias=bias, na_dim=na_dim, **kwargs
    )


def natten_module(embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, na_dim=2, bias=False, **kw):
    """NATTEN 0.21's ``NeighborhoodAttention{na_dim}D`` (no rpb; ``bias`` must be False)."""
    import natten

    assert not bias, "NATTEN 0.21's modules have no relative positional bias"
    cls = {1: natten.NeighborhoodAttention1D, 2: natten.NeighborhoodAttention2D, 3: natten.NeighborhoodAttention3D}
    return cls[na_dim](embed_dim, num_heads, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal, **kw)


def nat_neighborhood_attention_1d(**kwargs):
    """Catalogue factory: the 1-D NAT-style layer."""
    return nat_neighborhood_attention(na_dim=1, **kwargs)


def natten_module_3d(**kwargs):
    """Catalogue factory: NATTEN 0.21's ``NeighborhoodAttention3D``."""
    return natten_module(na_dim=3, **kwargs)


def nat_neighborhood_attention_3d(**kwargs):
    """Catalogue factory: the 3-D NAT-style layer."""
    return nat_neighborhood_attention(na_dim=3, **kwargs)
