"""Attention-augmented convolution (Bello et al., ICCV 2019, arXiv 1904.09925).

Follows leaderj1001/Attention-Augmented-Conv2d (``attention_augmented_conv.py``, the version with
``shape``/``relative``/``stride``), on NHWC maps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn.layers import BlockFields, Conv, merge_train
from flax_attn.ops.relative_logits import augmented_attention

__all__ = ["AugmentedConv"]


class AugmentedConv(BlockFields):
    """A convolution concatenated with multi-head self-attention over all output positions.

    Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019 (arXiv 1904.09925);
    semantics, argument names and keys of leaderj1001/Attention-Augmented-Conv2d.
    Output channels ``[conv_out (out_channels - dv) | attn_out (dv)]``. ``qkv_conv`` (same kernel
    and stride as ``conv_out``, padding ``(kernel_size - 1) // 2``) gives ``dk`` query, ``dk`` key
    and ``dv`` value channels, split into ``Nh`` heads; queries are scaled by ``(dk / Nh) ** -0.5``.

    With ``relative=True`` the learned tables ``key_rel_w``/``key_rel_h`` of shape
    ``(2 * shape - 1, dk // Nh)`` (init N(0, 1), as official) add relative-position logits; they fix
    the *output* map to ``shape x shape``. The tables are gathered, not repeated to
    ``(H*W, H*W)`` (see :mod:`flax_attn.ops.relative_logits`).

    Like the reference, the per-head attention output ``(H*W, dv/Nh)`` is *reshaped* (not
    transposed) to ``(dv/Nh, H, W)`` before ``attn_out``; this is kept so that trained reference
    weights give the same outputs.

    Attributes:
      in_channels, out_channels, kernel_size: of the convolution (``out_channels > dv``).
      dk, dv: total key/query and value channels (divisible by ``Nh``).
      Nh: number of heads (>= 1).
      shape: output height = width, required with ``relative=True``.
      relative: add relative-position logits.
      stride: 1 or 2.

    Call: ``(x (B, H, W, in_channels), train=None)`` -> ``(B, Ho, Wo, out_channels)``.

    Example:
      >>> aa = AugmentedConv(3, 20, kernel_size=3, dk=8, dv=4, Nh=2, shape=7, relative=True)
      >>> x = jnp.ones((2, 7, 7, 3))
      >>> aa.apply(aa.init(jax.random.PRNGKey(0), x), x).shape
      (2, 7, 7, 20)
    """

    in_channels: int
    out_channels: int
    kernel_size: int
    dk: int
    dv: int
    Nh: int  # noqa: N815  (the reference's name)
    shape: int = 0
    relative: bool = False
    stride: int = 1

    def _check_config(self):
        where = "AugmentedConv"
        if self.Nh < 1:
            raise ValueError(f"{where}: `Nh`={self.Nh} must be at least 1")
        if self.dk % self.Nh or self.dk <= 0:
            raise ValueError(f"{where}: `dk`={self.dk} must be a positive multiple of `Nh`={self.Nh}")
        if self.dv % self.Nh or self.dv <= 0:
            raise ValueError(f"{where}: `dv`={self.dv} must be a positive multiple of `Nh`={self.Nh}")
        if self.stride not in (1, 2):
            raise ValueError(f"{where}: `stride` must be 1 or 2, got {self.stride}")
        if self.out_channels <= self.dv:
            raise ValueError(
                f"{where}: `out_channels`={self.out_channels} must exceed `dv`={self.dv} "
                f"(conv_out has out_channels - dv channels)"
            )
        if self.relative and self.shape < 1:
            raise ValueError(f"{where}: relative=True needs `shape` (the output height = width), got {self.shape}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "AugmentedConv"
        self._check_config()
        x = self.image_input(x, self.in_channels)
        kw = self.precision()
        pad = (self.kernel_size - 1) // 2
        conv_out = Conv(
            self.out_channels - self.dv,
            self.kernel_size,
            stride=self.stride,
            padding=pad,
            name="conv_out",
            **kw,
        )(x)
        qkv = Conv(2 * self.dk + self.dv, self.kernel_size, stride=self.stride, padding=pad, name="qkv_conv", **kw)(x)
        b, h, w, _ = qkv.shape
        if self.relative and (h, w) != (self.shape, self.shape):
            raise ValueError(
                f"{where}: relative=True with shape={self.shape} needs a {self.shape}x{self.shape} "
                f"output map, "
                f"but input {tuple(x.shape)} gives {h}x{w} (stride {self.stride})"
            )
        nh, dkh, dvh = self.Nh, self.dk // self.Nh, self.dv // self.Nh
        q = qkv[..., : self.dk].reshape(b, h, w, nh, dkh) * dkh**-0.5
        k = qkv[..., self.dk : 2 * self.dk].reshape(b, h, w, nh, dkh)
        v = qkv[..., 2 * self.dk :].reshape(b, h, w, nh, dvh)
        rel = {}
        if self.relative:
            init = nn.initializers.normal(1.0)
            rel = dict(
                key_rel_h=self.param("key_rel_h", init, (2 * self.shape - 1, dkh), self.param_dtype),
                key_rel_w=self.param("key_rel_w", init, (2 * self.shape - 1, dkh), self.param_dtype),
            )
        out = augmented_attention(q, k, v, **rel)  # (B, H, W, Nh, dvh)
        # The reference's reshape of (Nh, H*W, dvh) to (Nh * dvh, H, W): reproduce it bit for bit.
        out = out.reshape(b, h * w, nh, dvh).transpose(0, 2, 1, 3).reshape(b, nh * dvh, h, w)
        out = out.transpose(0, 2, 3, 1)
        attn_out = Conv(self.dv, 1, name="attn_out", **kw)(out)
        return jnp.concatenate([conv_out, attn_out.astype(conv_out.dtype)], axis=-1)
