"""PyTorch references for ``flax_attn.acmix`` and ``flax_attn.window``.

``ACmix`` follows the official ResNet variant (LeapLabTHU/ACmix, ``ResNet/test_bottleneck.py``):
the explicit ``ReflectionPad2d`` + ``nn.Unfold`` formulation with the relative-position term
``q . (k + pe_q - pe_k)``, the shared 1x1 ``conv1/2/3``, the ``fc`` + shift-initialised grouped
``dep_conv`` convolution path, and the learnable ``rate1``/``rate2``. ``WindowAttention`` follows
microsoft/Swin-Transformer ``models/swin_transformer.py``. Both keep the official attribute names,
so their state dicts have the official keys.
"""

from __future__ import annotations

import torch
from torch import nn


def _position(h: int, w: int) -> torch.Tensor:
    """(1, 2, H, W): channel 0 the x coordinate in [-1, 1] along W, channel 1 the y coordinate along H."""
    xs = torch.linspace(-1.0, 1.0, w).unsqueeze(0).repeat(h, 1)
    ys = torch.linspace(-1.0, 1.0, h).unsqueeze(1).repeat(1, w)
    return torch.stack([xs, ys], 0).unsqueeze(0)


def _subsample(x: torch.Tensor, s: int) -> torch.Tensor:
    return x[:, :, ::s, ::s]


class ACmix(nn.Module):
    """ACmix (Pan et al., CVPR 2022, arXiv 2111.14556), official semantics, NCHW."""

    def __init__(self, in_planes, out_planes, kernel_att=7, head=4, kernel_conv=3, stride=1, dilation=1):
        super().__init__()
        self.in_planes, self.out_planes = in_planes, out_planes
        self.head, self.kernel_att, self.kernel_conv = head, kernel_att, kernel_conv
        self.stride, self.dilation = stride, dilation
        self.head_dim = out_planes // head
        self.rate1 = nn.Parameter(torch.empty(1))
        self.rate2 = nn.Parameter(torch.empty(1))
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv_p = nn.Conv2d(2, self.head_dim, kernel_size=1)
        self.padding_att = (dilation * (kernel_att - 1) + 1) // 2
        self.pad_att = nn.ReflectionPad2d(self.padding_att)
        self.unfold = nn.Unfold(kernel_size=kernel_att, padding=0, stride=stride)
        self.softmax = nn.Softmax(dim=1)
        self.fc = nn.Conv2d(3 * head, kernel_conv * kernel_conv, kernel_size=1, bias=False)
        self.dep_conv = nn.Conv2d(
            kernel_conv * kernel_conv * self.head_dim,
            out_planes,
            kernel_size=kernel_conv,
            bias=True,
            groups=self.head_dim,
            padding=1,
            stride=stride,
        )
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.rate1.fill_(0.5)
            self.rate2.fill_(0.5)
            kc = self.kernel_conv
            # Each of the kc^2 input maps of a group is routed to one tap: the conv starts as a pure shift.
            shift = torch.zeros(kc * kc, kc, kc)
            for i in range(kc * kc):
                shift[i, i // kc, i % kc] = 1.0
            self.dep_conv.weight.copy_(shift.unsqueeze(0).repeat(self.out_planes, 1, 1, 1))
            self.dep_conv.bias.zero_()

    def forward(self, x):
        q, k, v = self.conv1(x), self.conv2(x), self.conv3(x)
        scaling = float(self.head_dim) ** -0.5
        b, c, h, w = q.shape
        s, ka, hd, nh = self.stride, self.kernel_att, self.head_dim, self.head
        h_out, w_out = h // s, w // s

        pe = self.conv_p(_position(h, w).to(x.dtype))
        q_att = q.view(b * nh, hd, h, w) * scaling
        k_att = k.view(b * nh, hd, h, w)
        v_att = v.view(b * nh, hd, h, w)
        q_pe = pe
        if s > 1:
            q_att, q_pe = _subsample(q_att, s), _subsample(pe, s)
        unfold_k = self.unfold(self.pad_att(k_att)).view(b * nh, hd, ka * ka, h_out, w_out)
        unfold_rpe = self.unfold(self.pad_att(pe)).view(1, hd, ka * ka, h_out, w_out)
        att = (q_att.unsqueeze(2) * (unfold_k + q_pe.unsqueeze(2) - unfold_rpe)).sum(1)
        att = self.softmax(att)
        unfold_v = self.unfold(self.pad_att(v_att)).view(b * nh, hd, ka * ka, h_out, w_out)
        out_att = (att.unsqueeze(1) * unfold_v).sum(2).view(b, self.out_planes, h_out, w_out)

        f_all = self.fc(torch.cat([t.view(b, nh, hd, h * w) for t in (q, k, v)], 1))
        f_conv = f_all.permute(0, 2, 1, 3).reshape(b, -1, h, w)
        out_conv = self.dep_conv(f_conv)
        return self.rate1 * out_att + self.rate2 * out_conv


# --------------------------------------------------------------------------- Swin window attention


class WindowAttention(nn.Module):
    """Swin's ``WindowAttention`` (Liu et al., ICCV 2021, arXiv 2103.14030) on ``(num_windows*B, N, C)``."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.window_size = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing="ij"))
        flat = torch.flatten(coords, 1)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += wh - 1
        rel[:, :, 1] += ww - 1
        rel[:, :, 0] *= 2 * ww - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x, mask=None):
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(b_, n, c)
        return self.proj_drop(self.proj(x))


def window_partition(x, ws):
    """(B, H, W, C) -> (num_windows*B, ws, ws, C), Swin's helper."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def window_reverse(windows, ws, h, w):
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def shift_attn_mask(h, w, ws, shift):
    """Swin's attention mask for the cyclically shifted windows: (num_windows, N, N) with 0 / -100."""
    img_mask = torch.zeros((1, h, w, 1))
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img_mask[:, hs, wsl, :] = cnt
            cnt += 1
    mw = window_partition(img_mask, ws).view(-1, ws * ws)
    attn_mask = mw.unsqueeze(1) - mw.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


class ShiftedWindowAttention(WindowAttention):
    """The attention half of a Swin block on a channels-last image ``(B, H, W, C)``: cyclic shift,
    window partition, ``WindowAttention`` with the shift mask, reverse, unshift (as
    ``SwinTransformerBlock.forward``, without norm/MLP/residual). A subclass, so its state dict has
    exactly ``WindowAttention``'s keys."""

    def __init__(self, dim, window_size, num_heads, shift_size=0, qkv_bias=True, qk_scale=None):
        super().__init__(dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.ws, self.shift_size = window_size, shift_size

    def forward(self, x):
        b, h, w, c = x.shape
        ws, s = self.ws, self.shift_size
        mask = None
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
            mask = shift_attn_mask(h, w, ws, s)
        win = window_partition(x, ws).view(-1, ws * ws, c)
        out = window_reverse(super().forward(win, mask=mask).view(-1, ws, ws, c), ws, h, w)
        if s > 0:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out
