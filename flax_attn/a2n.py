"""A2N: attention in attention network for lightweight super-resolution.

Chen, Gu, Zhang, "Attention in Attention Network for Image Super-Resolution", arXiv 2104.09497;
official code haoyuc/A2N (``code/model/aan.py``, class ``AAN``). Module and parameter names follow
that file, so the released checkpoints (``aan_x2.pt``, ``aan_x3.pt``; keys ``conv_first.weight``,
``AAB_trunk.N.ADM.0.weight``, ``AAB_trunk.N.attention.k1.weight``, ``att1.conv.weight``...) load with
:func:`flax_attn.convert.from_torch`.

Visualisation: every block sows what the paper plots into the ``intermediates`` collection, so
``model.apply(variables, x, mutable=["intermediates"])`` returns them next to the output:

* ``AAB_trunk_<i>/attention_dropout``: the ``(B, K)`` softmax weights of the attention dropout
  module (column 0 weighs the attention branch, column 1 the non-attention branch);
* ``AAB_trunk_<i>/attention/attention_map``: the ``(B, H, W, nf)`` sigmoid map of the attention branch;
* ``att1/attention_map`` (and ``att2/attention_map`` at scale 4): the ``(B, sH, sW, unf)`` pixel
  attention maps of the reconstruction module.

Each sown value is a one-element tuple (Flax's ``sow`` appends).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp  # noqa: F401  (the docstring examples use it)

from flax_attn.layers import BlockFields, Conv, Linear, merge_train
from flax_attn.ops.attention_in_attention import attention_dropout_weights, mix_branches, sigmoid_gate
from flax_attn.ops.pooling import adaptive_avg_pool2d
from flax_attn.ops.resize import interpolate

__all__ = ["A2N", "AAB", "AttentionBranch", "PA"]


_IMAGE = "(batch, height, width, channels)"


def _lrelu(x: jax.Array) -> jax.Array:
    # The official code uses LeakyReLU(0.2) everywhere.
    return nn.leaky_relu(x, negative_slope=0.2)


class PA(BlockFields):
    """Pixel attention (``PA`` of the official code, from PAN, arXiv 2010.01073): ``x * sigmoid(conv1x1(x))``.

    Attributes:
      nf: channels of the input and of the 1x1 convolution (with bias).

    Input ``(B, H, W, nf)``; output ``(B, H, W, nf)``. Sows the sigmoid map as
    ``intermediates/attention_map``.

    Example:
      >>> pa = PA(nf=24)
      >>> x = jnp.ones((1, 8, 8, 24))
      >>> y = pa.apply(pa.init(jax.random.PRNGKey(0), x), x)
      >>> y.shape
      (1, 8, 8, 24)
    """

    nf: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        x = self.image_input(x, self.nf, layout=_IMAGE)
        logits = Conv(self.nf, 1, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        out, att = sigmoid_gate(x.astype(logits.dtype), logits)
        self.sow("intermediates", "attention_map", att)
        return out


class AttentionBranch(BlockFields):
    """The attention branch of an AAB: ``k4(k3(x) * sigmoid(k2(lrelu(k1(x)))))``.

    Attributes:
      nf: channels in and out.
      k_size: kernel size of ``k1``, ``k3``, ``k4`` (3 in the paper); ``k2`` is 1x1 with bias, the
        others have no bias.

    Input ``(B, H, W, nf)``; output ``(B, H, W, nf)``. Sows the sigmoid map as
    ``intermediates/attention_map``.

    Example:
      >>> br = AttentionBranch(nf=8)
      >>> x = jnp.ones((1, 5, 7, 8))
      >>> br.apply(br.init(jax.random.PRNGKey(0), x), x).shape
      (1, 5, 7, 8)
    """

    nf: int
    k_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        x = self.image_input(x, self.nf, layout=_IMAGE)
        kw = self.precision()
        p = (self.k_size - 1) // 2
        y = Conv(self.nf, self.k_size, padding=p, use_bias=False, name="k1", **kw)(x)
        y = Conv(self.nf, 1, name="k2", **kw)(_lrelu(y))
        v = Conv(self.nf, self.k_size, padding=p, use_bias=False, name="k3", **kw)(x)
        out, att = sigmoid_gate(v, y)
        self.sow("intermediates", "attention_map", att)
        return Conv(self.nf, self.k_size, padding=p, use_bias=False, name="k4", **kw)(out)


class AAB(BlockFields):
    """Attention in attention block (A2B / ``AAB``), arXiv 2104.09497, Sec. 3.

    ``x -> lrelu(conv_first 1x1) -> [attention branch, non-attention branch]`` mixed by the
    *attention dropout module* (ADM: global average pool, ``Linear(nf, nf // reduction)``, ReLU,
    ``Linear(nf // reduction, K)``, softmax with temperature ``t``), then ``lrelu``, ``conv_last``
    1x1 and the identity skip. All convolutions and linears of the block have no bias except the 1x1
    ``k2`` of the attention branch.

    Attributes:
      nf: channels in and out.
      reduction: channel reduction of the ADM hidden layer (4).
      K: number of ADM outputs (2); only the first two weight the branches, as in the official code.
      t: softmax temperature of the ADM (30).
      non_attention_kernel: 3 for A2N, 1 for the A2N-M variant (the official code's commented line).

    Input ``(B, H, W, nf)``; output ``(B, H, W, nf)``. Sows the ``(B, K)`` ADM weights as
    ``intermediates/attention_dropout``.

    Example:
      >>> blk = AAB(nf=40)
      >>> x = jnp.ones((2, 16, 16, 40))
      >>> variables = blk.init(jax.random.PRNGKey(0), x)
      >>> y, inter = blk.apply(variables, x, mutable=["intermediates"])
      >>> y.shape, inter["intermediates"]["attention_dropout"][0].shape
      ((2, 16, 16, 40), (2, 2))
    """

    nf: int
    reduction: int = 4
    K: int = 2
    t: float = 30
    non_attention_kernel: int = 3

    torch_sequential: ClassVar[tuple[str, ...]] = ("ADM",)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        x = self.image_input(x, self.nf, layout=_IMAGE)
        if self.K < 2:
            raise ValueError(f"AAB: `K` must be >= 2 (attention and non-attention weights), got {self.K}")
        if self.nf // self.reduction < 1:
            raise ValueError(f"AAB: `nf` // `reduction` must be >= 1, got nf={self.nf}, reduction={self.reduction}")
        if self.non_attention_kernel not in (1, 3):
            raise ValueError(
                f"AAB: `non_attention_kernel` must be 3 (A2N) or 1 (A2N-M), got {self.non_attention_kernel}"
            )
        kw = self.precision()
        residual = x
        x = _lrelu(Conv(self.nf, 1, use_bias=False, name="conv_first", **kw)(x))

        y = adaptive_avg_pool2d(x, 1).reshape(x.shape[0], self.nf)
        y = nn.relu(Linear(self.nf // self.reduction, use_bias=False, name="ADM_0", **kw)(y))
        y = Linear(self.K, use_bias=False, name="ADM_2", **kw)(y)
        ax = attention_dropout_weights(y, self.t)
        self.sow("intermediates", "attention_dropout", ax)

        attention = AttentionBranch(self.nf, name="attention", **kw)(x)
        k = self.non_attention_kernel
        non_attention = Conv(self.nf, k, padding=(k - 1) // 2, use_bias=False, name="non_attention", **kw)(x)
        x = _lrelu(mix_branches(attention, non_attention, ax))
        out = Conv(self.nf, 1, use_bias=False, name="conv_last", **kw)(x)
        return out + residual.astype(out.dtype)


class A2N(BlockFields):
    """Attention in attention network (A2N; ``AAN`` in the official code), arXiv 2104.09497.

    ``conv_first`` 3x3 -> ``nb`` AABs -> ``trunk_conv`` 3x3 (+ skip from ``conv_first``) ->
    reconstruction: nearest upsampling by ``scale`` (by 2 twice for scale 4), ``upconv`` 3x3, pixel
    attention, LeakyReLU, ``HRconv`` 3x3, LeakyReLU -> ``conv_last`` 3x3, plus the bilinear
    (``align_corners=False``) upsampling of the input as a global skip.

    The released models take RGB in ``[0, 255]`` (the EDSR code base's ``rgb_range=255``, no mean
    shift) and return the same range; round and clip to ``[0, 255]`` for an image.

    Attributes:
      in_nc, out_nc: image channels (3); they must be equal for the global skip.
      nf: trunk width (40).
      unf: reconstruction width (24).
      nb: number of AABs (16).
      scale: 2, 3 or 4.
      reduction, K, t: passed to every :class:`AAB`.
      non_attention_kernel: 3 (A2N) or 1 (A2N-M).

    Input ``(B, H, W, in_nc)``; output ``(B, scale * H, scale * W, out_nc)``. See the module
    docstring for the attention weights and maps sown into ``intermediates``.

    Example:
      >>> model = A2N(scale=2)
      >>> lr = jnp.zeros((1, 24, 24, 3))
      >>> variables = model.init(jax.random.PRNGKey(0), lr)
      >>> model.apply(variables, lr).shape
      (1, 48, 48, 3)
    """

    in_nc: int = 3
    out_nc: int = 3
    nf: int = 40
    unf: int = 24
    nb: int = 16
    scale: int = 4
    reduction: int = 4
    K: int = 2
    t: float = 30
    non_attention_kernel: int = 3

    torch_sequential: ClassVar[tuple[str, ...]] = ("AAB_trunk",)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        x = self.image_input(x, self.in_nc, layout=_IMAGE)
        if self.scale not in (2, 3, 4):
            raise ValueError(f"A2N: `scale` must be 2, 3 or 4, got {self.scale!r}")
        if self.in_nc != self.out_nc:
            raise ValueError(
                f"A2N: `in_nc`={self.in_nc} must equal `out_nc`={self.out_nc} (the bilinear global skip adds the input)"
            )
        kw = self.precision()

        def conv3(features, name):
            return Conv(features, 3, padding=1, name=name, **kw)

        fea = conv3(self.nf, "conv_first")(x)
        trunk = fea
        for i in range(self.nb):
            trunk = AAB(
                self.nf, self.reduction, self.K, self.t, self.non_attention_kernel, name=f"AAB_trunk_{i}", **kw
            )(trunk)
        fea = fea + conv3(self.nf, "trunk_conv")(trunk)

        # Scale 4 upsamples twice by 2, each stage with its own conv / PA / conv.
        stages = (self.scale,) if self.scale in (2, 3) else (2, 2)
        for j, factor in enumerate(stages, start=1):
            fea = interpolate(fea, scale_factor=factor, mode="nearest")
            fea = conv3(self.unf, f"upconv{j}")(fea)
            fea = _lrelu(PA(self.unf, name=f"att{j}", **kw)(fea))
            fea = _lrelu(conv3(self.unf, f"HRconv{j}")(fea))
        out = conv3(self.out_nc, "conv_last")(fea)
        ilr = interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return out + ilr.astype(out.dtype)
