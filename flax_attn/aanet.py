"""AANet adaptive aggregation (Xu & Zhang, CVPR 2020, arXiv 2004.09548; haofeixu/aanet).

Cost aggregation for stereo matching without 3-D convolutions, on multi-scale cost volumes whose
channels are the disparity candidates (``max_disp // 2**i`` at scale ``i``), NHWC here:

* intra-scale aggregation (ISA): :class:`DeformSimpleBottleneck`, a bottleneck whose 3x3 conv is a
  modulated deformable conv (:class:`AANetDeformConv2d`, ``nets/deform.py``'s ``DeformConv2d``:
  ``offset_conv`` with ``groups=deformable_groups``, zero-initialised, mask ``2 * sigmoid``);
  :class:`SimpleBottleneck` is the plain variant used in the first stages;
* cross-scale aggregation (CSA): :class:`AdaptiveAggregationModule` fuses every scale into every
  output scale (1x1 conv + BN + bilinear upsampling from coarser scales, strided 3x3 conv chains
  from finer ones), then LeakyReLU(0.2);
* :class:`AdaptiveAggregation`: the stack of modules plus the ``final_conv`` 1x1 convs.

State-dict keys follow ``nets/aggregation.py`` and ``nets/deform.py`` (``fusions.0.branches.1.0.conv2
.offset_conv.weight``, ``fuse_layers.2.0.1.0.weight``...). The deformable conv is
:func:`flax_attn.ops.deform_conv2d` (AANet's CUDA op follows the same offset layout and sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn import backbones
from flax_attn.deform import DeformConv2d
from flax_attn.layers import BatchNorm, BatchStatsFields, BlockFields, Conv, merge_train, torch_default_kernel_init
from flax_attn.ops.checks import check_channels, check_divisible, check_rank
from flax_attn.ops.dtypes import compute_dtype, statistics_dtype
from flax_attn.ops.resize import interpolate
from flax_attn.ops.stereo import correlation_cost_volume, disparity_regression, disparity_warp

__all__ = [
    "AANet",
    "AANetDeformConv2d",
    "AANetFeature",
    "AdaptiveAggregation",
    "AdaptiveAggregationModule",
    "BasicBlock",
    "Bottleneck",
    "CostVolumePyramid",
    "DeformBottleneck",
    "DeformSimpleBottleneck",
    "DisparityEstimation",
    "FeaturePyramidNetwork",
    "SimpleBottleneck",
    "StereoDRNetRefinement",
]


def _leaky(x):
    return nn.leaky_relu(x, 0.2)


class AANetDeformConv2d(BlockFields):
    """AANet's ``nets/deform.DeformConv2d``: a (modulated) deformable conv with its own offset conv.

    ``offset_conv`` (``groups=deformable_groups``, zero weight and bias) predicts
    ``deformable_groups * (3 if modulation else 2) * k * k`` channels: offsets first, then mask
    logits; the mask is ``sigmoid`` (times 2 with ``double_mask``, so it starts at 1). Padding is
    ``dilation``. Keys: ``deform_conv.weight`` (``deform_conv.bias`` with ``bias``),
    ``offset_conv.weight``, ``offset_conv.bias``.

    Attributes:
      in_channels, out_channels, kernel_size, stride, dilation, groups, deformable_groups,
      modulation, double_mask, bias: as in AANet (defaults 3, 1, 2, 1, 2, True, True, False).
      offset_kernel_init: ``offset_conv`` weight init (AANet: zeros, so it starts as a plain conv).

    Input ``(N, H, W, in_channels)``; output ``(N, Ho, Wo, out_channels)``.
    """

    in_channels: int
    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 2
    groups: int = 1
    deformable_groups: int = 2
    modulation: bool = True
    double_mask: bool = True
    bias: bool = False
    # AANet zero-initialises offset_conv; AANetFeature's kaiming loop later overwrites its weight.
    offset_kernel_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train = merge_train(self, train)
        where = "AANetDeformConv2d"
        x = self.image_input(x, self.in_channels, layout="(N, H, W, C)")
        check_divisible(where, "in_channels", self.in_channels, "deformable_groups", self.deformable_groups)
        ks = self.kernel_size
        k = 3 if self.modulation else 2
        # x.dtype is the compute dtype now; the float32 mask must not promote the deformable conv.
        kw = dict(dtype=x.dtype, param_dtype=self.param_dtype)
        out = Conv(
            self.deformable_groups * k * ks * ks,
            ks,
            stride=self.stride,
            padding=self.dilation,
            dilation=self.dilation,
            groups=self.deformable_groups,
            use_bias=True,
            kernel_init=self.offset_kernel_init,
            name="offset_conv",
            **kw,
        )(x)
        n_off = self.deformable_groups * 2 * ks * ks
        offset, mask = out[..., :n_off], None
        if self.modulation:
            mask = jax.nn.sigmoid(out[..., n_off:].astype(statistics_dtype(out.dtype)))
            if self.double_mask:
                mask = mask * 2
        return DeformConv2d(
            self.in_channels,
            self.out_channels,
            ks,
            stride=self.stride,
            padding=self.dilation,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            name="deform_conv",
            **kw,
        )(x, offset, mask)


class SimpleBottleneck(backbones.Bottleneck):
    """AANet's ``SimpleBottleneck`` (no channel expansion; plain 3x3 ``conv2``), used by the early stages.

    :class:`flax_attn.backbones.Bottleneck` with ``expansion=1`` and no downsample branch.

    Attributes:
      inplanes, planes, stride, groups, base_width, dilation: as in AANet; width is
        ``int(planes * base_width / 64) * groups``. Only ``inplanes == planes``, ``stride == 1``
        (AANet never gives it a downsample branch).

    Input/output ``(N, H, W, planes)``.
    """

    downsample: bool | None = False
    expansion: int = 1


class DeformSimpleBottleneck(SimpleBottleneck):
    """AANet's ``DeformSimpleBottleneck``: the intra-scale aggregation (ISA) block.

    As :class:`SimpleBottleneck` with ``conv2`` an :class:`AANetDeformConv2d` (modulated, dilation
    ``mdconv_dilation``, ``deformable_groups`` offset groups).

    Input/output ``(N, H, W, planes)``.

    Example:
      >>> blk = DeformSimpleBottleneck(8, 8)
      >>> x = jnp.ones((1, 9, 11, 8))
      >>> blk.apply(blk.init(jax.random.PRNGKey(0), x), x).shape
      (1, 9, 11, 8)
    """

    mdconv_dilation: int = 2
    deformable_groups: int = 2
    modulation: bool = True
    double_mask: bool = True

    @nn.nowrap
    def make_conv2(self, width: int) -> nn.Module:
        return AANetDeformConv2d(
            width,
            width,
            stride=self.stride,
            dilation=self.mdconv_dilation,
            deformable_groups=self.deformable_groups,
            modulation=self.modulation,
            double_mask=self.double_mask,
            name="conv2",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


def _volumes_in(module, cost_volume) -> tuple[list[jax.Array], dict]:
    """Check ``module``'s ``num_scales`` cost volumes; return them in the compute dtype
    (``ops.dtypes.compute_dtype`` over all of them) and the dtype keywords of its layers."""
    where, num_scales, max_disp = type(module).__name__, module.num_scales, module.max_disp
    if not isinstance(cost_volume, (list, tuple)) or len(cost_volume) != num_scales:
        n = len(cost_volume) if isinstance(cost_volume, (list, tuple)) else type(cost_volume).__name__
        raise ValueError(f"{where}: `cost_volume` must be a list of {num_scales} cost volumes, got {n}")
    for i, cv in enumerate(cost_volume):
        check_rank(where, f"cost_volume[{i}]", cv, 4, "(N, H, W, max_disp // 2**i)")
        check_channels(where, f"cost_volume[{i}]", cv, max_disp // (2**i))
    dtype = compute_dtype(where, module.dtype, **{f"cost_volume[{i}]": cv for i, cv in enumerate(cost_volume)})
    return [cv.astype(dtype) for cv in cost_volume], dict(dtype=dtype, param_dtype=module.param_dtype)


def _check_image_pair(where, left_img, right_img) -> None:
    check_rank(where, "left_img", left_img, 4, "(N, H, W, 3)")
    check_channels(where, "left_img", left_img, 3)
    if left_img.shape != right_img.shape:
        raise ValueError(
            f"{where}: `left_img` and `right_img` must have the same shape, got "
            f"{tuple(left_img.shape)} and {tuple(right_img.shape)}"
        )


class AdaptiveAggregationModule(BatchStatsFields):
    """One AANet stage (``AdaptiveAggregationModule``): ISA on every scale, then CSA across scales.

    Attributes:
      num_scales: cost-volume scales (channels ``max_disp // 2**i``).
      num_output_branches: fused outputs (``num_scales``, or 1 for the last stage without
        intermediate supervision).
      max_disp: disparity candidates at the finest scale.
      num_blocks: bottlenecks per scale; simple_bottleneck: plain instead of deformable ISA blocks.
      deformable_groups, mdconv_dilation: of the deformable ISA blocks.

    Call with a list of ``num_scales`` arrays ``(N, H_i, W_i, max_disp // 2**i)`` (finest first);
    returns a list of ``num_output_branches`` arrays (the inputs after ISA when ``num_scales == 1``).
    Coarser scales are upsampled with bilinear ``align_corners=False``; finer ones go through
    ``i - j`` stride-2 3x3 convs (BatchNorm, LeakyReLU(0.2) between them).

    Example:
      >>> m = AdaptiveAggregationModule(num_scales=2, num_output_branches=2, max_disp=8)
      >>> cv = [jnp.ones((1, 12, 16, 8)), jnp.ones((1, 6, 8, 4))]
      >>> [o.shape for o in m.apply(m.init(jax.random.PRNGKey(0), cv), cv)]
      [(1, 12, 16, 8), (1, 6, 8, 4)]
    """

    num_scales: int
    num_output_branches: int
    max_disp: int
    num_blocks: int = 1
    simple_bottleneck: bool = False
    deformable_groups: int = 2
    mdconv_dilation: int = 2

    torch_sequential: ClassVar[tuple[str, ...]] = ("branches", "fuse_layers")

    @nn.compact
    def __call__(self, cost_volume: Sequence[jax.Array], train: bool | None = None):
        train = merge_train(self, train)
        x, kw = _volumes_in(self, cost_volume)
        for i in range(self.num_scales):
            nc = self.max_disp // (2**i)
            for j in range(self.num_blocks):
                if self.simple_bottleneck:
                    blk = SimpleBottleneck(nc, nc, name=f"branches_{i}_{j}", **kw)
                else:
                    blk = DeformSimpleBottleneck(
                        nc,
                        nc,
                        mdconv_dilation=self.mdconv_dilation,
                        deformable_groups=self.deformable_groups,
                        name=f"branches_{i}_{j}",
                        **kw,
                    )
                x[i] = blk(x[i], train=train)
        if self.num_scales == 1:
            return x

        def fuse(i, j, h):
            ci, cj = self.max_disp // (2**i), self.max_disp // (2**j)
            if i == j:
                return h
            if i < j:
                h = Conv(ci, 1, use_bias=False, name=f"fuse_layers_{i}_{j}_0", **kw)(h)
                return BatchNorm(name=f"fuse_layers_{i}_{j}_1", **kw)(h, train=train)
            for k in range(i - j - 1):
                h = Conv(cj, 3, stride=2, padding=1, use_bias=False, name=f"fuse_layers_{i}_{j}_{k}_0", **kw)(h)
                h = _leaky(BatchNorm(name=f"fuse_layers_{i}_{j}_{k}_1", **kw)(h, train=train))
            k = i - j - 1
            h = Conv(ci, 3, stride=2, padding=1, use_bias=False, name=f"fuse_layers_{i}_{j}_{k}_0", **kw)(h)
            return BatchNorm(name=f"fuse_layers_{i}_{j}_{k}_1", **kw)(h, train=train)

        fused = []
        for i in range(self.num_output_branches):
            acc = fuse(i, 0, x[0])
            for j in range(1, self.num_scales):
                exchange = fuse(i, j, x[j])
                if exchange.shape[1:3] != acc.shape[1:3]:
                    exchange = interpolate(exchange, size=acc.shape[1:3], mode="bilinear", align_corners=False)
                acc = acc + exchange
            fused.append(_leaky(acc))
        return fused


class AdaptiveAggregation(BatchStatsFields):
    """AANet's stacked adaptive aggregation (``AdaptiveAggregation``, arXiv 2004.09548).

    Attributes:
      max_disp: disparity candidates at the finest scale (AANet: ``max_disp // 3``).
      num_scales, num_fusions, num_stage_blocks, num_deform_blocks, intermediate_supervision,
      deformable_groups, mdconv_dilation: as in AANet (defaults 3, 6, 1, 2, True, 2, 2); the
      last ``num_deform_blocks`` stages use deformable ISA blocks.

    Call with a list of ``num_scales`` cost volumes ``(N, H_i, W_i, max_disp // 2**i)`` (finest
    first; ``H_{i+1} = ceil(H_i / 2)`` as a stride-2 conv gives); returns a list of aggregated
    volumes, one per scale with ``intermediate_supervision``, else only the finest.

    Example:
      >>> agg = AdaptiveAggregation(max_disp=8, num_scales=2, num_fusions=2, num_deform_blocks=1)
      >>> cv = [jnp.ones((1, 12, 16, 8)), jnp.ones((1, 6, 8, 4))]
      >>> [o.shape for o in agg.apply(agg.init(jax.random.PRNGKey(0), cv), cv)]
      [(1, 12, 16, 8), (1, 6, 8, 4)]
    """

    max_disp: int
    num_scales: int = 3
    num_fusions: int = 6
    num_stage_blocks: int = 1
    num_deform_blocks: int = 2
    intermediate_supervision: bool = True
    deformable_groups: int = 2
    mdconv_dilation: int = 2

    torch_sequential: ClassVar[tuple[str, ...]] = ("fusions", "final_conv")

    @nn.compact
    def __call__(self, cost_volume: Sequence[jax.Array], train: bool | None = None):
        train = merge_train(self, train)
        cv, kw = _volumes_in(self, cost_volume)
        for i in range(self.num_fusions):
            if self.intermediate_supervision:
                n_out = self.num_scales
            else:
                n_out = 1 if i == self.num_fusions - 1 else self.num_scales
            cv = AdaptiveAggregationModule(
                num_scales=self.num_scales,
                num_output_branches=n_out,
                max_disp=self.max_disp,
                num_blocks=self.num_stage_blocks,
                simple_bottleneck=i < self.num_fusions - self.num_deform_blocks,
                deformable_groups=self.deformable_groups,
                mdconv_dilation=self.mdconv_dilation,
                name=f"fusions_{i}",
                **kw,
            )(cv, train=train)
        n_final = self.num_scales if self.intermediate_supervision else 1
        return [Conv(self.max_disp // (2**i), 1, name=f"final_conv_{i}", **kw)(cv[i]) for i in range(n_final)]


# --------------------------------------------------------------------------- network


class Bottleneck(backbones.Bottleneck):
    """ResNet bottleneck of AANet's feature extractor (``nets/resnet.py``), expansion 4.

    ``conv1`` (1x1) - ``bn1`` - relu - ``conv2`` (3x3, ``stride``) - ``bn2`` - relu - ``conv3`` (1x1,
    ``4 * planes``) - ``bn3``, plus the identity (``downsample``: 1x1 strided conv + BN, keys
    ``downsample.0``/``downsample.1``), relu: :class:`flax_attn.backbones.Bottleneck`.

    Attributes:
      inplanes, planes, stride, groups, base_width, dilation: as in torchvision/AANet.
      downsample: whether the block has the projection shortcut (a module in PyTorch).
      kernel_init: conv kernel init; zero_init_last: ``bn3`` starts at zero gamma.

    Input ``(N, H, W, inplanes)``; output ``(N, ceil(H / stride), ceil(W / stride), 4 * planes)``.
    """

    downsample: bool | None = False


class DeformBottleneck(Bottleneck):
    """AANet's ``DeformBottleneck``: :class:`Bottleneck` whose ``conv2`` is an :class:`AANetDeformConv2d`.

    The deformable conv keeps AANet's defaults whatever ``dilation`` says: dilation 2, two offset
    groups, modulated (``DeformConv2d(width, width, stride=stride)`` in ``nets/deform.py``).
    """

    @nn.nowrap
    def make_conv2(self, width: int) -> nn.Module:
        # offset_conv is zero-initialised unless an init loop over every conv (AANetFeature's
        # kaiming) re-initialises the block's convs, offset_conv included.
        custom = self.kernel_init is not torch_default_kernel_init
        offset_init = self.kernel_init if custom else nn.initializers.zeros
        kw = self.precision()
        return AANetDeformConv2d(width, width, stride=self.stride, offset_kernel_init=offset_init, name="conv2", **kw)


class AANetFeature(BatchStatsFields):
    """AANet's feature extractor (``nets/resnet.AANetFeature``): a ResNet-40 at 1/3, 1/6, 1/12 scale.

    ``conv1`` (7x7, stride 3, BN, ReLU), then ``layer1`` (3 bottlenecks), ``layer2`` (4, stride 2),
    ``layer3`` (6, stride 2, deformable with ``feature_mdconv``). Init as AANet: kaiming-normal
    (fan-out) convs (also the deformable blocks' ``offset_conv`` weights, which AANet's init loop
    reaches), unit BN, zero ``bn3`` gammas of the plain bottlenecks with ``zero_init_residual``.

    Attributes:
      in_channels: stem width (32); the levels have ``4, 8, 16 * in_channels`` channels.
      zero_init_residual, groups, width_per_group, feature_mdconv: as in AANet.

    Input ``(N, H, W, 3)``; output a list of three maps, ``ceil(H / 3)`` then halved twice (ceil).

    Example:
      >>> m = AANetFeature(in_channels=4)
      >>> x = jnp.ones((1, 24, 36, 3))
      >>> [f.shape for f in m.apply(m.init(jax.random.PRNGKey(0), x), x)]
      [(1, 8, 12, 16), (1, 4, 6, 32), (1, 2, 3, 64)]
    """

    in_channels: int = 32
    zero_init_residual: bool = True
    groups: int = 1
    width_per_group: int = 64
    feature_mdconv: bool = True

    torch_sequential: ClassVar[tuple[str, ...]] = ("conv1", "layer1", "layer2", "layer3")

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train = merge_train(self, train)
        x = self.image_input(x, 3, layout="(N, H, W, 3)")
        kw = dict(dtype=x.dtype, param_dtype=self.param_dtype)
        c = self.in_channels
        h = Conv(
            c, 7, stride=3, padding=3, use_bias=False, kernel_init=backbones.resnet_conv_init, name="conv1_0", **kw
        )(x)
        h = nn.relu(BatchNorm(name="conv1_1", **kw)(h, train=train))
        inplanes, outs = c, []
        for li, (planes, blocks, stride) in enumerate(((c, 3, 1), (2 * c, 4, 2), (4 * c, 6, 2)), start=1):
            block = DeformBottleneck if (li == 3 and self.feature_mdconv) else Bottleneck
            for b in range(blocks):
                h = block(
                    inplanes,
                    planes,
                    stride=stride if b == 0 else 1,
                    downsample=b == 0 and (stride != 1 or inplanes != 4 * planes),
                    groups=self.groups,
                    base_width=self.width_per_group,
                    kernel_init=backbones.resnet_conv_init,
                    # AANet zeroes bn3 of `Bottleneck`s only: its DeformBottleneck is another class.
                    zero_init_last=self.zero_init_residual and block is Bottleneck,
                    name=f"layer{li}_{b}",
                    **kw,
                )(h, train=train)
                inplanes = 4 * planes
            outs.append(h)
        return outs


class FeaturePyramidNetwork(BatchStatsFields):
    """AANet's ``FeaturePyramidNetwork`` (``nets/feature.py``; Lin et al., arXiv 1612.03144).

    ``lateral_convs.i`` (1x1 conv with bias) per level, a top-down pass adding the 2x nearest
    upsampling of each coarser lateral, then ``fpn_convs.i`` (3x3 conv with bias, BN, ReLU).
    Xavier-uniform conv weights, zero biases, as AANet.

    Attributes:
      in_channels: channels of the levels, finest first (AANet: ``[128, 256, 512]``).
      out_channels: output channels (128); num_levels: levels (3).

    Call with a list of ``num_levels`` maps ``(N, H_i, W_i, in_channels[i])`` with
    ``H_i = 2 * H_{i+1}`` and ``W_i = 2 * W_{i+1}``; returns ``num_levels`` maps with
    ``out_channels``.

    Example:
      >>> fpn = FeaturePyramidNetwork(in_channels=(8, 12, 16), out_channels=8)
      >>> xs = [jnp.ones((1, 12, 20, 8)), jnp.ones((1, 6, 10, 12)), jnp.ones((1, 3, 5, 16))]
      >>> [o.shape for o in fpn.apply(fpn.init(jax.random.PRNGKey(0), xs), xs)]
      [(1, 12, 20, 8), (1, 6, 10, 8), (1, 3, 5, 8)]
    """

    in_channels: Sequence[int]
    out_channels: int = 128
    num_levels: int = 3

    torch_sequential: ClassVar[tuple[str, ...]] = ("lateral_convs", "fpn_convs")

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array], train: bool | None = None):
        train = merge_train(self, train)
        where = "FeaturePyramidNetwork"
        n = len(self.in_channels)
        if not isinstance(inputs, (list, tuple)) or len(inputs) != n:
            got = len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__
            raise ValueError(f"{where}: `inputs` must be a list of {n} feature maps, got {got}")
        for i, f in enumerate(inputs):
            check_rank(where, f"inputs[{i}]", f, 4, "(N, H, W, C)")
            check_channels(where, f"inputs[{i}]", f, self.in_channels[i])
        for i in range(1, n):
            want = (2 * inputs[i].shape[1], 2 * inputs[i].shape[2])
            if tuple(inputs[i - 1].shape[1:3]) != want:
                raise ValueError(
                    f"{where}: level {i - 1} must be twice level {i} in size for the 2x top-down "
                    f"upsampling, expected spatial size {want}, got {tuple(inputs[i - 1].shape[1:3])}"
                )
        dtype = compute_dtype(where, self.dtype, **{f"inputs[{i}]": f for i, f in enumerate(inputs)})
        inputs = [f.astype(dtype) for f in inputs]
        kw = dict(dtype=dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform())
        laterals = [
            Conv(self.out_channels, 1, name=f"lateral_convs_{i}", **kw)(inputs[i]) for i in range(self.num_levels)
        ]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + interpolate(laterals[i], scale_factor=2, mode="nearest")
        outs = []
        for i in range(len(laterals)):
            h = Conv(self.out_channels, 3, padding=1, name=f"fpn_convs_{i}_0", **kw)(laterals[i])
            bn = BatchNorm(name=f"fpn_convs_{i}_1", dtype=dtype, param_dtype=self.param_dtype)
            outs.append(nn.relu(bn(h, train=train)))
        return outs


class CostVolumePyramid(BlockFields):
    """AANet's ``CostVolumePyramid``: a correlation cost volume per scale (no parameters).

    Attributes:
      max_disp: candidates at the finest scale; scale ``s`` gets ``max_disp // 2**s``.
      feature_similarity: only ``'correlation'`` (AANet's) is implemented.
      dtype: compute and output dtype (``None``: the features' floating result type).

    Call with two lists of feature maps ``(N, H_s, W_s, C_s)`` (finest first); returns a list of
    ``(N, H_s, W_s, max_disp // 2**s)`` volumes (:func:`flax_attn.ops.correlation_cost_volume`).

    Example:
      >>> m = CostVolumePyramid(max_disp=8)
      >>> left = [jnp.ones((1, 12, 16, 4)), jnp.ones((1, 6, 8, 4)), jnp.ones((1, 3, 4, 4))]
      >>> [c.shape for c in m.apply({}, left, left)]  # one volume per scale, max_disp // 2**i channels
      [(1, 12, 16, 8), (1, 6, 8, 4), (1, 3, 4, 2)]
    """

    max_disp: int
    feature_similarity: str = "correlation"

    @nn.compact
    def __call__(self, left_feature_pyramid, right_feature_pyramid, train: bool | None = None):
        train = merge_train(self, train)
        where = "CostVolumePyramid"
        if self.feature_similarity != "correlation":
            raise ValueError(
                f"{where}: only feature_similarity='correlation' is implemented, got {self.feature_similarity!r}"
            )
        if len(left_feature_pyramid) != len(right_feature_pyramid):
            raise ValueError(
                f"{where}: left and right pyramids must have the same number of levels, got "
                f"{len(left_feature_pyramid)} and {len(right_feature_pyramid)}"
            )
        features = {f"left_feature_pyramid[{i}]": f for i, f in enumerate(left_feature_pyramid)}
        features.update({f"right_feature_pyramid[{i}]": f for i, f in enumerate(right_feature_pyramid)})
        dtype = compute_dtype(where, self.dtype, **features)
        return [
            correlation_cost_volume(left.astype(dtype), right.astype(dtype), self.max_disp // (2**s)).astype(dtype)
            for s, (left, right) in enumerate(zip(left_feature_pyramid, right_feature_pyramid))
        ]


class DisparityEstimation(BlockFields):
    """AANet's ``DisparityEstimation``: soft-argmin over the candidates (no parameters).

    Attributes:
      max_disp: candidates at the finest scale (kept for the official signature: the candidates
        are always ``0 .. D - 1`` of the volume given, as in AANet).
      match_similarity: the volume is a similarity (correlation: True) rather than a cost.
      dtype: output dtype (``None``: the volume's floating dtype); the softmax runs in float32.

    Input ``(N, H, W, D)``, ``D <= max_disp``; output ``(N, H, W)`` disparities in ``[0, D - 1]``
    (:func:`flax_attn.ops.disparity_regression`).

    Example:
      >>> m = DisparityEstimation(max_disp=8)
      >>> m.apply({}, jnp.zeros((1, 9, 11, 8)))[0, 0, :3]  # uniform costs: the mean disparity
      Array([3.5, 3.5, 3.5], dtype=float32)
    """

    max_disp: int
    match_similarity: bool = True

    @nn.compact
    def __call__(self, cost_volume, train: bool | None = None):
        train = merge_train(self, train)
        dtype = compute_dtype("DisparityEstimation", self.dtype, cost_volume=cost_volume)
        check_rank("DisparityEstimation", "cost_volume", cost_volume, 4, "(N, H, W, D)")
        if cost_volume.shape[-1] > self.max_disp:
            raise ValueError(
                f"DisparityEstimation: `cost_volume` has {cost_volume.shape[-1]} candidates, more than "
                f"max_disp={self.max_disp} (shape {tuple(cost_volume.shape)})"
            )
        return disparity_regression(cost_volume, match_similarity=self.match_similarity).astype(dtype)


class BasicBlock(backbones.BasicBlock):
    """AANet's ``nets/feature.BasicBlock`` (StereoNet's residual block, LeakyReLU(0.2) by default).

    :class:`flax_attn.backbones.BasicBlock` with no downsample branch and LeakyReLU.

    Attributes:
      inplanes, planes, stride, dilation, leaky_relu: as in AANet (only ``stride=1``,
        ``inplanes == planes``: AANet never gives it a downsample branch).

    Input/output ``(N, H, W, planes)``.
    """

    downsample: bool | None = False
    leaky_relu: bool = True

    @nn.nowrap
    def activation(self):
        return _leaky if self.leaky_relu else nn.relu


class StereoDRNetRefinement(BatchStatsFields):
    """AANet's ``StereoDRNetRefinement`` (after StereoDRNet, arXiv 1904.02251): a residual on the disparity.

    The disparity is upsampled (bilinear, ``align_corners=False``) to the image size and scaled by
    the width ratio; the right image warped by it (:func:`flax_attn.ops.disparity_warp`) gives the
    photometric error; ``conv1`` (error and left image, 6 -> 16) and ``conv2`` (disparity, 1 -> 16)
    (3x3 conv, BN, LeakyReLU(0.2) each) are concatenated, go through six ``dilated_blocks``
    (dilations 1, 2, 4, 8, 1, 1) and ``final_conv`` (3x3 -> 1, bias); the output is
    ``relu(disp + residual)``.

    Call with ``low_disp`` ``(N, h, w)`` (non-negative) and ``left_img``, ``right_img``
    ``(N, H, W, 3)``; returns ``(N, H, W)``.

    Example:
      >>> m = StereoDRNetRefinement()
      >>> d, img = jnp.ones((1, 4, 6)), jnp.ones((1, 8, 12, 3))
      >>> m.apply(m.init(jax.random.PRNGKey(0), d, img, img), d, img, img).shape
      (1, 8, 12)
    """

    dilation_list = (1, 2, 4, 8, 1, 1)

    torch_sequential: ClassVar[tuple[str, ...]] = ("conv1", "conv2", "dilated_blocks")

    @nn.compact
    def __call__(self, low_disp, left_img, right_img, train: bool | None = None):
        train = merge_train(self, train)
        where = "StereoDRNetRefinement"
        check_rank(where, "low_disp", low_disp, 3, "(N, H, W)")
        _check_image_pair(where, left_img, right_img)
        if low_disp.shape[0] != left_img.shape[0]:
            raise ValueError(
                f"{where}: batch of `low_disp` {tuple(low_disp.shape)} does not match "
                f"`left_img` {tuple(left_img.shape)}"
            )
        dtype = compute_dtype(where, self.dtype, low_disp=low_disp, left_img=left_img, right_img=right_img)
        low_disp, left_img, right_img = low_disp.astype(dtype), left_img.astype(dtype), right_img.astype(dtype)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        disp = low_disp[..., None]
        h, w = left_img.shape[1:3]
        # AANet scales by the width ratio only (disparity is horizontal).
        scale = w / low_disp.shape[-1]
        if scale != 1.0:
            disp = interpolate(disp, size=(h, w), mode="bilinear", align_corners=False) * scale
        warped = disparity_warp(right_img, disp[..., 0])
        concat1 = jnp.concatenate([warped - left_img, left_img], axis=-1)

        def conv_bn_leaky(x, name):
            x = Conv(16, 3, padding=1, use_bias=False, name=f"{name}_0", **kw)(x)
            return _leaky(BatchNorm(name=f"{name}_1", **kw)(x, train=train))

        out = jnp.concatenate([conv_bn_leaky(concat1, "conv1"), conv_bn_leaky(disp, "conv2")], axis=-1)
        for i, d in enumerate(self.dilation_list):
            out = BasicBlock(32, 32, dilation=d, name=f"dilated_blocks_{i}", **kw)(out, train=train)
        residual = Conv(1, 3, padding=1, name="final_conv", **kw)(out)
        return nn.relu(disp + residual)[..., 0]


class AANet(BatchStatsFields):
    """AANet (Xu & Zhang, CVPR 2020, arXiv 2004.09548; ``nets/aanet.py``), NHWC.

    Features at 1/3, 1/6, 1/12 (:class:`AANetFeature`, optionally :class:`FeaturePyramidNetwork`),
    correlation cost volumes with ``max_disp // 3 // 2**s`` candidates (:class:`CostVolumePyramid`),
    adaptive aggregation (:class:`AdaptiveAggregation`), soft-argmin (:class:`DisparityEstimation`)
    and ``num_downsample`` :class:`StereoDRNetRefinement` stages (at 1/2, then full resolution).
    The released AANet models use ``feature_pyramid_network=True`` (and
    ``no_intermediate_supervision=True`` for prediction); the constructor defaults are the
    official class's.

    Attributes:
      max_disp: maximum disparity at full resolution (192); must be a multiple of
        ``3 * 2**(num_scales - 1)`` (and of ``deformable_groups`` times that with deformable
        aggregation) so every scale has whole candidates (AANet floors silently).
      num_downsample, no_feature_mdconv, feature_pyramid_network, num_scales (1 or 3),
      num_fusions, deformable_groups, mdconv_dilation, no_intermediate_supervision,
      num_stage_blocks, num_deform_blocks: as in AANet.
      feature_type ('aanet'), feature_pyramid (False), feature_similarity ('correlation'),
      aggregation_type ('adaptive'), refinement_type ('stereodrnet' or None): the only
      implemented choices.

    Call with ``left_img`` and ``right_img`` ``(N, H, W, 3)`` (ImageNet-normalised), ``H`` and ``W``
    multiples of 12 (AANet's predict.py pads to multiples of 48). Returns the disparity pyramid as
    AANet: the soft-argmin disparities, coarsest first (``(N, H/12, W/12)``, ``(N, H/6, W/6)``,
    ``(N, H/3, W/3)``, or only the last without intermediate supervision), each in its own scale's
    pixels, then the refined ``(N, H/2, W/2)`` and ``(N, H, W)``; the prediction is the last entry.

    Example:
      >>> net = AANet(max_disp=48, num_fusions=2, num_deform_blocks=1, feature_pyramid_network=True)
      >>> img = jnp.zeros((1, 24, 36, 3))
      >>> out = net.apply(net.init(jax.random.PRNGKey(0), img, img), img, img)
      >>> [o.shape for o in out]
      [(1, 2, 3), (1, 4, 6), (1, 8, 12), (1, 12, 18), (1, 24, 36)]
    """

    max_disp: int = 192
    num_downsample: int = 2
    feature_type: str = "aanet"
    no_feature_mdconv: bool = False
    feature_pyramid: bool = False
    feature_pyramid_network: bool = False
    feature_similarity: str = "correlation"
    aggregation_type: str = "adaptive"
    num_scales: int = 3
    num_fusions: int = 6
    deformable_groups: int = 2
    mdconv_dilation: int = 2
    refinement_type: str | None = "stereodrnet"
    no_intermediate_supervision: bool = False
    num_stage_blocks: int = 1
    num_deform_blocks: int = 3

    torch_sequential: ClassVar[tuple[str, ...]] = ("refinement",)

    @nn.nowrap
    def _check_config(self):
        where = "AANet"
        for name, value, allowed in (
            ("feature_type", self.feature_type, ("aanet",)),
            ("feature_pyramid", self.feature_pyramid, (False,)),
            ("feature_similarity", self.feature_similarity, ("correlation",)),
            ("aggregation_type", self.aggregation_type, ("adaptive",)),
            ("refinement_type", self.refinement_type, ("stereodrnet", None, "None")),
            ("num_scales", self.num_scales, (1, 3)),
        ):
            if value not in allowed:
                raise ValueError(f"{where}: only {name} in {allowed} is implemented, got {value!r}")
        unit = 3 * 2 ** (self.num_scales - 1)
        if self.num_deform_blocks > 0:
            unit *= self.deformable_groups
        if self.max_disp % unit != 0:
            raise ValueError(
                f"AANet: `max_disp`={self.max_disp} must be divisible by {unit} (feature stride 3 x "
                f"{2 ** (self.num_scales - 1)} for the coarsest of {self.num_scales} scales"
                + (f" x deformable_groups={self.deformable_groups})" if self.num_deform_blocks > 0 else ")")
            )

    @nn.compact
    def __call__(self, left_img, right_img, train: bool | None = None):
        train = merge_train(self, train)
        where = "AANet"
        self._check_config()
        dtype = compute_dtype(where, self.dtype, left_img=left_img, right_img=right_img)
        left_img, right_img = left_img.astype(dtype), right_img.astype(dtype)
        _check_image_pair(where, left_img, right_img)
        h, w = left_img.shape[1:3]
        if h % 12 or w % 12:
            raise ValueError(
                f"{where}: image height and width must be multiples of 12 (stride-3 stem, two stride-2 "
                f"stages; pad as AANet's predict.py does), got {h}x{w} in shape {tuple(left_img.shape)}"
            )
        kw = self.precision()
        max_disp = self.max_disp // 3
        feature = AANetFeature(feature_mdconv=not self.no_feature_mdconv, name="feature_extractor", **kw)
        fpn = None
        if self.feature_pyramid_network:
            fpn = FeaturePyramidNetwork(in_channels=(32 * 4, 32 * 8, 32 * 16), out_channels=32 * 4, name="fpn", **kw)

        def extract(img):
            f = feature(img, train=train)
            return fpn(f, train=train) if fpn is not None else f

        left_feature, right_feature = extract(left_img), extract(right_img)
        cost_volume = CostVolumePyramid(max_disp, self.feature_similarity, name="cost_volume")(
            left_feature, right_feature
        )
        if self.num_scales == 1:
            cost_volume = [cost_volume[0]]
        aggregation = AdaptiveAggregation(
            max_disp=max_disp,
            num_scales=self.num_scales,
            num_fusions=self.num_fusions,
            num_stage_blocks=self.num_stage_blocks,
            num_deform_blocks=self.num_deform_blocks,
            mdconv_dilation=self.mdconv_dilation,
            deformable_groups=self.deformable_groups,
            intermediate_supervision=not self.no_intermediate_supervision,
            name="aggregation",
            **kw,
        )(cost_volume, train=train)
        estimate = DisparityEstimation(max_disp, match_similarity=True, name="disparity_estimation")
        pyramid = [estimate(a) for a in reversed(aggregation)]
        if self.refinement_type in (None, "None"):
            return pyramid
        disparity = pyramid[-1]
        for i in range(self.num_downsample):
            factor = 2 ** (self.num_downsample - i - 1)
            if factor == 1:
                cur_left, cur_right = left_img, right_img
            else:
                size = (h // factor, w // factor)
                cur_left = interpolate(left_img, size=size, mode="bilinear", align_corners=False)
                cur_right = interpolate(right_img, size=size, mode="bilinear", align_corners=False)
            disparity = StereoDRNetRefinement(name=f"refinement_{i}", **kw)(disparity, cur_left, cur_right, train=train)
            pyramid.append(disparity)
        return pyramid
