"""Dual Attention Network blocks (Fu et al., CVPR 2019, arXiv 1809.02983).

Follows junfu1115/DANet: ``encoding/nn/da_att.py`` (``PAM_Module``, ``CAM_Module``) and the
``DANetHead`` of ``encoding/models/sseg/danet.py``, on NHWC feature maps.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp  # noqa: F401  (the docstring examples use it)

from flax_attn.layers import BatchNorm, BatchStatsFields, BlockFields, Conv, merge_train
from flax_attn.ops.danet import channel_attention, position_attention

__all__ = ["CAM_Module", "DANetHead", "PAM_Module"]


class _GammaResidual(BlockFields):
    """What DANet's two attention modules share: ``in_dim`` channels in and out, and the learnt
    ``gamma`` (zero at init, so the module starts as the identity) scaling the attention output
    added to the input."""

    in_dim: int

    @nn.nowrap
    @nn.nowrap
    def _gamma_residual(self, out: jax.Array, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.zeros, (1,), self.param_dtype)
        return gamma.astype(out.dtype) * out + x


class PAM_Module(_GammaResidual):  # noqa: N801  (the official class name)
    """Position attention module: ``out = gamma * softmax(Q K^T) V + x`` over all pixel pairs.

    Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019 (arXiv 1809.02983).
    ``query_conv``/``key_conv`` are 1x1 convs to ``in_dim // 8`` channels, ``value_conv`` keeps
    ``in_dim``; the logits are not scaled; ``gamma`` starts at 0 so the block starts as the identity.

    Attributes:
      in_dim: channels ``C`` (at least 8).

    Call: ``(x (B, H, W, C), train=None)`` -> ``(B, H, W, C)``. Memory: the ``(H*W, H*W)``
    attention per image (inherent to the block).

    Example:
      >>> pam = PAM_Module(16)
      >>> x = jnp.ones((2, 5, 7, 16))
      >>> pam.apply(pam.init(jax.random.PRNGKey(0), x), x).shape
      (2, 5, 7, 16)
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        if self.in_dim < 8:
            raise ValueError(
                f"PAM_Module: `in_dim`={self.in_dim} must be at least 8 (query/key use in_dim // 8 channels)"
            )
        x = self.image_input(x, self.in_dim)
        kw = self.precision()
        b, h, w, c = x.shape
        q = Conv(self.in_dim // 8, 1, name="query_conv", **kw)(x).reshape(b, h * w, -1)
        k = Conv(self.in_dim // 8, 1, name="key_conv", **kw)(x).reshape(b, h * w, -1)
        v = Conv(self.in_dim, 1, name="value_conv", **kw)(x).reshape(b, h * w, c)
        return self._gamma_residual(position_attention(q, k, v).reshape(b, h, w, c), x)


class CAM_Module(_GammaResidual):  # noqa: N801  (the official class name)
    """Channel attention module: ``out = gamma * softmax(max(E) - E) X + x`` with ``E = X X^T`` over channels.

    Fu et al., CVPR 2019 (arXiv 1809.02983). No convolutions; ``gamma`` starts at 0.

    Attributes:
      in_dim: channels ``C``.

    Call: ``(x (B, H, W, C), train=None)`` -> ``(B, H, W, C)``; only a ``(C, C)`` matrix is formed.

    Example:
      >>> cam = CAM_Module(16)
      >>> x = jnp.ones((2, 5, 7, 16))
      >>> cam.apply(cam.init(jax.random.PRNGKey(0), x), x).shape
      (2, 5, 7, 16)
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        x = self.image_input(x, self.in_dim)
        b, h, w, c = x.shape
        return self._gamma_residual(channel_attention(x.reshape(b, h * w, c)).reshape(b, h, w, c), x)


class DANetHead(BatchStatsFields):
    """The DANet segmentation head: parallel position and channel attention branches, summed.

    Fu et al., CVPR 2019 (arXiv 1809.02983); official ``DANetHead(in_channels, out_channels,
    norm_layer)`` with ``norm_layer=BatchNorm2d``. ``inter = in_channels // 4``;
    ``conv5a -> sa (PAM) -> conv51 -> conv6`` and ``conv5c -> sc (CAM) -> conv52 -> conv7``, each
    conv a 3x3 conv (no bias) + BN + ReLU; ``conv8`` classifies ``conv51 + conv52``. The classifiers
    are ``Dropout2d`` + 1x1 conv (keys ``conv6.1``...).

    Attributes:
      in_channels: input channels (at least 32, so that PAM has ``inter // 8 >= 1`` channels).
      out_channels: number of classes.
      dropout: channel-dropout rate of the three classifiers (official 0.1; whole channels are
        dropped per sample with ``train=True``, rng stream ``dropout``).

    Call: ``(x (B, H, W, in_channels), train=None)`` returns the official tuple
    ``(sasc_output, sa_output, sc_output)``, each ``(B, H, W, out_channels)``.

    Example:
      >>> head = DANetHead(64, 5)
      >>> x = jnp.ones((1, 9, 11, 64))
      >>> outs = head.apply(head.init(jax.random.PRNGKey(0), x), x)
      >>> [o.shape for o in outs]
      [(1, 9, 11, 5), (1, 9, 11, 5), (1, 9, 11, 5)]
    """

    in_channels: int
    out_channels: int
    dropout: float = 0.1

    torch_sequential: ClassVar[tuple[str, ...]] = ("conv5a|conv5c|conv51|conv52|conv6|conv7|conv8",)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None):
        train = merge_train(self, train)
        where = "DANetHead"
        x = self.image_input(x, self.in_channels)
        inter = self.in_channels // 4
        if inter < 8:
            raise ValueError(
                f"{where}: `in_channels`={self.in_channels} must be at least 32 (PAM needs in_channels // 4 >= 8)"
            )
        kw = self.precision()

        def conv_bn_relu(name, t):
            t = Conv(inter, 3, padding=1, use_bias=False, name=f"{name}_0", **kw)(t)
            return nn.relu(BatchNorm(name=f"{name}_1", **kw)(t, train=train))

        def classifier(name, t):
            # Dropout2d: one keep/drop decision per (sample, channel), broadcast over H and W.
            t = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(t)
            return Conv(self.out_channels, 1, name=f"{name}_1", **kw)(t)

        sa_conv = conv_bn_relu("conv51", PAM_Module(inter, name="sa", **kw)(conv_bn_relu("conv5a", x)))
        sa_output = classifier("conv6", sa_conv)
        sc_conv = conv_bn_relu("conv52", CAM_Module(inter, name="sc", **kw)(conv_bn_relu("conv5c", x)))
        sc_output = classifier("conv7", sc_conv)
        sasc_output = classifier("conv8", sa_conv + sc_conv)
        return sasc_output, sa_output, sc_output
