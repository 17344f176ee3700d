"""Neighbourhood attention layers (NAT, DiNAT, NATTEN) in 1, 2 and 3 dims.

Hassani et al., "Neighborhood Attention Transformer", CVPR 2023, arXiv 2204.07143, and "Dilated
Neighborhood Attention Transformer", arXiv 2209.15001; reference implementation SHI-Labs/NATTEN.
The layer is a fused ``qkv`` projection, neighbourhood attention (:func:`flax_attn.ops.na2d` and
its 1-D/3-D siblings) and an output ``proj``, with NATTEN 0.21's arguments (``kernel_size``,
``stride``, ``dilation``, ``is_causal`` per axis) and NAT's optional relative positional bias
``rpb`` (``bias=True``), so both state-dict styles load: NATTEN 0.21's modules (``qkv``,
``proj``) and NAT/DiNAT's (``qkv``, ``rpb``, ``proj``).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn.layers import BlockFields, Linear, merge_train
from flax_attn.ops.checks import check_channels, check_divisible, check_rank
from flax_attn.ops.dtypes import compute_dtype
from flax_attn.ops.neighborhood import na1d, na2d, na3d

__all__ = ["NeighborhoodAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]

_OPS = {1: na1d, 2: na2d, 3: na3d}


class NeighborhoodAttention(BlockFields):
    """Neighbourhood self-attention on a channels-last map ``(B, *spatial, embed_dim)``.

    Use :class:`NeighborhoodAttention1D`, :class:`NeighborhoodAttention2D` or
    :class:`NeighborhoodAttention3D`, which fix the number of spatial axes ``na_dim``.

    ``qkv`` (``embed_dim -> 3 * embed_dim``, split as ``(3, heads, head_dim)`` like NATTEN and NAT),
    neighbourhood attention per head with NATTEN's window rule, ``proj`` and dropout. With
    ``bias=True`` a relative positional bias ``rpb`` ``(num_heads, 2k_1 - 1, ...)`` (NAT's, initialised
    trunc-normal std 0.02) is added to the scaled logits. Inputs smaller than the window
    (``kernel_size * dilation``) are zero-padded at the end and the output cropped, as NAT's layer
    does (NATTEN 0.21's refuses them).

    Attributes:
      embed_dim: channels C; ``num_heads`` must divide it.
      num_heads: heads.
      kernel_size, stride, dilation, is_causal: per axis (an int/bool or a tuple), as
        :func:`flax_attn.ops.na2d`.
      qkv_bias: bias of the ``qkv`` projection.
      qk_scale: logit scale; default ``head_dim ** -0.5``.
      bias: learn NAT's relative positional bias ``rpb`` (NAT's default; NATTEN 0.21 has none).
      attn_drop, proj_drop: dropout rates on the attention weights and the output.
      train: dropout on; settable here or in the call (positionally after ``x``), as every block's.
      implementation: ``None``, ``"xla"`` or ``"pallas"`` (2-D only), as :func:`flax_attn.ops.na2d`.
      dtype, param_dtype: compute and parameter dtypes.

    Input ``(B, *spatial, embed_dim)``; output the same shape, in the compute dtype.
    """

    embed_dim: int
    num_heads: int
    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1
    is_causal: bool | tuple[bool, ...] = False
    qkv_bias: bool = True
    qk_scale: float | None = None
    bias: bool = False
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    implementation: str | None = None

    na_dim: ClassVar[int] = 2

    @nn.nowrap
    def torch_rules(self, layout):
        return []  # qkv, proj and rpb carry the torch names; Linear's leaves map generically

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        n = self.na_dim
        where = type(self).__name__
        train = merge_train(self, train)
        x = x.astype(compute_dtype(where, self.dtype, x=x))
        check_rank(where, "x", x, n + 2, f"(batch, {n} spatial axes, embed_dim)")
        check_channels(where, "x", x, self.embed_dim)
        check_divisible(where, "embed_dim", self.embed_dim, "num_heads", self.num_heads)
        deterministic = not train
        nh, hd = self.num_heads, self.embed_dim // self.num_heads
        ks = (self.kernel_size,) * n if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        dl = (self.dilation,) * n if isinstance(self.dilation, int) else tuple(self.dilation)
        if len(ks) != n or len(dl) != n:
            raise ValueError(
                f"{where}: `kernel_size` and `dilation` must be ints or tuples of {n}, got "
                f"kernel_size={self.kernel_size!r}, dilation={self.dilation!r}"
            )
        kw = self.precision()
        b, *spatial, c = x.shape
        pads = [max(0, k * d - s) for k, d, s in zip(ks, dl, spatial)]
        if any(pads):
            x = jnp.pad(x, [(0, 0), *((0, p) for p in pads), (0, 0)])
        padded = x.shape[1:-1]
        qkv = Linear(3 * c, use_bias=self.qkv_bias, name="qkv", **kw)(x).reshape(b, *padded, 3, nh, hd)
        q, k, v = (qkv[..., i, :, :] for i in range(3))
        rpb = None
        if self.bias:
            shape = (nh, *(2 * k_ - 1 for k_ in ks))
            rpb = self.param("rpb", nn.initializers.truncated_normal(0.02), shape, self.param_dtype)
        drop = 0.0 if deterministic else self.attn_drop
        out = _OPS[n](
            q,
            k,
            v,
            self.kernel_size,
            self.stride,
            self.dilation,
            self.is_causal,
            self.qk_scale,
            rpb=rpb,
            dropout_rate=drop,
            dropout_rng=self.make_rng("dropout") if drop > 0.0 else None,
            implementation=self.implementation,
        )
        out = out.reshape(b, *padded, c)[(slice(None), *(slice(0, s) for s in spatial))]
        out = Linear(c, name="proj", **kw)(out)
        return nn.Dropout(self.proj_drop, deterministic=deterministic)(out)


class NeighborhoodAttention1D(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` on sequences ``(B, L, embed_dim)`` (NATTEN's ``NeighborhoodAttention1D``).

    Example:
      >>> m = NeighborhoodAttention1D(embed_dim=16, num_heads=2, kernel_size=5, dilation=2, is_causal=True)
      >>> x = jnp.ones((2, 19, 16))
      >>> m.apply(m.init(jax.random.PRNGKey(0), x), x).shape
      (2, 19, 16)
    """

    na_dim: ClassVar[int] = 1


class NeighborhoodAttention2D(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` on images ``(B, H, W, embed_dim)``: NAT/DiNAT's layer
    (``bias=True``, state-dict keys ``qkv``, ``rpb``, ``proj``) or NATTEN 0.21's (``qkv``, ``proj``).

    Example:
      >>> m = NeighborhoodAttention2D(embed_dim=64, num_heads=2, kernel_size=7, bias=True)
      >>> x = jnp.ones((2, 13, 17, 64))
      >>> variables = m.init(jax.random.PRNGKey(0), x)
      >>> variables["params"]["rpb"].shape
      (2, 13, 13)
      >>> m.apply(variables, x).shape
      (2, 13, 17, 64)
    """

    na_dim: ClassVar[int] = 2


class NeighborhoodAttention3D(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` on videos/volumes ``(B, T, H, W, embed_dim)``.

    Example:
      >>> m = NeighborhoodAttention3D(embed_dim=16, num_heads=2, kernel_size=(2, 3, 3), stride=(1, 2, 2))
      >>> x = jnp.ones((1, 4, 7, 9, 16))
      >>> m.apply(m.init(jax.random.PRNGKey(0), x), x).shape
      (1, 4, 7, 9, 16)
    """

    na_dim: ClassVar[int] = 3
