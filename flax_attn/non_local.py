"""Non-local neural networks (Wang et al., CVPR 2018, arXiv 1711.07971).

Follows AlexHex7/Non-local_pytorch (``lib/non_local_{embedded_gaussian,gaussian,dot_product,
concatenation}.py`` and the MNIST ``lib/network.py``), channels-last: 1-D ``(B, L, C)``, 2-D
``(B, H, W, C)``, 3-D ``(B, T, H, W, C)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from flax_attn.convert.engine import LinearFromNCHW, Rename, sequential_rules
from flax_attn.layers import (
    BatchNorm,
    BatchStatsFields,
    Conv,
    DtypeFields,
    Linear,
    merge_train,
    torch_default_kernel_init,
)
from flax_attn.ops.checks import check_channels
from flax_attn.ops.dtypes import compute_dtype
from flax_attn.ops.max_pool import max_pool
from flax_attn.ops.non_local import NON_LOCAL_MODES, non_local_attention

__all__ = ["NONLocalBlock1D", "NONLocalBlock2D", "NONLocalBlock3D", "NonLocalBlockND", "NonLocalMNISTNet"]


# The official sub-sampling pools: never along time for video.
_POOL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
_LAYOUT = {
    1: "(batch, length, channels)",
    2: "(batch, height, width, channels)",
    3: "(batch, time, height, width, channels)",
}


class _ConcatProject(DtypeFields):
    """Holds the ``concat_project.0`` 1x1 ``Conv2d(2 * inter, 1, bias=False)`` weight.

    The op applies it as two dot products (theta half, phi half) instead of convolving a
    ``(2 * inter, N, M)`` concatenation, so the module only owns the parameter.
    """

    channels: int

    @nn.compact
    def __call__(self):
        return self.param("kernel", torch_default_kernel_init, (1, 1, self.channels, 1), self.param_dtype)


class NonLocalBlockND(BatchStatsFields):
    """Non-local block ``z = W(y) + x`` with ``y_i = sum_j f(x_i, x_j) g(x_j) / C(x)``.

    Wang et al., "Non-local Neural Networks", CVPR 2018 (arXiv 1711.07971); semantics and state-dict
    keys of AlexHex7/Non-local_pytorch.

    Attributes:
      in_channels: input channels ``C``.
      inter_channels: embedding width; default ``C // 2`` (1 when that is 0), as official.
      dimension: 1, 2 or 3 spatial axes.
      sub_sample: max-pool ``g`` and ``phi`` (kernel 2, 2x2, or (1, 2, 2) for 3-D; floor mode).
      bn_layer: ``W`` is 1x1 conv + BatchNorm with zero-initialised BN (``W.0``/``W.1``); otherwise a
        single zero-initialised 1x1 conv ``W``. Either way the block starts as the identity.
      mode: ``"embedded_gaussian"`` (default), ``"gaussian"`` (no theta/phi convs; phi is the
        pooled input), ``"dot_product"`` or ``"concatenation"`` (``concat_project.0``: 1x1 conv on
        ``[theta; phi]`` + ReLU).

    Call: ``(x, return_nl_map=False, train=None)`` with ``x`` ``(B, *spatial, C)``; returns ``z``
    of the same shape, or ``(z, nl_map)`` with ``nl_map`` ``(B, N, M)`` the normalised affinities
    (``N`` positions, ``M`` key positions after sub-sampling), as the official ``return_nl_map``.

    Example:
      >>> block = NonLocalBlockND(in_channels=16, dimension=2)
      >>> x = jax.numpy.ones((2, 9, 11, 16))
      >>> variables = block.init(jax.random.PRNGKey(0), x)
      >>> block.apply(variables, x).shape
      (2, 9, 11, 16)
    """

    in_channels: int
    inter_channels: int | None = None
    dimension: int = 3
    sub_sample: bool = True
    bn_layer: bool = True
    mode: str = "embedded_gaussian"

    @property
    def _inter(self) -> int:
        if self.inter_channels is not None:
            return self.inter_channels
        return max(self.in_channels // 2, 1)

    @nn.nowrap
    def torch_rules(self, layout):
        rules = [
            *sequential_rules("W"),
            Rename(r"concat_project_0\.(.*)", r"concat_project.0.\1"),
        ]
        if self.sub_sample:
            # The official block wraps g and phi in nn.Sequential(conv, pool).
            rules += [Rename(r"g\.(.*)", r"g.0.\1"), Rename(r"phi\.(.*)", r"phi.0.\1")]
        return rules

    def _check(self, x):
        where = type(self).__name__
        if self.dimension not in (1, 2, 3):
            raise ValueError(f"{where}: `dimension` must be 1, 2 or 3, got {self.dimension}")
        if self.mode not in NON_LOCAL_MODES:
            raise ValueError(f"{where}: `mode` must be one of {NON_LOCAL_MODES}, got {self.mode!r}")
        if self.in_channels <= 0 or self._inter <= 0:
            raise ValueError(
                f"{where}: `in_channels`={self.in_channels} and `inter_channels`={self._inter} must be positive"
            )
        if x.ndim != self.dimension + 2:
            raise ValueError(
                f"{where}: `x` must be {self.dimension + 2}-D {_LAYOUT[self.dimension]}, got shape {x.shape}"
            )
        check_channels(where, "x", x, self.in_channels)
        if self.sub_sample:
            for axis, k in enumerate(_POOL[self.dimension]):
                if x.shape[1 + axis] < k:
                    raise ValueError(
                        f"{where}: sub_sample pools spatial axis {axis} by {k}, but `x` has size "
                        f"{x.shape[1 + axis]} there (shape {x.shape}); use sub_sample=False"
                    )

    @nn.compact
    def __call__(self, x: jax.Array, return_nl_map: bool = False, train: bool | None = None):
        train = merge_train(self, train)
        self._check(x)
        d, inter = self.dimension, self._inter
        dtype = compute_dtype(type(self).__name__, self.dtype, x=x)
        x = x.astype(dtype)
        b = x.shape[0]

        def conv(name, feats, **kw):
            return Conv(feats, 1, spatial_dims=d, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)

        pool = (lambda t: max_pool(t, _POOL[d])) if self.sub_sample else (lambda t: t)

        g_x = pool(conv("g", inter)(x))
        if self.mode == "gaussian":
            theta_x, phi_x = x, pool(x)
        else:
            theta_x = conv("theta", inter)(x)
            phi_x = pool(conv("phi", inter)(x))
        concat_kernel = (
            _ConcatProject(2 * inter, param_dtype=self.param_dtype, name="concat_project_0")()
            if self.mode == "concatenation"
            else None
        )

        flat = lambda t: t.reshape(b, -1, t.shape[-1])  # noqa: E731
        out = non_local_attention(
            flat(theta_x),
            flat(phi_x),
            flat(g_x),
            mode=self.mode,
            concat_kernel=concat_kernel,
            return_weights=return_nl_map,
        )
        y, nl_map = out if return_nl_map else (out, None)
        y = y.reshape(*x.shape[:-1], inter)

        zeros = nn.initializers.zeros
        if self.bn_layer:
            w_y = conv("W_0", self.in_channels)(y)
            w_y = BatchNorm(scale_init=zeros, dtype=self.dtype, param_dtype=self.param_dtype, name="W_1")(
                w_y, train=train
            )
        else:
            w_y = conv("W", self.in_channels, kernel_init=zeros)(y)
        z = w_y + x
        return (z, nl_map) if return_nl_map else z


class NONLocalBlock1D(NonLocalBlockND):
    """:class:`NonLocalBlockND` on sequences ``(B, L, C)`` (official ``NONLocalBlock1D``)."""

    dimension: int = 1


class NONLocalBlock2D(NonLocalBlockND):
    """:class:`NonLocalBlockND` on images ``(B, H, W, C)`` (official ``NONLocalBlock2D``)."""

    dimension: int = 2


class NONLocalBlock3D(NonLocalBlockND):
    """:class:`NonLocalBlockND` on videos ``(B, T, H, W, C)`` (official ``NONLocalBlock3D``)."""

    dimension: int = 3


class NonLocalMNISTNet(BatchStatsFields):
    """The official MNIST network with two non-local blocks (AlexHex7/Non-local_pytorch ``lib/network.py``).

    Three conv3x3-BN-ReLU-maxpool stages (32, 64, 128 channels) with embedded-Gaussian
    :class:`NONLocalBlock2D` (``sub_sample``, ``bn_layer``) after the first two, then an MLP head
    (``fc.0`` 1152 -> 256, ReLU, Dropout, ``fc.3`` 256 -> 10). The head reads NHWC-flattened features;
    the converter permutes ``fc.0.weight`` from the official NCHW flattening, so released
    checkpoints (``weights/net.pth``) load directly.

    Attributes:
      dropout: rate of the head's dropout (official 0.5; active with ``train=True``, rng ``dropout``).

    Call: ``(x (B, 28, 28, 1), return_nl_map=False, train=None)`` returns logits ``(B, 10)``, or
    ``(logits, [nl_map_1 (B, 196, 49), nl_map_2 (B, 49, 9)])`` like ``forward_with_nl_map``.

    Example:
      >>> net = NonLocalMNISTNet()
      >>> x = jax.numpy.zeros((2, 28, 28, 1))
      >>> variables = net.init(jax.random.PRNGKey(0), x)
      >>> net.apply(variables, x).shape
      (2, 10)
    """

    dropout: float = 0.5

    @nn.nowrap
    def torch_rules(self, layout):
        return [
            *sequential_rules(r"conv_\d"),
            Rename(r"fc_0\.weight", "fc.0.weight", LinearFromNCHW(128, 3, 3)),
            *sequential_rules("fc"),
        ]

    @nn.compact
    def __call__(self, x: jax.Array, return_nl_map: bool = False, train: bool | None = None):
        train = merge_train(self, train)
        where = "NonLocalMNISTNet"
        x = x.astype(compute_dtype(where, self.dtype, x=x))
        if x.ndim != 4 or x.shape[1:] != (28, 28, 1):
            raise ValueError(
                f"{where}: `x` must be (batch, 28, 28, 1) (the head is fixed to 128x3x3), got shape {x.shape}"
            )
        kw = self.precision()
        maps = []
        out = x
        for i, feats in enumerate((32, 64, 128), start=1):
            out = Conv(feats, 3, padding=1, name=f"conv_{i}_0", **kw)(out)
            out = BatchNorm(name=f"conv_{i}_1", **kw)(out, train=train)
            out = max_pool(nn.relu(out), 2)
            if i < 3:
                out, nl_map = NONLocalBlock2D(feats, name=f"nl_{i}", **kw)(out, True, train=train)
                maps.append(nl_map)
        out = out.reshape(out.shape[0], -1)
        out = nn.relu(Linear(256, name="fc_0", **kw)(out))
        out = nn.Dropout(self.dropout, deterministic=not train)(out)
        out = Linear(10, name="fc_3", **kw)(out)
        return (out, maps) if return_nl_map else out
