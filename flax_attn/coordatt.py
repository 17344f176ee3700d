"""Coordinate attention (Hou et al., "Coordinate Attention for Efficient Mobile Network Design",
CVPR 2021, arXiv 2103.02907), following the official ``CoordAtt`` (houqb/CoordAttention, coordatt.py).

The features are averaged along W (one vector per row) and along H (one per column); both strips
go through one shared ``conv1`` 1x1 - ``bn1`` - h_swish, are split again and turned into two
sigmoid gates by ``conv_h`` and ``conv_w``; the output is ``x * a_w * a_h``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn.layers import BatchNorm, BatchStatsFields, Conv, merge_train
from flax_attn.ops.channel import directional_avg_pool

__all__ = ["CoordAtt", "h_sigmoid", "h_swish"]


def h_sigmoid(x: jax.Array) -> jax.Array:
    """The official ``h_sigmoid``, ``ReLU6(x + 3) / 6`` (equal to ``jax.nn.hard_sigmoid``)."""
    return jax.nn.hard_sigmoid(x)


def h_swish(x: jax.Array) -> jax.Array:
    """The official ``h_swish``, ``x * ReLU6(x + 3) / 6`` (equal to ``jax.nn.hard_swish``)."""
    return jax.nn.hard_swish(x)


class CoordAtt(BatchStatsFields):
    """Coordinate attention (Hou et al., CVPR 2021, arXiv 2103.02907), official ``CoordAtt``.

    Attributes:
      inp: input channels C.
      oup: gate channels; the gates multiply the input, so ``oup`` is C (or 1, broadcast as in torch).
      reduction: ``mip = max(8, inp // reduction)`` hidden channels (default 32).

    Submodules and torch keys: ``conv1`` (1x1, bias), ``bn1`` (BatchNorm, torch defaults),
    ``conv_h``, ``conv_w`` (1x1, bias). With ``train=True`` ``bn1`` normalises with the statistics
    of all H + W pooled positions of the batch, as the reference does.

    Input ``(B, H, W, C)``; output the same shape.

    Example:
      >>> ca = CoordAtt(inp=32, oup=32)
      >>> x = jnp.ones((2, 7, 9, 32))
      >>> variables = ca.init(jax.random.PRNGKey(0), x)
      >>> ca.apply(variables, x).shape
      (2, 7, 9, 32)
    """

    inp: int
    oup: int
    reduction: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "CoordAtt"
        x = self.image_input(x, self.inp)
        if self.oup not in (self.inp, 1):
            raise ValueError(
                f"{where}: `oup`={self.oup} gates cannot multiply the input of {self.inp} channels "
                f"(shape {x.shape}); use oup={self.inp}"
            )
        if self.reduction <= 0:
            raise ValueError(f"{where}: `reduction` must be positive, got {self.reduction}")
        mip = max(8, self.inp // self.reduction)
        kw = self.precision()
        h = x.shape[1]
        x_h, x_w = directional_avg_pool(x)  # (B, H, C), (B, W, C)
        # torch concatenates (N, C, H, 1) and the permuted (N, C, W, 1) along dim 2: one H + W strip.
        y = jnp.concatenate([x_h, x_w], axis=1)[:, :, None, :]
        y = Conv(mip, 1, name="conv1", **kw)(y)
        y = h_swish(BatchNorm(name="bn1", **kw)(y, train=train))
        y_h, y_w = y[:, :h], y[:, h:]
        a_h = nn.sigmoid(Conv(self.oup, 1, name="conv_h", **kw)(y_h))  # (B, H, 1, oup)
        a_w = nn.sigmoid(Conv(self.oup, 1, name="conv_w", **kw)(y_w))  # (B, W, 1, oup)
        a_w = jnp.transpose(a_w, (0, 2, 1, 3))  # (B, 1, W, oup)
        return x * a_w.astype(x.dtype) * a_h.astype(x.dtype)
