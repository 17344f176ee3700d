"""Flax layers with PyTorch's semantics and defaults, the building material of every block.

The differences they remove, each of which breaks float32 parity on its own:

* ``Conv``: explicit symmetric padding (Flax's ``'SAME'`` pads asymmetrically at stride 2), torch's
  ``padding_mode`` (zeros/reflect/replicate/circular) and torch's default init.
* ``BatchNorm``: torch momentum/eps, and the *unbiased* batch variance in the running-variance
  update (Flax's ``nn.BatchNorm`` uses the biased one).
* ``LayerNorm``/``GroupNorm``: eps 1e-5 and the exact two-pass variance.
* ``Linear``: torch's default init (kaiming-uniform with a = sqrt(5)).

Variable names are Flax's (``kernel``, ``bias``, ``scale``, ``mean``, ``var``), so the converter's
generic rules map them to torch's ``weight``/``bias``/``running_mean``/``running_var``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn.convert.engine import sequential_rules
from flax_attn.ops.checks import check_channels, check_rank
from flax_attn.ops.conv import conv
from flax_attn.ops.dtypes import compute_dtype, statistics_dtype

Dtype = Any

__all__ = [
    "BatchNorm",
    "BatchStatsFields",
    "BlockFields",
    "Conv",
    "DtypeFields",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "merge_train",
    "torch_default_kernel_init",
]

# kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)) == variance_scaling(1/3, fan_in, uniform)
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class DtypeFields(nn.Module):
    """The precision fields every flax-attn module declares, keyword-only and declared once here.

    Attributes:
      dtype: the compute dtype (``None``: the inputs' dtype, promoted with float32 parameters;
        see :func:`flax_attn.ops.dtypes.compute_dtype`).
      param_dtype: the dtype parameters are created and stored in (float32).

    They are keyword-only (``Block(64, dtype=jnp.bfloat16)``), so a subclass's own fields keep their
    positions and torch's argument order.
    """

    _: dataclasses.KW_ONLY
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # The state-dict layouts the converter accepts for this module, the first the default; a block
    # converting from more than its official repository's keys (timm's, a blog's) overrides it.
    torch_layouts: ClassVar[tuple[str, ...]] = ("official",)
    # This module's children that torch holds in an nn.Sequential/ModuleList (names or regular
    # expressions, see convert.sequential_rules): Flax's ``layer1_0`` converts as torch's ``layer1.0``.
    torch_sequential: ClassVar[tuple[str, ...]] = ()

    @nn.nowrap
    def torch_rules(self, layout):
        """The converter's rename rules for this module (see :mod:`flax_attn.convert`); by default the
        :func:`~flax_attn.convert.sequential_rules` of ``torch_sequential``."""
        return sequential_rules(*self.torch_sequential) if self.torch_sequential else []

    @nn.nowrap
    def image_input(
        self,
        x: jax.Array,
        channels: int | None = None,
        *,
        name: str = "x",
        layout: str = "(batch, height, width, channels)",
    ) -> jax.Array:
        """``x`` checked as a 4-D channels-last image batch (with ``channels`` channels when given)
        and cast to this module's compute dtype: the opening of most blocks' calls.

        Errors name the module (its class), the argument ``name`` and the expected ``layout``.
        """
        where = type(self).__name__
        check_rank(where, name, x, 4, layout)
        x = x.astype(compute_dtype(where, self.dtype, **{name: x}))
        if channels is not None:
            check_channels(where, name, x, channels)
        return x

    @nn.nowrap
    def precision(self) -> dict[str, Any]:
        """``dict(dtype=..., param_dtype=...)``, what every submodule of a block is given."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class BlockFields(DtypeFields):
    """:class:`DtypeFields` plus the train flag every catalogued block takes (see :func:`merge_train`)."""

    _: dataclasses.KW_ONLY
    train: bool | None = None


class BatchStatsFields(BlockFields):
    """:class:`BlockFields` plus the collective axis of the BatchNorms a block holds.

    Attributes:
      axis_name: collective axis for cross-device BatchNorm statistics under ``shard_map``/``pmap``;
        every :class:`BatchNorm` inside whose own ``axis_name`` is ``None`` takes it from here.
      axis_index_groups: device groups that share statistics (``jax.lax.pmean``'s argument).
    """

    _: dataclasses.KW_ONLY
    axis_name: str | None = None
    axis_index_groups: Any = None


def merge_train(module: nn.Module, train: bool | None) -> bool:
    """The train/eval flag of ``module``, the Flax way (``nn.merge_param``).

    Every block has a ``train: bool | None = None`` attribute and takes ``train`` in the call as
    well, positionally after its inputs. Give it in one place: the constructor (what ``nn.scan``,
    ``nn.remat`` and ``nn.vmap`` need, since they pass only positional arguments through) or the
    call; neither means eval (``False``), both is an error naming the block.
    """
    if module.train is None and train is None:
        return False
    try:
        return nn.merge_param("train", module.train, train)
    except ValueError:
        raise ValueError(
            f"{type(module).__name__}: `train` was given to the constructor (train={module.train}) and to the "
            f"call (train={train}); give it in one place"
        ) from None


def _tuple(v, n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    if len(v) != n:
        raise ValueError(f"Conv: `{name}` must be an int or a {n}-tuple, got {v!r}")
    return v


class Conv(DtypeFields):
    """``torch.nn.Conv{1,2,3}d`` in channels-last layout.

    Attributes:
      features: output channels (torch ``out_channels``).
      kernel_size: int or tuple; its length (or ``spatial_dims``) fixes 1-D/2-D/3-D.
      stride, padding, dilation: as in torch; ``padding`` is symmetric per spatial dim, or a
        sequence of ``(low, high)`` pairs.
      groups: torch ``groups`` (``groups == in_channels`` is a depthwise conv).
      use_bias: torch ``bias``.
      padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
      spatial_dims: number of spatial dims when ``kernel_size`` is an int (default 2).

    Input ``(B, *spatial, C_in)``; output ``(B, *spatial_out, features)``.
    """

    features: int
    kernel_size: int | Sequence[int] = 1
    stride: int | Sequence[int] = 1
    padding: int | Sequence[int] | Sequence[tuple[int, int]] = 0
    dilation: int | Sequence[int] = 1
    groups: int = 1
    use_bias: bool = True
    padding_mode: str = "zeros"
    spatial_dims: int = 2
    kernel_init: Any = torch_default_kernel_init
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.kernel_size) if not isinstance(self.kernel_size, int) else self.spatial_dims
        if x.ndim != n + 2:
            raise ValueError(
                f"Conv({self.name}): input must be {n + 2}-D (batch, *spatial[{n}], channels), got shape {x.shape}"
            )
        if x.shape[-1] % self.groups:
            raise ValueError(f"Conv({self.name}): input channels {x.shape[-1]} not divisible by groups={self.groups}")
        ks = _tuple(self.kernel_size, n, "kernel_size")
        if isinstance(self.padding, int) or all(isinstance(p, int) for p in self.padding):
            pads = [(p, p) for p in _tuple(self.padding, n, "padding")]
        else:
            pads = [tuple(p) for p in self.padding]
        if self.padding_mode != "zeros" and any(lo or hi for lo, hi in pads):
            mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}.get(self.padding_mode)
            if mode is None:
                raise ValueError(f"Conv({self.name}): unknown padding_mode {self.padding_mode!r}")
            if mode == "reflect":
                for axis, (lo, hi) in enumerate(pads):
                    if max(lo, hi) >= x.shape[1 + axis]:
                        raise ValueError(
                            f"Conv({self.name}): reflect padding {max(lo, hi)} must be smaller than the input "
                            f"size {x.shape[1 + axis]} along spatial axis {axis} (input shape {x.shape})"
                        )
            x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=mode)
            pads = [(0, 0)] * n
        return self._conv(x, ks, pads)

    def _conv(self, x, ks, pads):
        # Parameters live directly in this module (``kernel``/``bias``), so the converter sees
        # ``<name>.kernel`` like torch's ``<name>.weight``, with no extra scope in between.
        in_ch = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (*ks, in_ch // self.groups, self.features), self.param_dtype)
        dtype = compute_dtype(f"Conv({self.name})", self.dtype, x=x)  # None: the input's (bf16 in, bf16 out)
        n = len(ks)
        y = conv(
            x.astype(dtype),
            kernel.astype(dtype),
            _tuple(self.stride, n, "stride"),
            pads,
            _tuple(self.dilation, n, "dilation"),
            self.groups,
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


class Linear(DtypeFields):
    """``torch.nn.Linear`` with torch's default init; parameters ``kernel`` (in, out) and ``bias``."""

    features: int
    use_bias: bool = True
    kernel_init: Any = torch_default_kernel_init
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = compute_dtype(f"Linear({self.name})", self.dtype, x=x)  # None: the input's (bf16 in, bf16 out)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
        return y


class BatchNorm(BatchStatsFields):
    """``torch.nn.BatchNorm{1,2,3}d`` over the last (channel) axis.

    Attributes:
      momentum: torch's convention, ``running = (1 - momentum) * running + momentum * batch``
        (torch 0.1 is Flax 0.9).
      eps: torch 1e-5.
      affine: learnable ``scale``/``bias`` (torch ``weight``/``bias``).
      axis_name: collective axis for cross-device statistics under ``shard_map``/``pmap``. Under
        ``jax.jit`` with a sharded batch the statistics are already global.
      axis_index_groups: device groups that share statistics (``jax.lax.pmean``'s argument).

    Every block that holds a BatchNorm (``CBAM``, ``SELayer``'s residual blocks, ``SEResNet``,
    ``RCCAModule``...) has ``axis_name`` and ``axis_index_groups`` attributes too: a BatchNorm whose
    own ``axis_name`` is ``None`` takes them from the nearest enclosing flax_attn block that sets
    one, so ``SEResNet(..., axis_name="batch")`` reaches every BatchNorm in every residual block.
      scale_init: e.g. ``zeros`` for the zero-init BN of non-local blocks.

    ``train`` (constructor attribute or call argument, see :func:`merge_train`): ``True``
    normalises with batch statistics and updates ``batch_stats`` (``mutable=['batch_stats']``),
    as ``nn.BatchNorm(use_running_average=False)`` does; the running variance is updated with the unbiased batch
    variance, exactly as PyTorch does. Statistics are computed in float32 (float64 for float64 inputs).
    """

    momentum: float = 0.1
    eps: float = 1e-5
    affine: bool = True
    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        dtype = compute_dtype(f"BatchNorm({self.name})", self.dtype, x=x)
        c = x.shape[-1]
        mean_var = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        var_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        axes = tuple(range(x.ndim - 1))
        sdt = statistics_dtype(x.dtype)
        xf = x.astype(sdt)
        if train:
            mean = jnp.mean(xf, axis=axes)
            n = 1
            for a in axes:
                n *= x.shape[a]
            axis_name, groups = self._collective_axis()
            if axis_name is not None:
                mean = jax.lax.pmean(mean, axis_name, axis_index_groups=groups)
                n = n * jax.lax.psum(1, axis_name, axis_index_groups=groups)
            # Two-pass variance keeps float32 parity with torch (E[x^2] - E[x]^2 loses digits).
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if axis_name is not None:
                var = jax.lax.pmean(var, axis_name, axis_index_groups=groups)
            if not self.is_initializing():
                unbiased = var * (n / max(n - 1, 1))
                mean_var.value = (1 - self.momentum) * mean_var.value + self.momentum * mean
                var_var.value = (1 - self.momentum) * var_var.value + self.momentum * unbiased
        else:
            mean, var = mean_var.value, var_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.param("scale", self.scale_init, (c,), self.param_dtype).astype(sdt)
            y = y + self.param("bias", self.bias_init, (c,), self.param_dtype).astype(sdt)
        return y.astype(dtype)

    def _collective_axis(self):
        """``(axis_name, axis_index_groups)``: this layer's, else the nearest enclosing block's."""
        if self.axis_name is not None:
            return self.axis_name, self.axis_index_groups
        parent = self.parent
        while isinstance(parent, nn.Module):
            # Only the library's own blocks pass theirs down: a user's module may use `axis_name`
            # for something else (a vmapped ensemble, a metrics pmean).
            if type(parent).__module__.startswith("flax_attn.") and getattr(parent, "axis_name", None) is not None:
                return parent.axis_name, getattr(parent, "axis_index_groups", None)
            parent = parent.parent
        return None, None


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` defaults: eps 1e-5 and the exact (two-pass) variance."""

    epsilon: float = 1e-5
    use_fast_variance: bool = False


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` defaults: eps 1e-5 and the exact (two-pass) variance."""

    epsilon: float = 1e-5
    use_fast_variance: bool = False
