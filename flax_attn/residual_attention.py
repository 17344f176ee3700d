"""Residual Attention Network (Wang et al., CVPR 2017, arXiv 1704.06904).

Follows tengshaofeng/ResidualAttentionNetwork-pytorch: ``model/basic_layers.py``
(``ResidualBlock``), ``model/attention_module.py`` (``AttentionModule_stage1/2/3``) and
``model/residual_attention_network.py`` (``ResidualAttentionModel_56``/``_92``, 224x224 input), on
NHWC images, with the reference's attribute names and ``nn.Sequential`` indices as keys.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn.layers import BatchNorm, BatchStatsFields, Conv, Linear, merge_train
from flax_attn.ops.checks import check_channels, check_rank
from flax_attn.ops.dtypes import compute_dtype
from flax_attn.ops.max_pool import max_pool
from flax_attn.ops.resize import interpolate

__all__ = [
    "AttentionModule_stage1",
    "AttentionModule_stage2",
    "AttentionModule_stage3",
    "ResidualAttentionModel_56",
    "ResidualAttentionModel_92",
    "ResidualBlock",
]


class ResidualBlock(BatchStatsFields):
    """Pre-activation bottleneck (BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1) of the reference.

    The shortcut is ``conv4`` (1x1, ``stride``) applied to the first activation when channels or
    stride change, else the identity. Like the reference, ``conv4`` always has a weight (it is in
    every state dict) even when unused.

    Attributes:
      input_channels, output_channels: channels in and out (``output_channels`` divisible by 4).
      stride: of the 3x3 conv and the shortcut.

    Call: ``(x (B, H, W, input_channels), train=None)`` -> ``(B, Ho, Wo, output_channels)``.

    Example:
      >>> blk = ResidualBlock(input_channels=8, output_channels=16, stride=2)
      >>> x = jnp.ones((2, 9, 11, 8))
      >>> blk.apply(blk.init(jax.random.PRNGKey(0), x), x).shape
      (2, 5, 6, 16)
    """

    input_channels: int
    output_channels: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "ResidualBlock"
        if self.output_channels % 4 or self.output_channels <= 0:
            raise ValueError(f"{where}: `output_channels`={self.output_channels} must be a positive multiple of 4")
        x = self.image_input(x, self.input_channels)
        kw = self.precision()
        mid = self.output_channels // 4
        out1 = nn.relu(BatchNorm(name="bn1", **kw)(x, train=train))
        out = Conv(mid, 1, use_bias=False, name="conv1", **kw)(out1)
        out = nn.relu(BatchNorm(name="bn2", **kw)(out, train=train))
        out = Conv(mid, 3, stride=self.stride, padding=1, use_bias=False, name="conv2", **kw)(out)
        out = nn.relu(BatchNorm(name="bn3", **kw)(out, train=train))
        out = Conv(self.output_channels, 1, use_bias=False, name="conv3", **kw)(out)
        project = self.input_channels != self.output_channels or self.stride != 1
        if project or self.is_initializing():
            shortcut = Conv(self.output_channels, 1, stride=self.stride, use_bias=False, name="conv4", **kw)(out1)
        residual = shortcut if project else x
        return out + residual.astype(out.dtype)


def _pool(x):
    return max_pool(x, 3, 2, 1)


class _AttentionModuleBase(BatchStatsFields):
    """Shared plumbing of the three stages: blocks named like the reference, and checked upsampling."""

    in_channels: int
    out_channels: int

    levels: ClassVar[int]  # of the soft mask branch; each subclass's fields size1..size{levels}

    torch_sequential: ClassVar[tuple[str, ...]] = (r"trunk_branches|softmax\d_blocks",)

    def _rb(self, name):
        return ResidualBlock(
            self.in_channels, self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )

    def _mask_head(self, name, x, train):
        """``BN-ReLU-conv1x1-BN-ReLU-conv1x1-sigmoid`` (Sequential indices 0, 2, 3, 5)."""
        kw = self.precision()
        c = self.out_channels
        x = nn.relu(BatchNorm(name=f"{name}_0", **kw)(x, train=train))
        x = Conv(c, 1, use_bias=False, name=f"{name}_2", **kw)(x)
        x = nn.relu(BatchNorm(name=f"{name}_3", **kw)(x, train=train))
        x = Conv(c, 1, use_bias=False, name=f"{name}_5", **kw)(x)
        return jax.nn.sigmoid(x)

    def _up(self, x, size, arg, like):
        # UpsamplingBilinear2d is bilinear with align_corners=True, to a fixed size.
        size = tuple(int(s) for s in size)
        if size != tuple(like.shape[1:3]):
            raise ValueError(
                f"{type(self).__name__}: `{arg}`={size} must equal the spatial size "
                f"{tuple(like.shape[1:3])} of the "
                f"branch it is added to; set size1/size2/size3 for this input size"
            )
        return interpolate(x, size=size, mode="bilinear", align_corners=True)

    def _check(self, x):
        where = type(self).__name__
        compute_dtype(where, self.dtype, x=x)
        if self.in_channels != self.out_channels:
            raise ValueError(
                f"{where}: `in_channels`={self.in_channels} must equal `out_channels`={self.out_channels} "
                "(the trunk and mask branches are added)"
            )
        check_rank(where, "x", x, 4, "(batch, height, width, channels)")
        check_channels(where, "x", x, self.in_channels)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        """The reference's ``forward`` for ``levels`` mask levels (stage 1: 3, stage 2: 2, stage 3: 1).

        Going down, level ``i < levels`` pools and applies ``softmax{i}_blocks`` and its skip block
        ``skip{i}_connection_residual_block``; the innermost level pools and applies two blocks
        (``softmax{levels}_blocks.0``/``.1``). Going up, each level upsamples to ``size{i + 1}``, adds
        that level's output and skip, and applies the next ``softmax{n}_blocks``; the last upsampling
        (to ``size1``) is added to the trunk and turned into the mask by the next ``softmax{n}_blocks``.
        """
        train = merge_train(self, train)
        self._check(x)
        rb = lambda name, t: self._rb(name)(t, train=train)  # noqa: E731
        x = rb("first_residual_blocks", x)
        out_trunk = rb("trunk_branches_1", rb("trunk_branches_0", x))
        down, out = [], x
        for i in range(1, self.levels):
            out = rb(f"softmax{i}_blocks", _pool(out))
            down.append((out, rb(f"skip{i}_connection_residual_block", out)))
        n = self.levels
        out = rb(f"softmax{n}_blocks_1", rb(f"softmax{n}_blocks_0", _pool(out)))
        for i, (level, skip) in reversed(list(enumerate(down, start=2))):
            n += 1
            out = rb(f"softmax{n}_blocks", self._up(out, getattr(self, f"size{i}"), f"size{i}", level) + level + skip)
        out_interp1 = self._up(out, self.size1, "size1", out_trunk) + out_trunk
        mask = self._mask_head(f"softmax{n + 1}_blocks", out_interp1, train)
        return rb("last_blocks", (1 + mask) * out_trunk)


class AttentionModule_stage1(_AttentionModuleBase):  # noqa: N801  (the reference's name)
    """Attention module with a three-level soft mask branch (reference: 56x56 input).

    Wang et al., "Residual Attention Network for Image Classification", CVPR 2017 (arXiv 1704.06904).
    Trunk ``T`` = two residual blocks; mask ``M`` = three max-pool (3x3, stride 2, pad 1) downsamplings
    with residual blocks and skip connections, bilinear (align_corners) upsamplings to ``size3``,
    ``size2``, ``size1`` with the reference's additive skips, then BN-ReLU-conv-BN-ReLU-conv-sigmoid;
    output ``last_blocks((1 + M) * T)``.

    Attributes:
      in_channels, out_channels: equal (the branches are added).
      size1, size2, size3: the upsampling targets: the input size and its successive pooled sizes
        (``(n + 1) // 2`` per pooling, e.g. 56, 28, 14; 13x17 -> (13, 17), (7, 9), (4, 5)).

    Call: ``(x (B, H, W, C), train=None)`` -> ``(B, H, W, C)``.

    Example:
      >>> m = AttentionModule_stage1(16, 16, size1=(13, 17), size2=(7, 9), size3=(4, 5))
      >>> x = jnp.ones((1, 13, 17, 16))
      >>> m.apply(m.init(jax.random.PRNGKey(0), x), x).shape
      (1, 13, 17, 16)
    """

    size1: tuple[int, int] = (56, 56)
    size2: tuple[int, int] = (28, 28)
    size3: tuple[int, int] = (14, 14)

    levels: ClassVar[int] = 3


class AttentionModule_stage2(_AttentionModuleBase):  # noqa: N801  (the reference's name)
    """Attention module with a two-level soft mask branch (reference: 28x28 input); see stage 1.

    Attributes:
      size1, size2: the input size and its pooled size (e.g. 28, 14).

    Example:
      >>> m = AttentionModule_stage2(8, 8, size1=(13, 17), size2=(7, 9))
      >>> x = jnp.ones((1, 13, 17, 8))
      >>> m.apply(m.init(jax.random.PRNGKey(0), x), x).shape
      (1, 13, 17, 8)
    """

    size1: tuple[int, int] = (28, 28)
    size2: tuple[int, int] = (14, 14)

    levels: ClassVar[int] = 2


class AttentionModule_stage3(_AttentionModuleBase):  # noqa: N801  (the reference's name)
    """Attention module with a one-level soft mask branch (reference: 14x14 input); see stage 1.

    Attributes:
      size1: the input size (e.g. 14).

    Example:
      >>> m = AttentionModule_stage3(8, 8, size1=(13, 17))
      >>> x = jnp.ones((1, 13, 17, 8))
      >>> m.apply(m.init(jax.random.PRNGKey(0), x), x).shape
      (1, 13, 17, 8)
    """

    size1: tuple[int, int] = (14, 14)

    levels: ClassVar[int] = 1


class _ResidualAttentionModel(BatchStatsFields):
    depth: int = 56
    num_classes: int = 10

    torch_sequential: ClassVar[tuple[str, ...]] = ("conv1|mpool2",)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = type(self).__name__
        check_rank(where, "x", x, 4, "(batch, height, width, channels)")
        if x.shape[1:] != (224, 224, 3):
            raise ValueError(
                f"{where}: `x` must be (batch, 224, 224, 3): the reference fixes the mask upsampling sizes "
                f"and a 7x7 average pool for 224x224 inputs; got shape {x.shape}"
            )
        kw = self.precision()

        def rb(name, cin, cout, stride=1):
            return lambda t: ResidualBlock(cin, cout, stride, name=name, **kw)(t, train=train)

        out = Conv(64, 7, stride=2, padding=3, use_bias=False, name="conv1_0", **kw)(x)
        out = _pool(nn.relu(BatchNorm(name="conv1_1", **kw)(out, train=train)))
        out = rb("residual_block1", 64, 256)(out)
        out = AttentionModule_stage1(256, 256, name="attention_module1", **kw)(out, train=train)
        out = rb("residual_block2", 256, 512, 2)(out)
        out = AttentionModule_stage2(512, 512, name="attention_module2", **kw)(out, train=train)
        if self.depth == 92:
            out = AttentionModule_stage2(512, 512, name="attention_module2_2", **kw)(out, train=train)
        out = rb("residual_block3", 512, 1024, 2)(out)
        out = AttentionModule_stage3(1024, 1024, name="attention_module3", **kw)(out, train=train)
        if self.depth == 92:
            out = AttentionModule_stage3(1024, 1024, name="attention_module3_2", **kw)(out, train=train)
            out = AttentionModule_stage3(1024, 1024, name="attention_module3_3", **kw)(out, train=train)
        out = rb("residual_block4", 1024, 2048, 2)(out)
        out = rb("residual_block5", 2048, 2048)(out)
        out = rb("residual_block6", 2048, 2048)(out)
        out = nn.relu(BatchNorm(name="mpool2_0", **kw)(out, train=train))
        out = jnp.mean(out, axis=(1, 2))  # AvgPool2d(7, stride=1) on the final 7x7 map
        return Linear(self.num_classes, name="fc", **kw)(out)


class ResidualAttentionModel_56(_ResidualAttentionModel):  # noqa: N801  (the reference's name)
    """Attention-56 for 224x224 images (reference ``ResidualAttentionModel_56``).

    Wang et al., CVPR 2017 (arXiv 1704.06904). conv7x7/2 + max-pool, then residual blocks and one
    attention module per stage (stage1 at 56x56, stage2 at 28x28, stage3 at 14x14), three residual
    blocks at 7x7, BN-ReLU-avgpool and ``fc``. ``num_classes`` defaults to the reference's 10.

    Call: ``(x (B, 224, 224, 3), train=None)`` -> logits ``(B, num_classes)``.

    Example:
      >>> model = ResidualAttentionModel_56()
      >>> shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 224, 224, 3)))
    """

    depth: int = 56


class ResidualAttentionModel_92(_ResidualAttentionModel):  # noqa: N801  (the reference's name)
    """Attention-92 for 224x224 images (reference ``ResidualAttentionModel_92``): as Attention-56 with
    ``attention_module2_2``, ``attention_module3_2`` and ``attention_module3_3`` added.

    Example:
      >>> model = ResidualAttentionModel_92()
      >>> shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 224, 224, 3)))
      >>> shapes['params']['fc']['kernel'].shape
      (2048, 10)
    """

    depth: int = 92
