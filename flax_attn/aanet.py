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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_attn import catalogue
from flax_attn.convert.engine import Rename
from flax_attn.deform import DeformConv2d
from flax_attn.layers import BatchNorm, Conv
from flax_attn.ops._checks import check_channels, check_divisible, check_rank
from flax_attn.ops.resize import interpolate

__all__ = [
    "AANetDeformConv2d",
    "AdaptiveAggregation",
    "AdaptiveAggregationModule",
    "DeformSimpleBottleneck",
    "SimpleBottleneck",
]

Dtype = Any


def _leaky(x):
    return nn.leaky_relu(x, 0.2)


def _seq_rules(*names):
    """``name_3_1.x`` -> ``name.3.1.x`` for PyTorch ``ModuleList``/``Sequential`` children."""
    rules = []
    for n in names:
        for depth in (4, 3, 2, 1):
            idx = "_".join([r"(\d+)"] * depth)
            rep = ".".join(f"\\{i + 1}" for i in range(depth))
            rules.append(Rename(rf"{n}_{idx}\.(.*)", rf"{n}.{rep}.\{depth + 1}"))
    return rules


class AANetDeformConv2d(nn.Module):
    """AANet's ``nets/deform.DeformConv2d``: a (modulated) deformable conv with its own offset conv.

    ``offset_conv`` (``groups=deformable_groups``, zero weight and bias) predicts
    ``deformable_groups * (3 if modulation else 2) * k * k`` channels: offsets first, then mask
    logits; the mask is ``sigmoid`` (times 2 with ``double_mask``, so it starts at 1). Padding is
    ``dilation``. Keys: ``deform_conv.weight`` (``deform_conv.bias`` with ``bias``),
    ``offset_conv.weight``, ``offset_conv.bias``.

    Attributes:
      in_channels, out_channels, kernel_size, stride, dilation, groups, deformable_groups,
      modulation, double_mask, bias: as in AANet (defaults 3, 1, 2, 1, 2, True, True, False).

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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        where = "AANetDeformConv2d"
        check_rank(where, "x", x, 4, "(N, H, W, C)")
        check_channels(where, "x", x, self.in_channels)
        check_divisible(where, "in_channels", self.in_channels, "deformable_groups", self.deformable_groups)
        ks = self.kernel_size
        k = 3 if self.modulation else 2
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = Conv(
            self.deformable_groups * k * ks * ks,
            ks,
            stride=self.stride,
            padding=self.dilation,
            dilation=self.dilation,
            groups=self.deformable_groups,
            use_bias=True,
            kernel_init=nn.initializers.zeros,
            name="offset_conv",
            **kw,
        )(x)
        n_off = self.deformable_groups * 2 * ks * ks
        offset, mask = out[..., :n_off], None
        if self.modulation:
            mask = jax.nn.sigmoid(out[..., n_off:].astype(jnp.float32))
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


class _Bottleneck(nn.Module):
    """conv1 (1x1) - bn1 - relu - conv2 - bn2 - relu - conv3 (1x1) - bn3, + identity, relu."""

    def _run(self, where, x, conv2, width, train):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_rank(where, "x", x, 4, "(N, H, W, C)")
        check_channels(where, "x", x, self.inplanes)
        if self.inplanes != self.planes or self.stride != 1:
            # AANet builds these blocks without a downsample branch: the residual needs equal shapes.
            raise ValueError(
                f"{where}: needs inplanes == planes and stride 1 (no downsample), got "
                f"inplanes={self.inplanes}, planes={self.planes}, stride={self.stride}"
            )
        out = Conv(width, 1, use_bias=False, name="conv1", **kw)(x)
        out = nn.relu(BatchNorm(name="bn1", **kw)(out, train=train))
        out = conv2(out)
        out = nn.relu(BatchNorm(name="bn2", **kw)(out, train=train))
        out = Conv(self.planes, 1, use_bias=False, name="conv3", **kw)(out)
        out = BatchNorm(name="bn3", **kw)(out, train=train)
        return nn.relu(out + x)


class SimpleBottleneck(_Bottleneck):
    """AANet's ``SimpleBottleneck`` (no channel expansion; plain 3x3 ``conv2``), used by the early stages.

    Attributes:
      inplanes, planes, stride, groups, base_width, dilation: as in AANet; width is
        ``int(planes * base_width / 64) * groups``. Only ``inplanes == planes``, ``stride == 1``
        (AANet never gives it a downsample branch).

    Input/output ``(N, H, W, planes)``.
    """

    inplanes: int
    planes: int
    stride: int = 1
    groups: int = 1
    base_width: int = 64
    dilation: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        conv2 = Conv(
            width,
            3,
            stride=self.stride,
            padding=self.dilation,
            dilation=self.dilation,
            groups=self.groups,
            use_bias=False,
            name="conv2",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        return self._run("SimpleBottleneck", x, conv2, width, train)


class DeformSimpleBottleneck(_Bottleneck):
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

    inplanes: int
    planes: int
    stride: int = 1
    groups: int = 1
    base_width: int = 64
    mdconv_dilation: int = 2
    deformable_groups: int = 2
    modulation: bool = True
    double_mask: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        conv2 = AANetDeformConv2d(
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
        return self._run("DeformSimpleBottleneck", x, lambda h: conv2(h, train=train), width, train)


def _check_volumes(where, cost_volume, num_scales, max_disp):
    if not isinstance(cost_volume, (list, tuple)) or len(cost_volume) != num_scales:
        n = len(cost_volume) if isinstance(cost_volume, (list, tuple)) else type(cost_volume).__name__
        raise ValueError(f"{where}: `cost_volume` must be a list of {num_scales} cost volumes, got {n}")
    for i, cv in enumerate(cost_volume):
        check_rank(where, f"cost_volume[{i}]", cv, 4, "(N, H, W, max_disp // 2**i)")
        check_channels(where, f"cost_volume[{i}]", cv, max_disp // (2**i))


class AdaptiveAggregationModule(nn.Module):
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
    """

    num_scales: int
    num_output_branches: int
    max_disp: int
    num_blocks: int = 1
    simple_bottleneck: bool = False
    deformable_groups: int = 2
    mdconv_dilation: int = 2
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.nowrap
    def torch_rules(self, layout):
        return _seq_rules("branches", "fuse_layers")

    @nn.compact
    def __call__(self, cost_volume: Sequence[jax.Array], *, train: bool = False):
        where = "AdaptiveAggregationModule"
        _check_volumes(where, cost_volume, self.num_scales, self.max_disp)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = list(cost_volume)
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
                h = Conv(cj, 3, stride=2, padding=1, use_bias=False, name=f"fuse_layers_{i}_{j}_{k}_0", **kw)(
                    h
                )
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
                    exchange = interpolate(
                        exchange, size=acc.shape[1:3], mode="bilinear", align_corners=False
                    )
                acc = acc + exchange
            fused.append(_leaky(acc))
        return fused


class AdaptiveAggregation(nn.Module):
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.nowrap
    def torch_rules(self, layout):
        return _seq_rules("fusions", "final_conv")

    @nn.compact
    def __call__(self, cost_volume: Sequence[jax.Array], *, train: bool = False):
        _check_volumes("AdaptiveAggregation", cost_volume, self.num_scales, self.max_disp)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cv = list(cost_volume)
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


# --------------------------------------------------------------------------- catalogue


class _AggregationByScale(AdaptiveAggregation):
    """Catalogue adapter: the scales as keyword arrays ``cost0``, ``cost1``, ... (same variables)."""

    def __call__(self, cost0, cost1=None, cost2=None, cost3=None, *, train: bool = False):
        cv = [c for c in (cost0, cost1, cost2, cost3) if c is not None]
        return super().__call__(cv, train=train)


class _ModuleByScale(AdaptiveAggregationModule):
    """Catalogue adapter, as ``_AggregationByScale``."""

    def __call__(self, cost0, cost1=None, cost2=None, cost3=None, *, train: bool = False):
        cv = [c for c in (cost0, cost1, cost2, cost3) if c is not None]
        return super().__call__(cv, train=train)


def _volumes(n, hw, max_disp, scales):
    def make(rng):
        h, w = hw
        out = {}
        for i in range(scales):
            out[f"cost{i}"] = rng.standard_normal((n, h, w, max_disp // 2**i), dtype=np.float32)
            h, w = (h + 1) // 2, (w + 1) // 2
        return out

    return make


_VOLUME_NAMES = ("cost0", "cost1", "cost2")

catalogue.register(
    catalogue.Entry(
        name="aanet_deform_simple_bottleneck",
        family="aanet",
        paper="Xu & Zhang, CVPR 2020 (AANet intra-scale aggregation)",
        arxiv="2004.09548",
        flax=DeformSimpleBottleneck,
        torch="flax_attn.testing.torch_ref.aanet:DeformSimpleBottleneck",
        config=dict(inplanes=6, planes=6, mdconv_dilation=2, deformable_groups=2),
        inputs=lambda rng: {"x": rng.standard_normal((3, 13, 17, 6), dtype=np.float32)},
        bench_config=dict(inplanes=64, planes=64),
        bench_inputs=lambda rng: {"x": rng.standard_normal((4, 96, 160, 64), dtype=np.float32)},
        layouts=("official",),
    )
)

catalogue.register(
    catalogue.Entry(
        name="aanet_adaptive_aggregation_module",
        family="aanet",
        paper="Xu & Zhang, CVPR 2020 (AANet ISA + cross-scale aggregation)",
        arxiv="2004.09548",
        flax=_ModuleByScale,
        torch="flax_attn.testing.torch_ref.aanet:AdaptiveAggregationModule",
        config=dict(num_scales=3, num_output_branches=3, max_disp=8),
        inputs=_volumes(3, (13, 17), 8, 3),
        bench_config=dict(num_scales=3, num_output_branches=3, max_disp=64),
        bench_inputs=_volumes(4, (96, 160), 64, 3),
        image_inputs=_VOLUME_NAMES,
        torch_call=lambda m, **kw: m([kw[k] for k in _VOLUME_NAMES if k in kw]),
        layouts=("official",),
    )
)

catalogue.register(
    catalogue.Entry(
        name="aanet_adaptive_aggregation",
        family="aanet",
        paper="Xu & Zhang, CVPR 2020 (AANet stacked adaptive aggregation)",
        arxiv="2004.09548",
        flax=_AggregationByScale,
        torch="flax_attn.testing.torch_ref.aanet:AdaptiveAggregation",
        config=dict(max_disp=8, num_scales=3, num_fusions=2, num_deform_blocks=1),
        inputs=_volumes(3, (13, 17), 8, 3),
        bench_config=dict(max_disp=64),
        bench_inputs=_volumes(4, (96, 160), 64, 3),
        image_inputs=_VOLUME_NAMES,
        torch_call=lambda m, **kw: m([kw[k] for k in _VOLUME_NAMES if k in kw]),
        layouts=("official",),
        atol=1e-4,  # a whole model: stages of bottlenecks and fusions (11 BatchNorms per stage)
        rtol=1e-4,
    )
)
