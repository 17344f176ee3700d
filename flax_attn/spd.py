"""SPD-Conv (Sunkara & Luo, "No More Strided Convolutions or Pooling: A New CNN Building Block for
Low-Resolution Images and Small Objects", ECML PKDD 2022, arXiv 2208.03641).

A space-to-depth layer (the official ``space_to_depth`` channel order, see
:func:`flax_attn.ops.space_to_depth`) followed by a non-strided convolution, here the official
YOLOv5-style ``Conv`` of LabSAINT/SPD-Conv (``models/common.py``): ``conv`` (no bias, "same"
padding ``k // 2``) - ``bn`` - SiLU. Its state dict is that ``Conv``'s: ``conv.weight``,
``bn.weight``, ``bn.bias``, ``bn.running_mean``, ``bn.running_var``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from flax_attn.layers import BatchNorm, BatchStatsFields, Conv, merge_train
from flax_attn.ops.space_to_depth import space_to_depth

__all__ = ["SPDConv"]


class SPDConv(BatchStatsFields):
    """SPD-Conv (Sunkara & Luo, arXiv 2208.03641): ``space_to_depth`` then ``Conv(4 * c1, c2, k, s=1)``.

    Attributes:
      c1: input channels (before space-to-depth).
      c2: output channels.
      k: kernel size of the non-strided conv (3), padding ``k // 2``.
      g: conv groups; must divide ``4 * c1`` and ``c2``.
      act: SiLU after BatchNorm (official ``act=True``); ``False`` for identity.
      bn_eps, bn_momentum: the ``nn.BatchNorm2d`` defaults of ``Conv`` (1e-5, 0.1). YOLOv5's
        ``Model`` resets every BatchNorm to eps 1e-3, momentum 0.03 after building: pass those to
        load weights from a YOLOv5-SPD detector.

    Input ``(B, H, W, c1)`` with even H and W (odd sizes raise ValueError: the official slicing
    cannot concatenate sub-grids of different sizes); output ``(B, H / 2, W / 2, c2)``.

    Example:
      >>> spd = SPDConv(c1=8, c2=16)
      >>> x = jax.numpy.ones((2, 10, 14, 8))
      >>> variables = spd.init(jax.random.PRNGKey(0), x)
      >>> spd.apply(variables, x).shape
      (2, 5, 7, 16)
    """

    c1: int
    c2: int
    k: int = 3
    g: int = 1
    act: bool = True
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "SPDConv"
        x = self.image_input(x, self.c1)
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(
                f"SPDConv: `x` needs even height and width for space-to-depth, got shape {x.shape}; "
                f"pad or crop to even sizes first"
            )
        if (4 * self.c1) % self.g or self.c2 % self.g:
            raise ValueError(f"{where}: `g`={self.g} must divide 4 * c1 = {4 * self.c1} and c2 = {self.c2}")
        kw = self.precision()
        y = space_to_depth(x)
        y = Conv(self.c2, self.k, padding=self.k // 2, groups=self.g, use_bias=False, name="conv", **kw)(y)
        y = BatchNorm(momentum=self.bn_momentum, eps=self.bn_eps, name="bn", **kw)(y, train=train)
        return nn.silu(y) if self.act else y
