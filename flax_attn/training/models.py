"""Small models for the training library's own configs and tests, and the model registry.

The configs name models by import string (``"flax_attn.se:SEResNet"``), resolved only when a run
builds its model (:func:`build_model`), so a config can point at a block family that lives in
another module (or is not installed) without this package importing it. The models here are
deliberately small, built from :mod:`flax_attn.layers` and :class:`flax_attn.MultiheadAttention`,
so that every task trains to a meaningful result on one CPU in minutes:

* :class:`SmallSECNN`: a residual CNN with squeeze-and-excitation in every block, the default
  ``classify`` model until the catalogued SE-ResNet (``flax_attn.se``) is wired in.
* :class:`ConvMHA`: a conv stem followed by multi-head self-attention over the pixels.
* :class:`TinySR`: a few residual convs and a pixel-shuffle upsampler, the default ``superres``
  model until the catalogued A2N (``flax_attn.a2n``) is wired in.

Submodules are named after the attributes of an equivalent PyTorch module (``layer1.0.conv1``,
``se.fc.0``), with ``torch_rules`` for the dotted names, so ``--init-from`` can load a converted
PyTorch checkpoint; ``benchmarks/train_throughput.py`` holds that PyTorch equivalent.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn.attention import MultiheadAttention
from flax_attn.convert.engine import Rename, sequential_rules
from flax_attn.layers import BatchNorm, Conv, DtypeFields, LayerNorm, Linear
from flax_attn.ops import interpolate
from flax_attn.ops.checks import check_channels, check_rank
from flax_attn.se import SEBasicBlock

__all__ = ["ALIASES", "ConvMHA", "SmallSECNN", "TinySR", "build_model", "pixel_shuffle", "resolve"]

Dtype = Any

# Short names accepted in ``ModelConfig.name``. The catalogued models resolve lazily: they are
# only imported when a config asks for them.
ALIASES: dict[str, str] = {
    "small_se_cnn": "flax_attn.training.models:SmallSECNN",
    "conv_mha": "flax_attn.training.models:ConvMHA",
    "tiny_sr": "flax_attn.training.models:TinySR",
    "se_resnet": "flax_attn.se:SEResNet",
    "a2n": "flax_attn.a2n:A2N",
}


def resolve(name: str) -> type:
    """The class named by ``"package.module:Attr"`` or an alias in :data:`ALIASES`."""
    spec = ALIASES.get(name, name)
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise ValueError(f"model name {name!r} must be 'package.module:Class' or one of the aliases {sorted(ALIASES)}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"model {name!r}: cannot import {module_name!r} ({e})") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"model {name!r}: module {module_name!r} has no attribute {attr!r}") from None


def build_model(name: str, kwargs: dict[str, Any], *, dtype: Dtype | None = None) -> nn.Module:
    """Instantiate the model ``name`` with ``kwargs``; ``dtype`` is passed when the class takes one."""
    cls = resolve(name)
    kwargs = dict(kwargs)
    accepts_dtype = (
        "dtype" in {f.name for f in dataclasses.fields(cls)}
        if dataclasses.is_dataclass(cls)
        else "dtype" in inspect.signature(cls).parameters
    )
    if dtype is not None and accepts_dtype:
        kwargs.setdefault("dtype", dtype)
    for k, v in kwargs.items():
        if isinstance(v, list):  # configs round-trip through JSON, where tuples become lists
            kwargs[k] = tuple(v)
    return cls(**kwargs)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """``torch.nn.PixelShuffle(r)`` in NHWC: channel ``c*r*r + i*r + j`` -> pixel ``(h*r+i, w*r+j)``."""
    b, h, w, c = x.shape
    if c % (r * r):
        raise ValueError(f"pixel_shuffle: channels {c} (shape {x.shape}) must be divisible by r*r = {r * r}")
    x = x.reshape(b, h, w, c // (r * r), r, r)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


class SmallSECNN(DtypeFields):
    """A small SE-ResNet for small images (digits, CIFAR-sized inputs), built from the catalogued block.

    ``conv1``-``bn1``-ReLU stem (3x3, stride 1: an ImageNet 7x7/2 stem + max-pool would reduce 8x8
    digits to 2x2), then stages of :class:`flax_attn.se.SEBasicBlock` (official senet.pytorch
    layout) per entry of ``widths`` (the first at stride 1, the others at stride 2), global average
    pooling and ``fc``. State-dict keys: ``conv1``, ``bn1``, ``layer1.0.*`` (the SE-ResNet keys),
    ``fc``.

    Attributes:
      num_classes: logits.
      widths: channels of each stage.
      depths: blocks per stage (default one each).
      reduction: SE reduction ratio.
      in_chans: input channels.

    Input ``(B, H, W, in_chans)``; output ``(B, num_classes)`` logits.

    Example:
      >>> m = SmallSECNN(num_classes=10, widths=(16, 32))
      >>> v = m.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)))
      >>> m.apply(v, jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64)
    depths: Sequence[int] | None = None
    reduction: int = 4
    in_chans: int = 1

    torch_layouts: ClassVar[tuple[str, ...]] = ("official",)

    @nn.nowrap
    def torch_rules(self, layout):
        return sequential_rules(r"layer\d+")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_rank("SmallSECNN", "x", x, 4, "(batch, height, width, channels)")
        check_channels("SmallSECNN", "x", x, self.in_chans)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        depths = self.depths or (1,) * len(self.widths)
        x = Conv(self.widths[0], 3, 1, 1, use_bias=False, name="conv1", **kw)(x)
        x = nn.relu(BatchNorm(name="bn1", **kw)(x, train=train))
        for i, (w, d) in enumerate(zip(self.widths, depths)):
            for j in range(d):
                stride = 2 if i > 0 and j == 0 else 1
                x = SEBasicBlock(
                    inplanes=x.shape[-1],
                    planes=w,
                    stride=stride,
                    reduction=self.reduction,
                    se_style="senet",
                    name=f"layer{i + 1}_{j}",
                    **kw,
                )(x, train=train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return Linear(self.num_classes, name="fc", **kw)(x).astype(jnp.float32)


class ConvMHA(DtypeFields):
    """Conv stem + one pre-norm multi-head self-attention layer over the pixels + linear head.

    Attributes:
      num_classes: logits.
      embed_dim: channels of the stem and width of the attention.
      num_heads: attention heads.
      in_chans: input channels.

    Input ``(B, H, W, in_chans)``; output ``(B, num_classes)``.
    """

    num_classes: int = 10
    embed_dim: int = 32
    num_heads: int = 4
    in_chans: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_rank("ConvMHA", "x", x, 4, "(batch, height, width, channels)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.embed_dim, 3, 1, 1, use_bias=False, name="conv1", **kw)(x)
        x = nn.relu(BatchNorm(name="bn1", **kw)(x, train=train))
        b, h, w, c = x.shape
        t = x.reshape(b, h * w, c)
        y = LayerNorm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(t)
        y, _ = MultiheadAttention(self.embed_dim, self.num_heads, name="attn", **kw)(
            y, y, y, need_weights=False, train=train
        )
        t = t + y
        t = jnp.mean(t.astype(jnp.float32), axis=1)
        return Linear(self.num_classes, name="fc", **kw)(t).astype(jnp.float32)


class TinySR(DtypeFields):
    """A tiny super-resolution network: residual conv body + pixel-shuffle upsampler + image skip.

    ``conv_first`` -> ``num_blocks`` x (conv-ReLU-conv + identity) -> ``conv_body`` (+ skip) ->
    ``upconv`` to ``num_feat * scale**2`` channels -> pixel shuffle -> ReLU -> ``conv_last``; the
    input upsampled by ``upsample`` interpolation (torch-exact, see :func:`flax_attn.ops.interpolate`)
    is added, so the network learns the residual over plain interpolation, as A2N does.

    Attributes:
      scale: upscaling factor.
      num_feat: channels.
      num_blocks: residual blocks.
      in_nc: image channels (in and out).
      upsample: ``"nearest"`` or ``"bilinear"`` for the image skip.

    Input ``(B, H, W, in_nc)`` in [0, 1]; output ``(B, scale*H, scale*W, in_nc)``.
    """

    scale: int = 2
    num_feat: int = 32
    num_blocks: int = 3
    in_nc: int = 3
    upsample: str = "bilinear"

    @nn.nowrap
    def torch_rules(self, layout):
        return [Rename(r"body_(\d+)_(conv\d)\.(.*)", r"body.\1.\2.\3")]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_rank("TinySR", "x", x, 4, "(batch, height, width, channels)")
        check_channels("TinySR", "x", x, self.in_nc)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        nf = self.num_feat
        feat = Conv(nf, 3, 1, 1, name="conv_first", **kw)(x)
        body = feat
        for i in range(self.num_blocks):
            r = nn.relu(Conv(nf, 3, 1, 1, name=f"body_{i}_conv1", **kw)(body))
            body = body + Conv(nf, 3, 1, 1, name=f"body_{i}_conv2", **kw)(r)
        feat = feat + Conv(nf, 3, 1, 1, name="conv_body", **kw)(body)
        up = Conv(nf * self.scale**2, 3, 1, 1, name="upconv", **kw)(feat)
        up = nn.relu(pixel_shuffle(up, self.scale))
        out = Conv(self.in_nc, 3, 1, 1, name="conv_last", **kw)(up)
        mode = self.upsample
        skip = interpolate(x, scale_factor=self.scale, mode=mode, align_corners=False if mode == "bilinear" else None)
        return (out + skip.astype(out.dtype)).astype(jnp.float32)
