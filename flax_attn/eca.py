"""ECA: Efficient Channel Attention (Wang et al., "ECA-Net: Efficient Channel Attention for Deep
Convolutional Neural Networks", CVPR 2020, arXiv 1910.03151).

Follows the official ``eca_layer`` (BangguWu/ECANet, models/eca_module.py): global average pooling,
a 1-D convolution across the channel axis (one filter of size ``k_size`` shared by all channels, no
bias, zero padding ``(k_size - 1) // 2``), sigmoid, rescale. The paper's adaptive kernel size
``k = |log2(C) / gamma + b / gamma|_odd`` is available with ``k_size=None``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from flax_attn.layers import BlockFields, Conv, merge_train
from flax_attn.ops.channel import eca_kernel_size, global_pool

__all__ = ["ECALayer"]


class ECALayer(BlockFields):
    """Efficient Channel Attention (Wang et al., CVPR 2020, arXiv 1910.03151), official ``eca_layer``.

    Attributes:
      channel: input channels C.
      k_size: odd 1-D kernel size (official default 3); ``None`` picks the paper's adaptive size
        from ``gamma`` and ``b`` (:func:`flax_attn.ops.eca_kernel_size`).
      gamma, b: the adaptive-size constants (2 and 1).

    Torch key: ``conv.weight`` of shape ``(1, 1, k_size)``.

    Input ``(B, H, W, C)``; output the same shape.

    Example:
      >>> eca = ECALayer(channel=64, k_size=None)   # adaptive: k = 3 for 64 channels
      >>> x = jax.numpy.ones((2, 7, 9, 64))
      >>> variables = eca.init(jax.random.PRNGKey(0), x)
      >>> variables["params"]["conv"]["kernel"].shape
      (3, 1, 1)
    """

    channel: int
    k_size: int | None = 3
    gamma: float = 2
    b: float = 1

    @property
    def kernel_size(self) -> int:
        return eca_kernel_size(self.channel, self.gamma, self.b) if self.k_size is None else self.k_size

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "ECALayer"
        x = self.image_input(x, self.channel)
        k = self.kernel_size
        if k < 1 or k % 2 == 0:
            # An even kernel with padding (k - 1) // 2 returns C - 1 values: the gate no longer fits.
            raise ValueError(f"{where}: `k_size` must be a positive odd number, got {k}")
        y = global_pool(x, "avg")[:, :, None]  # (B, C, 1): channels as a 1-D sequence of one feature
        y = Conv(
            1, (k,), padding=(k - 1) // 2, use_bias=False, name="conv", dtype=self.dtype, param_dtype=self.param_dtype
        )(y)
        return x * nn.sigmoid(y[:, None, None, :, 0]).astype(x.dtype)
