"""CCNet: criss-cross attention and the recurrent criss-cross head (Huang et al., arXiv 1811.11721).

Ports of the official speedinghzl/CCNet ``cc_attention.CrissCrossAttention`` and
``networks/ccnet.py`` ``RCCAModule``; the math is :func:`flax_attn.ops.criss_cross_attention`.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn.convert.engine import Rename
from flax_attn.layers import BatchNorm, BatchStatsFields, BlockFields, Conv, merge_train
from flax_attn.ops.criss_cross import criss_cross_attention

__all__ = ["CrissCrossAttention", "RCCAModule"]


def _input(module: nn.Module, x: jax.Array, name: str, minimum: int, why: str) -> jax.Array:
    """``x`` in ``module``'s compute dtype, checked as ``(B, H, W, channels)`` where ``channels`` is
    its field ``name``, which must be at least ``minimum`` (``why`` says what needs it)."""
    channels = getattr(module, name)
    if channels < minimum:
        raise ValueError(f"{type(module).__name__}: `{name}`={channels} must be at least {minimum} ({why})")
    return module.image_input(x, channels, layout=f"(B, H, W, {name})")


class CrissCrossAttention(BlockFields):
    """Criss-cross attention (CCNet, Huang et al., ICCV 2019, arXiv 1811.11721).

    1x1 convs project ``x`` to queries/keys (``in_dim // 8`` channels) and values (``in_dim``); each
    pixel attends to its row and column (one softmax over the ``H + W - 1`` positions, no scaling)
    and the result is added back: ``gamma * attention + x`` with ``gamma`` initialised to 0.

    Attributes:
      in_dim: input (and output) channels; at least 8.
      implementation: ``None`` (:func:`flax_attn.kernels.default_implementation`: XLA unless the
        kernel is recorded as verified on this platform), ``"xla"`` or ``"pallas"`` (the fused
        kernel; interpreted on CPU).
      dtype, param_dtype: compute and parameter dtypes.

    Input ``(B, H, W, in_dim)``; output the same shape. ``return_weights=True`` also returns the
    attention ``(B, H, W, H + W - 1)`` in the official order (row entries, then the column
    without the centre).

    Example:
      >>> m = CrissCrossAttention(in_dim=16)
      >>> x = jnp.ones((2, 13, 17, 16))
      >>> variables = m.init(jax.random.PRNGKey(0), x)
      >>> m.apply(variables, x).shape
      (2, 13, 17, 16)
    """

    in_dim: int
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None, *, return_weights: bool = False):
        train = merge_train(self, train)
        x = _input(self, x, "in_dim", 8, "queries/keys have in_dim // 8 channels")
        kw = dict(kernel_size=1, dtype=self.dtype, param_dtype=self.param_dtype)
        q = Conv(self.in_dim // 8, name="query_conv", **kw)(x)
        k = Conv(self.in_dim // 8, name="key_conv", **kw)(x)
        v = Conv(self.in_dim, name="value_conv", **kw)(x)
        gamma = self.param("gamma", nn.initializers.zeros, (1,), self.param_dtype)
        res = criss_cross_attention(q, k, v, return_weights=return_weights, implementation=self.implementation)
        out, weights = res if return_weights else (res, None)
        dtype = x.dtype  # the compute dtype (ops.dtypes.compute_dtype above)
        y = gamma.astype(dtype) * out.astype(dtype) + x.astype(dtype)
        return (y, weights) if return_weights else y


class _ConvABN(BatchStatsFields):
    """``nn.Sequential(Conv2d(3x3, bias=False), InPlaceABNSync)``: conv, BatchNorm, leaky ReLU 0.01."""

    features: int

    @nn.nowrap
    def torch_rules(self, layout):
        return [Rename(r"layers_(\d+)\.(.*)", r"\1.\2")]

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train = merge_train(self, train)
        kw = self.precision()
        x = Conv(self.features, kernel_size=3, padding=1, use_bias=False, name="layers_0", **kw)(x)
        x = BatchNorm(name="layers_1", **kw)(x, train=train)
        return nn.leaky_relu(x, negative_slope=0.01)


class RCCAModule(BatchStatsFields):
    """Recurrent criss-cross attention head of CCNet (arXiv 1811.11721), official ``RCCAModule``.

    ``conva`` (3x3 conv to ``in_channels // 4``, InPlaceABNSync) -> the same
    :class:`CrissCrossAttention` applied ``recurrence`` times (shared weights) -> ``convb`` (3x3
    conv, InPlaceABNSync) -> concatenate with the input -> ``bottleneck`` (3x3 conv to
    ``out_channels``, InPlaceABNSync, Dropout2d, 1x1 classifier conv to ``num_classes``).
    InPlaceABNSync is BatchNorm followed by its default activation, leaky ReLU with slope 0.01.

    Attributes:
      in_channels: input channels (at least 32, so the attention has ``in_channels // 32`` q/k channels).
      out_channels: bottleneck channels (512 in the paper; the official code hard-codes 512 as the
        classifier's input, which equals ``out_channels`` there).
      num_classes: classifier outputs.
      recurrence: times the shared criss-cross attention is applied (the paper's R = 2; the
        official code passes it to ``forward``).
      dropout: Dropout2d rate before the classifier (official: 0.1).
      implementation: criss-cross attention implementation (see :func:`criss_cross_attention`).

    Input ``(B, H, W, in_channels)``; output ``(B, H, W, num_classes)``. Dropout needs the
    ``dropout`` rng with ``train=True``; BatchNorm statistics need ``mutable=['batch_stats']``.

    Example:
      >>> m = RCCAModule(in_channels=64, out_channels=32, num_classes=5)
      >>> x = jnp.ones((2, 13, 17, 64))
      >>> variables = m.init(jax.random.PRNGKey(0), x)
      >>> m.apply(variables, x).shape
      (2, 13, 17, 5)
    """

    in_channels: int
    out_channels: int
    num_classes: int
    recurrence: int = 2
    dropout: float = 0.1
    implementation: str | None = None

    torch_sequential: ClassVar[tuple[str, ...]] = ("bottleneck",)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        if self.recurrence < 0:
            raise ValueError(f"RCCAModule: `recurrence` must be >= 0, got {self.recurrence}")
        x = _input(self, x, "in_channels", 32, "the attention's queries/keys have in_channels // 32 channels")
        inter = self.in_channels // 4
        kw = self.precision()
        out = _ConvABN(inter, name="conva", **kw)(x, train=train)
        cca = CrissCrossAttention(inter, implementation=self.implementation, name="cca", **kw)
        for _ in range(self.recurrence):
            out = cca(out)
        if self.recurrence == 0 and self.is_initializing():
            cca(out)  # recurrence 0 (the official Seg_Model default) still owns the cca weights
        out = _ConvABN(inter, name="convb", **kw)(out, train=train)
        out = jnp.concatenate([x.astype(out.dtype), out], axis=-1)
        out = Conv(self.out_channels, kernel_size=3, padding=1, use_bias=False, name="bottleneck_0", **kw)(out)
        out = BatchNorm(name="bottleneck_1", **kw)(out, train=train)
        out = nn.leaky_relu(out, negative_slope=0.01)
        # Dropout2d: whole channels dropped, so the mask broadcasts over H and W.
        out = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train, name="bottleneck_2")(out)
        return Conv(self.num_classes, kernel_size=1, name="bottleneck_3", **kw)(out)
