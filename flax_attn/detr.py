"""DETR: the transformer, the positional encodings and the whole detector (Carion et al., arXiv 2005.12872).

Everything follows facebookresearch/detr (``models/transformer.py``, ``position_encoding.py``,
``backbone.py``, ``detr.py``), with two layout changes: sequences are batch-first
``(batch, length, d_model)`` (DETR's are ``(length, batch, d_model)``) and images are NHWC. Layouts
are converted at the boundary (the catalogue's torch adapters), never inside the modules; the
parameters themselves need no transposes beyond the generic Linear/Conv ones, so the released
``detr-r50`` state dict loads with :func:`flax_attn.convert.from_torch`.

The transformer layers also load ``torch.nn.TransformerEncoderLayer`` /
``TransformerDecoderLayer`` state dicts (same key names); use ``normalize_before=True`` for
``norm_first=True`` and leave ``pos``/``query_pos`` out.

Padding masks follow torch: True = padded. A fully padded image gives zeros from the attention
instead of PyTorch's NaN (see :func:`flax_attn.ops.scaled_dot_product_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn import backbones
from flax_attn.attention import MultiheadAttention
from flax_attn.convert.engine import Stacked, sequential_rules
from flax_attn.layers import BlockFields, Conv, LayerNorm, Linear, merge_train, torch_default_kernel_init
from flax_attn.ops.checks import check_channels, check_divisible, check_rank
from flax_attn.ops.dtypes import compute_dtype, statistics_dtype
from flax_attn.ops.max_pool import max_pool
from flax_attn.ops.position import sine_position_embedding
from flax_attn.ops.resize import interpolate

__all__ = [
    "DETR",
    "MLP",
    "Backbone",
    "Bottleneck",
    "FrozenBatchNorm2d",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "ResNetBody",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]

Dtype = Any

_ACTIVATIONS = ("relu", "gelu", "glu")


# --------------------------------------------------------------------------- checks and helpers


def _check_layer_config(where: str, d_model: int, nhead: int, dim_feedforward: int, activation: str) -> None:
    check_divisible(where, "d_model", d_model, "nhead", nhead)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{where}: unknown `activation` {activation!r}; expected one of {list(_ACTIVATIONS)}")
    if activation == "glu" and dim_feedforward % 2:
        raise ValueError(
            f"{where}: activation 'glu' halves the feed-forward width, so `dim_feedforward` "
            f"must be even, got {dim_feedforward}"
        )


def _check_shape(where: str, name: str, x, expected: tuple[int, ...], meaning: str) -> None:
    if x is not None and tuple(jnp.shape(x)) != tuple(expected):
        raise ValueError(f"{where}: `{name}` must have shape {tuple(expected)} {meaning}, got {tuple(jnp.shape(x))}")


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "relu":
        return nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)  # torch's F.gelu is the exact erf form
    a, gate = jnp.split(x, 2, axis=-1)  # F.glu: first half gated by the sigmoid of the second
    return a * jax.nn.sigmoid(gate)


def _with_pos(x, pos):
    return x if pos is None else x + pos


def _feed_forward(layer: nn.Module, x: jax.Array, train: bool) -> jax.Array:
    """``linear2(dropout(activation(linear1(x))))``, with ``linear1``/``linear2`` in ``layer``'s scope."""
    kw = dict(dtype=layer.dtype, param_dtype=layer.param_dtype, kernel_init=layer.kernel_init)
    h = _activation(layer.activation, Linear(layer.dim_feedforward, name="linear1", **kw)(x))
    h = nn.Dropout(layer.dropout)(h, deterministic=not train)
    return Linear(layer.d_model, name="linear2", **kw)(h)


# --------------------------------------------------------------------------- transformer layers


class _TransformerLayerFields(BlockFields):
    """The arguments every transformer layer and layer stack here takes, declared once (documented
    on :class:`TransformerEncoderLayer`); the stacks hand them to their layers with :meth:`layer_fields`."""

    d_model: int
    nhead: int
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    normalize_before: bool = False
    layer_norm_eps: float = 1e-5
    kernel_init: Callable = torch_default_kernel_init

    @nn.nowrap
    def layer_fields(self) -> dict[str, Any]:
        return dict(
            d_model=self.d_model,
            nhead=self.nhead,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            activation=self.activation,
            normalize_before=self.normalize_before,
            layer_norm_eps=self.layer_norm_eps,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    # The layers' parts, built in the calling layer's scope under torch's attribute names.

    @nn.nowrap
    def _attention(self, name: str, dtype: Dtype) -> MultiheadAttention:
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        return MultiheadAttention(self.d_model, self.nhead, dropout=self.dropout, name=name, **kw)

    @nn.nowrap
    def _norm(self, name: str, dtype: Dtype) -> LayerNorm:
        # ``dtype``: the caller's compute dtype (compute_dtype of its inputs), not the field, which may be None.
        return LayerNorm(epsilon=self.layer_norm_eps, name=name, dtype=dtype, param_dtype=self.param_dtype)

    @nn.nowrap
    def _drop(self, x: jax.Array, train: bool) -> jax.Array:
        return nn.Dropout(self.dropout)(x, deterministic=not train)


def _attend(attn: MultiheadAttention, query, key, value, key_padding_mask, attn_mask, train: bool) -> jax.Array:
    """The attention output alone (DETR never asks for the weights)."""
    return attn(
        query,
        key,
        value,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        need_weights=False,
        train=train,
    )[0]


class TransformerEncoderLayer(_TransformerLayerFields):
    """DETR's transformer encoder layer: self-attention and a feed-forward block, post- or pre-norm.

    Positional embeddings ``pos`` are added to the queries and keys of the self-attention, not to
    its values. Post-norm (default, as in DETR): ``x = norm(x + dropout(sublayer(x)))``; pre-norm
    (``normalize_before``): ``x = x + dropout(sublayer(norm(x)))``.

    Attributes:
      d_model: model width; must be divisible by ``nhead``.
      nhead: attention heads.
      dim_feedforward: hidden width of the feed-forward block (halved by ``glu``).
      dropout: dropout on attention weights, feed-forward hidden units and residual branches
        (active with ``train=True``, rng stream ``"dropout"``).
      activation: ``"relu"``, ``"gelu"`` (exact erf) or ``"glu"``.
      normalize_before: pre-norm (``torch.nn``'s ``norm_first``).
      layer_norm_eps: LayerNorm epsilon (1e-5).
      kernel_init: init of ``linear1``/``linear2`` (torch's default; DETR's ``Transformer`` uses
        Xavier-uniform).

    Call: ``(src (B, L, d_model), src_mask=None, src_key_padding_mask=None (B, L) bool,
    pos=None (B, L, d_model), train=None)`` -> ``(B, L, d_model)``. ``src_mask`` is torch's
    ``attn_mask``: ``(L, L)`` or ``(B * nhead, L, L)``, bool (True = not allowed) or float (added).

    Example:
      >>> layer = TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64)
      >>> x = jnp.ones((2, 10, 32))
      >>> variables = layer.init(jax.random.PRNGKey(0), x)
      >>> layer.apply(variables, x).shape
      (2, 10, 32)
    """

    torch_layouts: ClassVar[tuple[str, ...]] = ("official", "torch.nn")

    @nn.compact
    def __call__(self, src, src_mask=None, src_key_padding_mask=None, pos=None, train: bool | None = None):
        train = merge_train(self, train)
        where = "TransformerEncoderLayer"
        dtype = compute_dtype(where, self.dtype, src=src, pos=pos)
        src = src.astype(dtype)
        _check_layer_config(where, self.d_model, self.nhead, self.dim_feedforward, self.activation)
        check_rank(where, "src", src, 3, "(batch, length, d_model)")
        check_channels(where, "src", src, self.d_model)
        b, l, _ = src.shape
        _check_shape(where, "pos", pos, src.shape, "(like `src`)")
        _check_shape(where, "src_key_padding_mask", src_key_padding_mask, (b, l), "(batch, length)")
        attn, norm1, norm2 = self._attention("self_attn", dtype), self._norm("norm1", dtype), self._norm("norm2", dtype)

        def drop(x):
            return self._drop(x, train)

        def self_attention(x):
            qk = _with_pos(x, pos)
            return _attend(attn, qk, qk, x, src_key_padding_mask, src_mask, train)

        def feed_forward(x):
            return _feed_forward(self, x, train)

        if self.normalize_before:
            src = src + drop(self_attention(norm1(src)))
            return src + drop(feed_forward(norm2(src)))
        src = norm1(src + drop(self_attention(src)))
        return norm2(src + drop(feed_forward(src)))


class TransformerDecoderLayer(_TransformerLayerFields):
    """DETR's transformer decoder layer: self-attention, cross-attention to ``memory``, feed-forward.

    ``query_pos`` is added to the queries and keys of the self-attention and to the queries of the
    cross-attention; ``pos`` to the keys of the cross-attention (never to values). Post- or pre-norm
    as :class:`TransformerEncoderLayer`.

    Attributes:
      As :class:`TransformerEncoderLayer`.

    Call: ``(tgt (B, Q, d_model), memory (B, S, d_model), tgt_mask=None, memory_mask=None,
    tgt_key_padding_mask=None (B, Q), memory_key_padding_mask=None (B, S), pos=None (B, S, d_model),
    query_pos=None (B, Q, d_model), train=None)`` -> ``(B, Q, d_model)``.

    Example:
      >>> layer = TransformerDecoderLayer(d_model=32, nhead=4, dim_feedforward=64)
      >>> tgt, memory = jnp.ones((2, 5, 32)), jnp.ones((2, 12, 32))
      >>> variables = layer.init(jax.random.PRNGKey(0), tgt, memory)
      >>> layer.apply(variables, tgt, memory).shape
      (2, 5, 32)
    """

    torch_layouts: ClassVar[tuple[str, ...]] = ("official", "torch.nn")

    @nn.compact
    def __call__(
        self,
        tgt,
        memory,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        pos=None,
        query_pos=None,
        train: bool | None = None,
    ):
        train = merge_train(self, train)
        where = "TransformerDecoderLayer"
        dtype = compute_dtype(where, self.dtype, tgt=tgt, memory=memory, pos=pos, query_pos=query_pos)
        tgt, memory = tgt.astype(dtype), memory.astype(dtype)
        _check_layer_config(where, self.d_model, self.nhead, self.dim_feedforward, self.activation)
        check_rank(where, "tgt", tgt, 3, "(batch, num_queries, d_model)")
        check_rank(where, "memory", memory, 3, "(batch, length, d_model)")
        check_channels(where, "tgt", tgt, self.d_model)
        check_channels(where, "memory", memory, self.d_model)
        b, q, _ = tgt.shape
        if memory.shape[0] != b:
            raise ValueError(
                f"{where}: `memory` batch {memory.shape[0]} differs from `tgt` batch {b} "
                f"(tgt {tgt.shape}, memory {memory.shape})"
            )
        s = memory.shape[1]
        _check_shape(where, "query_pos", query_pos, tgt.shape, "(like `tgt`)")
        _check_shape(where, "pos", pos, memory.shape, "(like `memory`)")
        _check_shape(where, "tgt_key_padding_mask", tgt_key_padding_mask, (b, q), "(batch, num_queries)")
        _check_shape(where, "memory_key_padding_mask", memory_key_padding_mask, (b, s), "(batch, length)")
        self_attn, cross_attn = self._attention("self_attn", dtype), self._attention("multihead_attn", dtype)
        norm1, norm2, norm3 = (self._norm(f"norm{i}", dtype) for i in (1, 2, 3))

        def drop(x):
            return self._drop(x, train)

        def sa(x):
            qk = _with_pos(x, query_pos)
            return _attend(self_attn, qk, qk, x, tgt_key_padding_mask, tgt_mask, train)

        def ca(x):
            q, k = _with_pos(x, query_pos), _with_pos(memory, pos)
            return _attend(cross_attn, q, k, memory, memory_key_padding_mask, memory_mask, train)

        if self.normalize_before:
            tgt = tgt + drop(sa(norm1(tgt)))
            tgt = tgt + drop(ca(norm2(tgt)))
            return tgt + drop(_feed_forward(self, norm3(tgt), train))
        tgt = norm1(tgt + drop(sa(tgt)))
        tgt = norm2(tgt + drop(ca(tgt)))
        return norm3(tgt + drop(_feed_forward(self, tgt, train)))


class _EncoderLayerStep(TransformerEncoderLayer):
    """One ``nn.scan`` step of :class:`TransformerEncoder`: ``(carry, broadcast args) -> (carry, None)``."""

    def __call__(self, src, src_mask, src_key_padding_mask, pos, train):
        return super().__call__(src, src_mask, src_key_padding_mask, pos, train), None


class _DecoderLayerStep(TransformerDecoderLayer):
    """One ``nn.scan`` step of :class:`TransformerDecoder`; the per-layer outputs are stacked."""

    def __call__(self, tgt, memory, tgt_mask, memory_mask, tgt_kpm, memory_kpm, pos, query_pos, train):
        out = super().__call__(tgt, memory, tgt_mask, memory_mask, tgt_kpm, memory_kpm, pos, query_pos, train)
        return out, out


def _scan(step: type[nn.Module], length: int):
    # Parameters and dropout masks differ per layer; every argument but the carry is shared.
    return nn.scan(
        step,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=length,
    )


class TransformerEncoder(_TransformerLayerFields, kw_only=True):
    """DETR's ``TransformerEncoder``: ``num_layers`` encoder layers and an optional final LayerNorm.

    Attributes:
      num_layers: encoder layers (``layers.N`` in the state dict).
      norm: final LayerNorm (``norm.*``); ``None`` = as DETR's ``Transformer`` builds it, i.e. only
        in pre-norm mode.
      d_model, nhead, dim_feedforward, dropout, activation, normalize_before, layer_norm_eps,
        kernel_init: of every :class:`TransformerEncoderLayer`.
      scan_layers: run the layers as one ``nn.scan`` (compiled once, however deep): their
        parameters are stacked along a leading layer axis (``params["layers"]``), and the converter
        maps them to and from PyTorch's ``layers.0.*``, ``layers.1.*``, ... all the same.

    Call: ``(src (B, L, d_model), mask=None, src_key_padding_mask=None (B, L), pos=None,
    train=None)`` -> ``(B, L, d_model)``.

    Example:
      >>> enc = TransformerEncoder(num_layers=2, d_model=32, nhead=4, dim_feedforward=64)
      >>> x = jnp.ones((2, 10, 32))
      >>> enc.apply(enc.init(jax.random.PRNGKey(0), x), x).shape
      (2, 10, 32)
    """

    num_layers: int
    norm: bool | None = None
    scan_layers: bool = False

    @nn.nowrap
    def torch_rules(self, layout):
        return [Stacked("layers")] if self.scan_layers else sequential_rules("layers")

    @nn.compact
    def __call__(self, src, mask=None, src_key_padding_mask=None, pos=None, train: bool | None = None):
        train = merge_train(self, train)
        dtype = compute_dtype("TransformerEncoder", self.dtype, src=src, pos=pos)
        out = src.astype(dtype)
        args = (mask, src_key_padding_mask, pos, train)  # every layer's, in its positional order
        if self.scan_layers:
            stack = _scan(_EncoderLayerStep, self.num_layers)(**self.layer_fields(), name="layers")
            out, _ = stack(out, *args)
        for i in range(0 if self.scan_layers else self.num_layers):
            out = TransformerEncoderLayer(**self.layer_fields(), name=f"layers_{i}")(out, *args)
        use_norm = self.normalize_before if self.norm is None else self.norm
        if use_norm:
            out = self._norm("norm", dtype)(out)
        return out


class TransformerDecoder(_TransformerLayerFields, kw_only=True):
    """DETR's ``TransformerDecoder``: ``num_layers`` decoder layers, a final LayerNorm, and the stack.

    The output always has a leading layer axis, as DETR's: with ``return_intermediate`` it is the
    normed output of every layer ``(num_layers, B, Q, d_model)`` (the last one normed once), else
    the normed final output ``(1, B, Q, d_model)``.

    Attributes:
      num_layers: decoder layers (``layers.N``).
      norm: final LayerNorm (``norm.*``; DETR always has one); ``return_intermediate`` needs it.
      return_intermediate: stack every layer's normed output (DETR's auxiliary losses).
      d_model, nhead, ...: of every :class:`TransformerDecoderLayer`.
      scan_layers: one ``nn.scan`` over the layers, parameters stacked along a leading layer axis,
        as :class:`TransformerEncoder`'s.

    Call: as :class:`TransformerDecoderLayer`.

    Example:
      >>> dec = TransformerDecoder(num_layers=2, d_model=32, nhead=4, dim_feedforward=64,
      ...                          return_intermediate=True)
      >>> tgt, memory = jnp.zeros((2, 5, 32)), jnp.ones((2, 12, 32))
      >>> dec.apply(dec.init(jax.random.PRNGKey(0), tgt, memory), tgt, memory).shape
      (2, 2, 5, 32)
    """

    num_layers: int
    norm: bool = True
    return_intermediate: bool = False
    scan_layers: bool = False

    @nn.nowrap
    def torch_rules(self, layout):
        return [Stacked("layers")] if self.scan_layers else sequential_rules("layers")

    @nn.compact
    def __call__(
        self,
        tgt,
        memory,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        pos=None,
        query_pos=None,
        train: bool | None = None,
    ):
        train = merge_train(self, train)
        if self.return_intermediate and not self.norm:
            raise ValueError("TransformerDecoder: `return_intermediate=True` needs the final norm (`norm=True`)")
        dtype = compute_dtype("TransformerDecoder", self.dtype, tgt=tgt, memory=memory, pos=pos, query_pos=query_pos)
        norm = None
        if self.norm:
            norm = self._norm("norm", dtype)
        out = tgt.astype(dtype)
        # Every layer's arguments after (tgt, memory), in its positional order.
        args = (tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, pos, query_pos, train)
        if self.scan_layers:
            stack = _scan(_DecoderLayerStep, self.num_layers)(**self.layer_fields(), name="layers")
            out, every = stack(out, memory, *args)
            if self.return_intermediate:
                return norm(every)  # LayerNorm acts on the last axis: the same as per layer
            return (out if norm is None else norm(out))[None]
        intermediate = []
        for i in range(self.num_layers):
            out = TransformerDecoderLayer(**self.layer_fields(), name=f"layers_{i}")(out, memory, *args)
            if self.return_intermediate:
                intermediate.append(norm(out))
        if norm is not None and not self.return_intermediate:
            out = norm(out)
        if self.return_intermediate:
            return jnp.stack(intermediate)
        return out[None]


class Transformer(BlockFields):
    """DETR's encoder-decoder transformer over a feature map.

    The feature map is flattened to ``H * W`` tokens; the decoder starts from zeros and adds the
    learned ``query_embed`` as ``query_pos`` in every layer. The encoder has a final norm only in
    pre-norm mode; the decoder always has one. As in DETR, every >1-D parameter of the linear
    layers is Xavier-uniform initialised (``out_proj`` of the attentions keeps torch's default).

    Attributes:
      d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
      normalize_before, return_intermediate_dec: DETR's names and defaults (512, 8, 6, 6, 2048, 0.1,
      "relu", False, False); DETR's detector uses ``d_model=256`` and ``return_intermediate_dec=True``.
      scan_layers: the encoder and decoder stacks as ``nn.scan``s (see :class:`TransformerEncoder`).

    Call: ``(src (B, H, W, d_model), mask (B, H, W) bool True = padded, query_embed (Q, d_model),
    pos_embed (B, H, W, d_model), train=None)`` -> ``(hs, memory)``: the decoder stack
    ``(num_decoder_layers or 1, B, Q, d_model)`` and the encoder output ``(B, H, W, d_model)``.

    Example:
      >>> tr = Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2,
      ...                  dim_feedforward=64, return_intermediate_dec=True)
      >>> src, pos = jnp.ones((2, 5, 7, 32)), jnp.zeros((2, 5, 7, 32))
      >>> mask, queries = jnp.zeros((2, 5, 7), bool), jnp.ones((10, 32))
      >>> variables = tr.init(jax.random.PRNGKey(0), src, mask, queries, pos)
      >>> hs, memory = tr.apply(variables, src, mask, queries, pos)
      >>> hs.shape, memory.shape
      ((2, 2, 10, 32), (2, 5, 7, 32))
    """

    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    normalize_before: bool = False
    return_intermediate_dec: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, src, mask, query_embed, pos_embed, train: bool | None = None):
        train = merge_train(self, train)
        where = "Transformer"
        dtype = compute_dtype(where, self.dtype, src=src, query_embed=query_embed, pos_embed=pos_embed)
        _check_layer_config(where, self.d_model, self.nhead, self.dim_feedforward, self.activation)
        check_rank(where, "src", src, 4, "(batch, height, width, d_model)")
        check_channels(where, "src", src, self.d_model)
        b, h, w, c = src.shape
        _check_shape(where, "mask", mask, (b, h, w), "(batch, height, width) like `src`")
        _check_shape(where, "pos_embed", pos_embed, src.shape, "(like `src`)")
        check_rank(where, "query_embed", query_embed, 2, "(num_queries, d_model)")
        check_channels(where, "query_embed", query_embed, self.d_model)
        common = dict(
            d_model=self.d_model,
            nhead=self.nhead,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            activation=self.activation,
            normalize_before=self.normalize_before,
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=dtype,
            param_dtype=self.param_dtype,
            scan_layers=self.scan_layers,
        )
        src = src.reshape(b, h * w, c)
        pos = pos_embed.reshape(b, h * w, c)
        kpm = jnp.asarray(mask, jnp.bool_).reshape(b, h * w)
        query_pos = jnp.broadcast_to(query_embed[None], (b, *query_embed.shape))
        tgt = jnp.zeros_like(query_pos)
        memory = TransformerEncoder(num_layers=self.num_encoder_layers, name="encoder", **common)(
            src, src_key_padding_mask=kpm, pos=pos, train=train
        )
        hs = TransformerDecoder(
            num_layers=self.num_decoder_layers,
            norm=True,
            return_intermediate=self.return_intermediate_dec,
            name="decoder",
            **common,
        )(tgt, memory, memory_key_padding_mask=kpm, pos=pos, query_pos=query_pos, train=train)
        return hs, memory.reshape(b, h, w, c)


# --------------------------------------------------------------------------- position encodings


class PositionEmbeddingSine(nn.Module):
    """DETR's fixed sine position encoding of a padded image batch (no parameters).

    Attributes:
      num_pos_feats: channels per axis (output ``2 * num_pos_feats``; DETR uses ``hidden_dim // 2``).
      temperature: frequency base (10000).
      normalize: divide the valid-pixel counts by the image's extent and multiply by ``scale``
        (DETR's detector uses True).
      scale: default ``2 * pi``; may only be given with ``normalize=True``.
      dtype: output dtype (``None``: ``x``'s floating dtype); the encoding itself is computed in
        float32 as DETR does, then cast.

    Call: ``(x (B, H, W, C), mask (B, H, W) bool True = padded, train=None)`` ->
    ``(B, H, W, 2 * num_pos_feats)`` in the compute dtype (``x`` gives the shape and the dtype).

    Example:
      >>> pe = PositionEmbeddingSine(num_pos_feats=16, normalize=True)
      >>> x, mask = jnp.ones((2, 5, 7, 3)), jnp.zeros((2, 5, 7), bool)
      >>> pe.apply({}, x, mask).shape
      (2, 5, 7, 32)
    """

    num_pos_feats: int = 64
    temperature: float = 10000
    normalize: bool = False
    scale: float | None = None

    torch_layouts: ClassVar[tuple[str, ...]] = ("official",)
    dtype: Dtype | None = None

    train: bool | None = None

    @nn.compact
    def __call__(self, x, mask, train: bool | None = None):
        train = merge_train(self, train)
        where = "PositionEmbeddingSine"
        dtype = _position_dtype(self.dtype, x)
        if self.scale is not None and not self.normalize:
            raise ValueError(f"{where}: `normalize` should be True if `scale` is passed")
        check_rank(where, "x", x, 4, "(batch, height, width, channels)")
        _check_shape(where, "mask", mask, x.shape[:3], "(batch, height, width) like `x`")
        scale = 2 * math.pi if self.scale is None else self.scale
        pos = sine_position_embedding(mask, self.num_pos_feats, self.temperature, self.normalize, scale)
        return pos.astype(dtype)


def _position_dtype(dtype, x) -> jnp.dtype:
    """The position encodings read only the shape of ``x``, so an integer ``x`` is allowed; a
    floating one gives the compute dtype when ``dtype`` is ``None`` (else float32)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(jnp.float32)


def _first_rows(embed: nn.Embed, n: int) -> jax.Array:
    """Rows ``0..n-1`` of an ``nn.Embed`` table in its compute dtype, as a static slice.

    ``embed(jnp.arange(n))`` is the same values through a gather, whose gradient is a scatter-add
    (a serial loop on XLA:CPU and TPU); the slice's gradient is a pad.
    """
    (table,) = embed.promote_dtype(embed.embedding, dtype=embed.dtype, inexact=False)
    return table[:n]


class PositionEmbeddingLearned(BlockFields):
    """DETR's learned absolute position embedding: ``row_embed``/``col_embed`` tables of 50 positions.

    Output channel ``[:num_pos_feats]`` is the column embedding, ``[num_pos_feats:]`` the row
    embedding, as in DETR. Both tables are initialised U(0, 1).

    Attributes:
      num_pos_feats: channels per axis (default 256).

    Call: ``(x (B, H, W, C), mask=None, train=None)`` with ``H, W <= 50`` ->
    ``(B, H, W, 2 * num_pos_feats)``. ``mask`` is accepted (and ignored) so that both encodings
    take the same arguments.

    Example:
      >>> pe = PositionEmbeddingLearned(num_pos_feats=8)
      >>> x = jnp.ones((2, 5, 7, 3))
      >>> pe.apply(pe.init(jax.random.PRNGKey(0), x), x).shape
      (2, 5, 7, 16)
    """

    num_pos_feats: int = 256

    @nn.compact
    def __call__(self, x, mask=None, train: bool | None = None):
        train = merge_train(self, train)
        where = "PositionEmbeddingLearned"
        dtype = _position_dtype(self.dtype, x)
        check_rank(where, "x", x, 4, "(batch, height, width, channels)")
        b, h, w, _ = x.shape
        if h > 50 or w > 50:
            raise ValueError(f"{where}: the tables hold 50 rows/columns; got a {h}x{w} feature map (x {x.shape})")
        init = nn.initializers.uniform(1.0)
        kw = dict(embedding_init=init, dtype=dtype, param_dtype=self.param_dtype)
        x_emb = _first_rows(nn.Embed(50, self.num_pos_feats, name="col_embed", **kw), w)
        y_emb = _first_rows(nn.Embed(50, self.num_pos_feats, name="row_embed", **kw), h)
        pos = jnp.concatenate(
            [
                jnp.broadcast_to(x_emb[None], (h, w, self.num_pos_feats)),
                jnp.broadcast_to(y_emb[:, None], (h, w, self.num_pos_feats)),
            ],
            axis=-1,
        )
        return jnp.broadcast_to(pos[None], (b, h, w, 2 * self.num_pos_feats))


# --------------------------------------------------------------------------- backbone


class FrozenBatchNorm2d(nn.Module):
    """DETR's ``FrozenBatchNorm2d``: BatchNorm with fixed statistics *and* fixed affine parameters.

    All four tensors are torch buffers (``weight``, ``bias``, ``running_mean``, ``running_var``; no
    ``num_batches_tracked``), so here they live in the ``batch_stats`` collection, which optimisers
    do not touch, and are never updated (``train`` changes nothing). ``y = x * s + (b - mean * s)``
    with ``s = weight * rsqrt(var + eps)``, computed in float32 (float64 for float64 inputs).

    Attributes:
      eps: 1e-5 (DETR adds it inside the rsqrt).
    """

    eps: float = 1e-5
    dtype: Dtype | None = None
    train: bool | None = None

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train = merge_train(self, train)
        c = x.shape[-1]
        weight = self.variable("batch_stats", "weight", lambda: jnp.ones((c,), jnp.float32)).value
        bias = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), jnp.float32)).value
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)).value
        var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32)).value
        sdt = statistics_dtype(x.dtype)
        scale = weight.astype(sdt) * jax.lax.rsqrt(var.astype(sdt) + self.eps)
        shift = bias.astype(sdt) - mean.astype(sdt) * scale
        return (x.astype(sdt) * scale + shift).astype(self.dtype or x.dtype)


def _frozen_norm(*, name: str, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32) -> FrozenBatchNorm2d:
    """The backbone blocks' norm: :class:`FrozenBatchNorm2d`, whose four float32 torch buffers take no
    ``param_dtype``."""
    del param_dtype
    return FrozenBatchNorm2d(dtype=dtype, name=name)


class Bottleneck(backbones.Bottleneck):
    """torchvision's ResNet v1.5 bottleneck block (stride on the 3x3 conv), with frozen BatchNorm:
    :class:`flax_attn.backbones.Bottleneck` with :class:`FrozenBatchNorm2d` as its norm.

    Attributes:
      inplanes: input channels.
      planes: width of the 1x1/3x3 convs; the output has ``4 * planes`` channels.
      stride: stride of ``conv2`` and of the ``downsample`` projection.
      dilation: dilation (and padding) of ``conv2``.
      downsample: project the identity with a strided 1x1 conv + norm (``downsample.0``/``.1``).
    """

    downsample: bool | None = False
    norm: Any = _frozen_norm


_RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class ResNetBody(BlockFields):
    """torchvision's ResNet-50/101 up to ``layer4`` with frozen BatchNorm: DETR's ``backbone.0.body``.

    The stem (``conv1`` 7x7/2, ``bn1``, ReLU, 3x3/2 max-pool) and four stages of bottlenecks
    (``layerN.M``), output stride 32 (16 with ``dilation``, DETR's DC5 models).

    Attributes:
      layers: blocks per stage ((3, 4, 6, 3) is ResNet-50).
      dilation: replace the stride of ``layer4`` with dilation 2 (``replace_stride_with_dilation``).

    Call: ``(x (B, H, W, 3), train=None)`` -> ``(B, ceil(H/32), ceil(W/32), 2048)`` (roughly;
    the exact size follows the strided convs' arithmetic).
    """

    layers: tuple[int, ...] = (3, 4, 6, 3)
    dilation: bool = False

    torch_sequential: ClassVar[tuple[str, ...]] = (r"layer\d",)

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train = merge_train(self, train)
        check_rank("ResNetBody", "x", x, 4, "(batch, height, width, 3)")
        check_channels("ResNetBody", "x", x, 3)
        kw = self.precision()
        x = Conv(64, 7, stride=2, padding=3, use_bias=False, name="conv1", **kw)(x)
        x = nn.relu(FrozenBatchNorm2d(dtype=self.dtype, name="bn1")(x))
        x = max_pool(x, 3, 2, 1)
        inplanes, cur_dilation = 64, 1
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers), start=1):
            stride = 1 if stage == 1 else 2
            previous_dilation = cur_dilation
            if stage == 4 and self.dilation:
                cur_dilation *= stride
                stride = 1
            for i in range(blocks):
                first = i == 0
                x = Bottleneck(
                    inplanes=inplanes,
                    planes=planes,
                    stride=stride if first else 1,
                    dilation=previous_dilation if first else cur_dilation,
                    downsample=first and (stride != 1 or inplanes != planes * 4),
                    name=f"layer{stage}_{i}",
                    **kw,
                )(x)
                inplanes = planes * 4
        return x


class Backbone(BlockFields):
    """DETR's ``Backbone`` for detection: the ResNet body and the padding mask at its resolution.

    The mask is resized to the feature map with nearest interpolation, exactly as DETR's
    ``F.interpolate(m[None].float(), size=...)``.

    Attributes:
      backbone: ``"resnet50"`` or ``"resnet101"`` (DETR's ``--backbone``).
      dilation: DC5 variant (DETR's ``--dilation``).

    Call: ``(x (B, H, W, 3), mask (B, H, W) bool, train=None)`` -> ``(features (B, h, w, 2048),
    mask (B, h, w) bool)``.
    """

    backbone: str = "resnet50"
    dilation: bool = False

    num_channels: ClassVar[int] = 2048

    @nn.compact
    def __call__(self, x, mask, train: bool | None = None):
        train = merge_train(self, train)
        if self.backbone not in _RESNET_LAYERS:
            raise ValueError(f"Backbone: unknown `backbone` {self.backbone!r}; expected one of {list(_RESNET_LAYERS)}")
        check_rank("Backbone", "x", x, 4, "(batch, height, width, 3)")
        _check_shape("Backbone", "mask", mask, x.shape[:3], "(batch, height, width) like `x`")
        feats = ResNetBody(
            layers=_RESNET_LAYERS[self.backbone],
            dilation=self.dilation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="body",
        )(x, train=train)
        m = interpolate(jnp.asarray(mask, jnp.float32)[..., None], size=feats.shape[1:3], mode="nearest")
        return feats, m[..., 0].astype(jnp.bool_)


# --------------------------------------------------------------------------- DETR


class MLP(BlockFields):
    """DETR's ``MLP``: ``num_layers`` Linear layers with ReLU between them (``layers.N``).

    Attributes:
      hidden_dim, output_dim, num_layers: as DETR's ``MLP(input_dim, hidden_dim, output_dim, num_layers)``
        (the input width comes from the input).
    """

    hidden_dim: int
    output_dim: int
    num_layers: int

    torch_sequential: ClassVar[tuple[str, ...]] = ("layers",)

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train = merge_train(self, train)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = Linear(
                self.output_dim if last else self.hidden_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"layers_{i}",
            )(x)
            if not last:
                x = nn.relu(x)
        return x


class DETR(BlockFields):
    """DETR object detector (Carion et al., ECCV 2020, arXiv 2005.12872), for inference and fine-tuning.

    ResNet backbone with frozen BatchNorm -> 1x1 ``input_proj`` to ``hidden_dim`` -> transformer
    with sine (or learned) positional encodings and ``num_queries`` learned object queries ->
    ``class_embed`` (``num_classes + 1`` logits, the last is "no object") and ``bbox_embed``
    (3-layer MLP, sigmoid: normalised ``(cx, cy, w, h)``) on every decoder layer's output.

    Constructor arguments are those of DETR's ``main.py`` (``hidden_dim``, ``nheads``,
    ``enc_layers``...), with its defaults (the released ``detr-r50``: 91 classes, 100 queries,
    hidden 256). Variables load from the official checkpoints' state dict
    (``backbone.0.body.*``, ``backbone.1.*`` for learned encodings, ``transformer.*``,
    ``input_proj``, ``query_embed.weight``, ``class_embed``, ``bbox_embed.layers.N``).

    Attributes:
      num_classes: object classes (COCO: 91, i.e. max id + 1).
      num_queries: detection slots.
      aux_loss: also return ``aux_outputs``, the predictions of every earlier decoder layer.
      backbone: ``"resnet50"`` or ``"resnet101"``.
      dilation: DC5 backbone.
      position_embedding: ``"sine"`` or ``"learned"``.
      hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout, pre_norm: transformer.

    Call: ``(samples (B, H, W, 3), mask=None (B, H, W) bool True = padded, train=None)`` ->
    ``{"pred_logits": (B, Q, num_classes + 1), "pred_boxes": (B, Q, 4), "aux_outputs": [...]}``.

    Example:
      >>> model = DETR(num_classes=5, num_queries=4, hidden_dim=32, nheads=4, enc_layers=1,
      ...              dec_layers=2, dim_feedforward=64)
      >>> x = jnp.ones((1, 64, 64, 3))
      >>> out = model.apply(model.init(jax.random.PRNGKey(0), x), x)
      >>> out["pred_logits"].shape, out["pred_boxes"].shape, len(out["aux_outputs"])
      ((1, 4, 6), (1, 4, 4), 1)
    """

    num_classes: int = 91
    num_queries: int = 100
    aux_loss: bool = True
    backbone: str = "resnet50"
    dilation: bool = False
    position_embedding: str = "sine"
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False

    torch_sequential: ClassVar[tuple[str, ...]] = ("backbone",)

    @nn.compact
    def __call__(self, samples, mask=None, train: bool | None = None):
        train = merge_train(self, train)
        where = "DETR"
        samples = samples.astype(compute_dtype(where, self.dtype, samples=samples))
        check_rank(where, "samples", samples, 4, "(batch, height, width, 3)")
        check_channels(where, "samples", samples, 3)
        if mask is None:
            mask = jnp.zeros(samples.shape[:3], jnp.bool_)
        _check_shape(where, "mask", mask, samples.shape[:3], "(batch, height, width) like `samples`")
        if self.position_embedding in ("v2", "sine"):
            pos_module = PositionEmbeddingSine(self.hidden_dim // 2, normalize=True, name="backbone_1")
        elif self.position_embedding in ("v3", "learned"):
            pos_module = PositionEmbeddingLearned(
                self.hidden_dim // 2, dtype=self.dtype, param_dtype=self.param_dtype, name="backbone_1"
            )
        else:
            raise ValueError(
                f"{where}: unknown `position_embedding` {self.position_embedding!r}; expected 'sine' or 'learned'"
            )
        # samples.dtype is the compute dtype: nn.Embed with dtype=None would return float32 queries.
        kw = dict(dtype=samples.dtype, param_dtype=self.param_dtype)
        feats, fmask = Backbone(backbone=self.backbone, dilation=self.dilation, name="backbone_0", **kw)(
            samples, mask, train=train
        )
        pos = pos_module(feats, fmask).astype(feats.dtype)
        src = Conv(self.hidden_dim, 1, name="input_proj", **kw)(feats)
        query_embed = _first_rows(
            nn.Embed(
                self.num_queries,
                self.hidden_dim,
                embedding_init=nn.initializers.normal(1.0),
                name="query_embed",
                **kw,
            ),
            self.num_queries,
        )
        hs, _ = Transformer(
            d_model=self.hidden_dim,
            nhead=self.nheads,
            num_encoder_layers=self.enc_layers,
            num_decoder_layers=self.dec_layers,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            normalize_before=self.pre_norm,
            return_intermediate_dec=True,
            name="transformer",
            **kw,
        )(src, fmask, query_embed, pos, train=train)
        outputs_class = Linear(self.num_classes + 1, name="class_embed", **kw)(hs)
        outputs_coord = jax.nn.sigmoid(
            MLP(hidden_dim=self.hidden_dim, output_dim=4, num_layers=3, name="bbox_embed", **kw)(hs)
        )
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])
            ]
        return out
