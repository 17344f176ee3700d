"""ACmix (convolution + local self-attention) and Swin's window attention: local-window attention blocks.

Both attend inside a local window: ACmix over each pixel's ``kernel_att x kernel_att`` neighbourhood
(through :func:`flax_attn.ops.neighborhood_attention`), Swin over non-overlapping (shifted) windows
(through :func:`flax_attn.ops.window.window_attention`). The official ACmix repository ships both a
ResNet and a Swin variant; this module hosts the two attention primitives they build on.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.convert.engine import Ignore
from flax_attn.layers import BlockFields, Conv, Linear, merge_train
from flax_attn.ops.checks import check_divisible
from flax_attn.ops.neighborhood import neighborhood_attention
from flax_attn.ops.window import window_attention

__all__ = ["ACmix", "WindowAttention"]


def _shift_kernel_init(key, shape, dtype=jnp.float32):
    """ACmix ``reset_parameters``: input map ``i`` of each dep_conv group feeds tap ``(i // kc, i % kc)``."""
    kc = shape[0]
    kernel = np.zeros(shape, np.float32)  # (kc, kc, kc^2, out)
    for i in range(kc * kc):
        kernel[i // kc, i % kc, i, :] = 1.0
    return jnp.asarray(kernel, dtype)


def _position(h: int, w: int) -> np.ndarray:
    """ACmix's ``position(H, W)`` grid as NHWC ``(1, H, W, 2)``: (x along W, y along H), each in [-1, 1]."""
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float64)
    ys = np.linspace(-1.0, 1.0, h, dtype=np.float64)
    grid = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
    return grid[None].astype(np.float32)


class ACmix(BlockFields):
    """ACmix: shared 1x1 projections feeding both local self-attention and a shift convolution.

    Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022, arXiv 2111.14556;
    official code LeapLabTHU/ACmix (``ResNet/test_bottleneck.py``). Three 1x1 convs give q, k, v.
    The attention path attends over each position's ``kernel_att x kernel_att`` reflection-padded
    window with ACmix's positional encoding ``conv_p`` of a [-1, 1] coordinate grid; the
    convolution path mixes q, k, v per head with ``fc`` (1x1, ``3 * head -> kernel_conv^2``) and
    applies the grouped ``dep_conv``, initialised as ``kernel_conv^2`` shifts. The output is
    ``rate1 * attention + rate2 * convolution`` (both learnable scalars, initialised to 0.5).

    ACmix's logit ``q . (k + pe_q - pe_k)`` is computed as plain neighbourhood attention on
    ``k - pe``: the ``q . pe_q`` term is constant across a query's window and cancels in the
    softmax. With ``stride=2`` queries are taken at every other position (as the official strided
    ``Unfold``) and ``dep_conv`` is strided.

    Attributes:
      in_planes, out_planes: input and output channels.
      kernel_att: attention window side (odd).
      head: attention heads; ``out_planes // head`` is the head dim.
      kernel_conv: convolution kernel of ``dep_conv``; 3 (the official ``dep_conv`` has a fixed
        padding of 1, so other sizes do not preserve the spatial size).
      stride: 1 or more; the height and width must be multiples of it (the official ``view``
        requires it).
      dilation: kept for the official signature; only 1 is consistent there (its ``Unfold`` is
        undilated while its padding is dilated).
      implementation: neighbourhood-attention backend: ``None``
        (:func:`flax_attn.kernels.default_implementation`: XLA unless the kernel is recorded as
        verified on this platform), ``"xla"`` or ``"pallas"`` (interpreted on CPU).

    Input ``(B, H, W, in_planes)``; output ``(B, H // stride, W // stride, out_planes)``.

    Example:
      >>> m = ACmix(in_planes=16, out_planes=32)
      >>> x = jnp.ones((2, 13, 17, 16))
      >>> variables = m.init(jax.random.PRNGKey(0), x)
      >>> m.apply(variables, x).shape
      (2, 13, 17, 32)
    """

    in_planes: int
    out_planes: int
    kernel_att: int = 7
    head: int = 4
    kernel_conv: int = 3
    stride: int = 1
    dilation: int = 1
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "ACmix"
        x = self.image_input(x, self.in_planes, layout="(batch, height, width, in_planes)")
        check_divisible(where, "out_planes", self.out_planes, "head", self.head)
        if self.dilation != 1:
            raise ValueError(f"{where}: `dilation` must be 1 (the official Unfold ignores it), got {self.dilation}")
        if self.kernel_conv != 3:
            raise ValueError(
                f"{where}: `kernel_conv` must be 3 (official dep_conv has padding=1), got {self.kernel_conv}"
            )
        if self.kernel_att % 2 == 0:
            raise ValueError(f"{where}: `kernel_att` must be odd, got {self.kernel_att}")
        b, h, w, _ = x.shape
        s = self.stride
        if h % s or w % s:
            raise ValueError(f"{where}: height and width must be multiples of `stride`={s}, got input {x.shape}")
        pad = self.kernel_att // 2
        if pad >= h or pad >= w:
            raise ValueError(
                f"{where}: reflection padding {pad} (kernel_att={self.kernel_att}) must be smaller "
                f"than height and width, got input {x.shape}"
            )
        nh, hd = self.head, self.out_planes // self.head
        kw = self.precision()

        q = Conv(self.out_planes, 1, name="conv1", **kw)(x)
        k = Conv(self.out_planes, 1, name="conv2", **kw)(x)
        v = Conv(self.out_planes, 1, name="conv3", **kw)(x)
        qh, kh, vh = (t.reshape(b, h, w, nh, hd) for t in (q, k, v))

        pe = Conv(hd, 1, name="conv_p", **kw)(jnp.asarray(_position(h, w)))  # (1, H, W, hd), shared by heads
        out_att = neighborhood_attention(
            qh[:, ::s, ::s],
            kh - pe[:, :, :, None, :].astype(kh.dtype),
            vh,
            kernel_size=self.kernel_att,
            border="reflect",
            stride=s,
            scale=float(hd) ** -0.5,
            implementation=self.implementation,
        ).reshape(b, h // s, w // s, self.out_planes)

        # fc mixes the 3 * head maps (q, k, v of each head) per (position, head-dim channel); laid out
        # as an image of width W * hd so that a plain 1x1 Conv holds torch's (kc^2, 3*head, 1, 1) weight.
        kc2 = self.kernel_conv**2
        stacked = jnp.concatenate([qh, kh, vh], axis=3)  # (B, H, W, 3*head, hd)
        stacked = jnp.swapaxes(stacked, 3, 4).reshape(b, h, w * hd, 3 * nh)
        f_all = Conv(kc2, 1, use_bias=False, name="fc", **kw)(stacked)
        f_conv = f_all.reshape(b, h, w, hd * kc2)  # channel = d * kc^2 + j, as torch's permute/reshape
        out_conv = Conv(
            self.out_planes,
            self.kernel_conv,
            stride=s,
            padding=1,
            groups=hd,
            name="dep_conv",
            kernel_init=_shift_kernel_init,
            **kw,
        )(f_conv)

        rate1 = self.param("rate1", nn.initializers.constant(0.5), (1,), self.param_dtype)
        rate2 = self.param("rate2", nn.initializers.constant(0.5), (1,), self.param_dtype)
        dtype = out_att.dtype
        return rate1.astype(dtype) * out_att + rate2.astype(dtype) * out_conv.astype(dtype)


class WindowAttention(BlockFields):
    """Swin Transformer's (shifted) window multi-head self-attention on an image.

    Liu et al., "Swin Transformer", ICCV 2021, arXiv 2103.14030; official code
    microsoft/Swin-Transformer ``models/swin_transformer.py`` (``WindowAttention`` plus the block's
    cyclic shift, window partition and attention mask). Tokens attend within
    ``window_size x window_size`` windows with a learned relative position bias
    (``relative_position_bias_table``, ``((2M-1)^2, num_heads)``, trunc-normal std 0.02); with
    ``shift_size > 0`` the map is cyclically rolled first and Swin's mask (-100) separates tokens
    that were not adjacent.

    Attributes:
      dim: channels C; num_heads must divide it.
      window_size: window side M (H and W must be multiples of it).
      num_heads: heads.
      shift_size: cyclic shift in [0, window_size).
      qkv_bias: bias of the fused ``qkv`` projection.
      qk_scale: logit scale; default ``head_dim ** -0.5``.
      attn_drop, proj_drop: dropout rates (active with ``train=True``, rng stream ``dropout``).
      implementation: window-attention backend (see :func:`flax_attn.ops.window.window_attention`):
        ``None`` (XLA unless the kernel is recorded as verified on this platform, and whenever
        attention dropout is active), ``"xla"`` or ``"pallas"`` (interpreted on CPU).

    Parameters load from Swin's ``WindowAttention`` state dict (``qkv``, ``proj``,
    ``relative_position_bias_table``; the ``relative_position_index`` buffer is recomputed).

    Input ``(B, H, W, dim)``; output ``(B, H, W, dim)``.

    Example:
      >>> m = WindowAttention(dim=32, window_size=7, num_heads=4, shift_size=3)
      >>> x = jnp.ones((2, 14, 21, 32))
      >>> m.apply(m.init(jax.random.PRNGKey(0), x), x).shape
      (2, 14, 21, 32)
    """

    dim: int
    window_size: int
    num_heads: int
    shift_size: int = 0
    qkv_bias: bool = True
    qk_scale: float | None = None
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    implementation: str | None = None

    @nn.nowrap
    def torch_rules(self, layout):
        return [Ignore(r"(^|\.)relative_position_index$")]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "WindowAttention"
        x = self.image_input(x, self.dim, layout="(batch, height, width, dim)")
        check_divisible(where, "dim", self.dim, "num_heads", self.num_heads)
        b, h, w, c = x.shape
        ws = self.window_size
        if h % ws or w % ws:
            raise ValueError(f"{where}: height and width must be multiples of `window_size`={ws}, got input {x.shape}")
        if not 0 <= self.shift_size < ws:
            raise ValueError(f"{where}: `shift_size` must be in [0, {ws}), got {self.shift_size}")
        nh, hd = self.num_heads, self.dim // self.num_heads
        kw = self.precision()
        table = self.param(
            "relative_position_bias_table",
            nn.initializers.truncated_normal(0.02),
            ((2 * ws - 1) ** 2, nh),
            self.param_dtype,
        )
        qkv = Linear(3 * c, use_bias=self.qkv_bias, name="qkv", **kw)(x).reshape(b, h, w, 3, nh, hd)
        rng = self.make_rng("dropout") if (train and self.attn_drop > 0.0) else None
        out = window_attention(
            qkv[:, :, :, 0],
            qkv[:, :, :, 1],
            qkv[:, :, :, 2],
            window_size=ws,
            shift_size=self.shift_size,
            bias_table=table,
            scale=self.qk_scale,
            dropout_rate=self.attn_drop if rng is not None else 0.0,
            dropout_rng=rng,
            implementation=self.implementation,
        )
        out = Linear(c, name="proj", **kw)(out.reshape(b, h, w, c))
        return nn.Dropout(self.proj_drop, deterministic=not train)(out)
