"""Multi-head attention: ``torch.nn.MultiheadAttention`` and the seed's separate-projection variant."""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attn.convert.engine import Rename
from flax_attn.layers import BlockFields, Linear, merge_train
from flax_attn.ops.attention import scaled_dot_product_attention
from flax_attn.ops.checks import check_divisible, check_rank
from flax_attn.ops.dtypes import compute_dtype

__all__ = ["MultiheadAttention", "ProjectedMultiHeadAttention"]


def _split_mask(where: str, name: str, mask, allow_when_true: bool, shape: tuple[int, ...]):
    """A torch-style mask as (bool keep-mask or None, float bias or None), broadcast to ``shape``."""
    if mask is None:
        return None, None
    mask = jnp.asarray(mask)
    try:
        mask = jnp.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(f"{where}: `{name}` of shape {mask.shape} does not broadcast to {shape}") from None
    if mask.dtype == jnp.bool_:
        return (mask if allow_when_true else ~mask), None
    if not jnp.issubdtype(mask.dtype, jnp.floating):
        raise ValueError(f"{where}: `{name}` must be bool or float, got dtype {mask.dtype}")
    return None, mask.astype(jnp.float32)


class MultiheadAttention(BlockFields):
    """``torch.nn.MultiheadAttention(batch_first=True)`` in Flax (Vaswani et al., arXiv 1706.03762).

    Attributes:
      embed_dim: model width E (query features and output features).
      num_heads: heads; must divide ``embed_dim``.
      dropout: dropout on the attention weights (active with ``train=True``, rng stream ``dropout``).
      bias: biases on the input and output projections.
      add_bias_kv: learnable ``bias_k``/``bias_v`` appended to the key/value sequence.
      add_zero_attn: append a zero key/value after ``bias_k``/``bias_v``.
      kdim, vdim: key/value feature sizes (default ``embed_dim``).

    Call: ``(query (B, L, E), key (B, S, kdim), value (B, S, vdim), key_padding_mask=None,
    need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False, train=None)``
    returns ``(output (B, L, E), weights)`` with weights ``(B, L, S)`` (averaged over heads),
    ``(B, num_heads, L, S)``, or ``None`` when ``need_weights=False``.

    Masks follow torch: ``key_padding_mask`` ``(B, S)`` and ``attn_mask`` ``(L, S)`` or
    ``(B * num_heads, L, S)``; boolean True means *not allowed*, a float mask is added. Unlike
    torch, a query whose keys are all masked gets zeros, not NaN (see
    :func:`flax_attn.ops.scaled_dot_product_attention`), and ``is_causal=True`` applies the
    causal mask itself rather than requiring ``attn_mask``.

    Parameters load from torch's state dict (``in_proj_weight`` split into ``q_proj``/``k_proj``/
    ``v_proj``, or ``q_proj_weight``... when ``kdim``/``vdim`` differ).

    Example:
      >>> mha = MultiheadAttention(embed_dim=32, num_heads=4)
      >>> x = jnp.ones((2, 7, 32))
      >>> variables = mha.init(jax.random.PRNGKey(0), x, x, x)
      >>> out, w = mha.apply(variables, x, x, x)
      >>> out.shape, w.shape
      ((2, 7, 32), (2, 7, 7))
    """

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    kdim: int | None = None
    vdim: int | None = None

    torch_layouts: ClassVar[tuple[str, ...]] = ("torch.nn",)

    @nn.nowrap
    def torch_rules(self, layout):
        fused = (self.kdim in (None, self.embed_dim)) and (self.vdim in (None, self.embed_dim))
        rules = []
        for i, p in enumerate("qkv"):
            target = f"in_proj_weight[{i}/3]" if fused else f"{p}_proj_weight"
            rules += [Rename(rf"{p}_proj\.weight", target), Rename(rf"{p}_proj\.bias", f"in_proj_bias[{i}/3]")]
        return rules

    @nn.compact
    def __call__(
        self,
        query: jax.Array,
        key: jax.Array | None = None,
        value: jax.Array | None = None,
        key_padding_mask: jax.Array | None = None,
        need_weights: bool = True,
        attn_mask: jax.Array | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        train: bool | None = None,
    ):
        train = merge_train(self, train)
        where = "MultiheadAttention"
        key = query if key is None else key
        value = key if value is None else value
        dtype = compute_dtype(where, self.dtype, query=query, key=key, value=value)
        query, key, value = query.astype(dtype), key.astype(dtype), value.astype(dtype)
        kdim = self.kdim or self.embed_dim
        vdim = self.vdim or self.embed_dim
        check_divisible(where, "embed_dim", self.embed_dim, "num_heads", self.num_heads)
        check_rank(where, "query", query, 3, "(batch, q_len, embed_dim)")
        check_rank(where, "key", key, 3, "(batch, kv_len, kdim)")
        check_rank(where, "value", value, 3, "(batch, kv_len, vdim)")
        for name, arr, dim in (("query", query, self.embed_dim), ("key", key, kdim), ("value", value, vdim)):
            if arr.shape[-1] != dim:
                raise ValueError(f"{where}: `{name}` must have {dim} features (last axis), got shape {arr.shape}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"{where}: batch/length mismatch: query {query.shape}, key {key.shape}, value {value.shape}"
            )
        e, h = self.embed_dim, self.num_heads
        b, l = query.shape[:2]
        # torch: xavier_uniform on the fused (3E, E) in_proj_weight, i.e. fan_avg = 2E per block.
        fused = kdim == e and vdim == e
        qkv_init = nn.initializers.variance_scaling(0.5 if fused else 1.0, "fan_avg", "uniform")
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=qkv_init, use_bias=self.bias)
        q = Linear(e, name="q_proj", **dense)(query)
        k = Linear(e, name="k_proj", **dense)(key)
        v = Linear(e, name="v_proj", **dense)(value)

        s = key.shape[1]
        attn_keep, attn_bias = _split_mask(
            where,
            "attn_mask",
            attn_mask,
            False,
            (b * h, l, s) if attn_mask is not None and jnp.ndim(attn_mask) == 3 else (l, s),
        )
        if attn_keep is not None:
            attn_keep = attn_keep.reshape(b, h, l, s) if attn_keep.ndim == 3 else attn_keep
        if attn_bias is not None:
            attn_bias = attn_bias.reshape(b, h, l, s) if attn_bias.ndim == 3 else attn_bias
        kpm_keep, kpm_bias = _split_mask(where, "key_padding_mask", key_padding_mask, False, (b, s))
        kpm_keep = None if kpm_keep is None else kpm_keep[:, None, None, :]
        kpm_bias = None if kpm_bias is None else kpm_bias[:, None, None, :]

        def extend(masks, keep_value):
            # One more key position (bias_k or the zero key): attendable, zero bias.
            out = []
            for m, fill in zip(masks, keep_value):
                if m is None:
                    out.append(None)
                else:
                    pad = [(0, 0)] * (m.ndim - 1) + [(0, 1)]
                    out.append(jnp.pad(m, pad, constant_values=fill))
            return out

        if self.add_bias_kv:
            init = nn.initializers.xavier_normal()
            bias_k = self.param("bias_k", init, (1, 1, e), self.param_dtype)
            bias_v = self.param("bias_v", init, (1, 1, e), self.param_dtype)
            k = jnp.concatenate([k, jnp.broadcast_to(bias_k.astype(k.dtype), (b, 1, e))], axis=1)
            v = jnp.concatenate([v, jnp.broadcast_to(bias_v.astype(v.dtype), (b, 1, e))], axis=1)
            attn_keep, attn_bias, kpm_keep, kpm_bias = extend(
                (attn_keep, attn_bias, kpm_keep, kpm_bias), (True, 0.0, True, 0.0)
            )
        if self.add_zero_attn:
            k = jnp.concatenate([k, jnp.zeros((b, 1, e), k.dtype)], axis=1)
            v = jnp.concatenate([v, jnp.zeros((b, 1, e), v.dtype)], axis=1)
            attn_keep, attn_bias, kpm_keep, kpm_bias = extend(
                (attn_keep, attn_bias, kpm_keep, kpm_bias), (True, 0.0, True, 0.0)
            )

        keep = None
        for m in (attn_keep, kpm_keep):
            if m is not None:
                keep = m if keep is None else keep & m
        bias = None
        for m in (attn_bias, kpm_bias):
            if m is not None:
                bias = m if bias is None else bias + m
        if is_causal:
            causal = jnp.tril(jnp.ones((l, k.shape[1]), jnp.bool_))
            keep = causal if keep is None else keep & causal

        hd = e // h
        rng = self.make_rng("dropout") if (train and self.dropout > 0.0) else None
        out, weights = scaled_dot_product_attention(
            q.reshape(b, l, h, hd),
            k.reshape(b, -1, h, hd),
            v.reshape(b, -1, h, hd),
            mask=keep,
            bias=bias,
            dropout_rate=self.dropout if rng is not None else 0.0,
            dropout_rng=rng,
            return_weights=True,
        )
        out = Linear(e, name="out_proj", use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype)(
            out.reshape(b, l, e)
        )
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = jnp.mean(weights.astype(jnp.float32), axis=1).astype(weights.dtype)
        return out, weights


class ProjectedMultiHeadAttention(BlockFields):
    """Multi-head attention with separate ``fc_q``/``fc_k``/``fc_v``/``fc_o`` projections.

    The seed's ``MultiHeadAttention(n_head, d_k, d_k_, d_v, d_v_, d_o)``: queries and keys of width
    ``d_k_`` are projected to ``n_head * d_k``, values of width ``d_v_`` to ``n_head * d_v``,
    attention is scaled by ``1 / sqrt(d_k)`` and the heads are mixed back by ``fc_o`` to ``d_o``.
    (The blog's code has typos, ``d_0``/``fc_0``; this is the evident intent.)

    Attributes:
      n_head, d_k, d_k_, d_v, d_v_, d_o: as in the reference.

    Call: ``(q (B, Nq, d_k_), k (B, Nk, d_k_), v (B, Nk, d_v_), mask=None)`` with an optional bool
    ``mask`` broadcastable to ``(B, Nq, Nk)`` (True = attend); returns ``(B, Nq, d_o)``.

    Example:
      >>> mha = ProjectedMultiHeadAttention(n_head=2, d_k=16, d_k_=8, d_v=16, d_v_=8, d_o=16)
      >>> q = jnp.ones((2, 5, 8))
      >>> out = mha.apply(mha.init(jax.random.PRNGKey(0), q, q, q), q, q, q)
      >>> jax.tree_util.tree_map(jnp.shape, out)
      (2, 5, 16)
    """

    n_head: int
    d_k: int
    d_k_: int
    d_v: int
    d_v_: int
    d_o: int

    torch_layouts: ClassVar[tuple[str, ...]] = ("seed",)

    @nn.compact
    def __call__(self, q, k, v, mask=None, train: bool | None = None):
        train = merge_train(self, train)
        where = "ProjectedMultiHeadAttention"
        dtype = compute_dtype(where, self.dtype, q=q, k=k, v=v)
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
        for name, arr, dim in (("q", q, self.d_k_), ("k", k, self.d_k_), ("v", v, self.d_v_)):
            check_rank(where, name, arr, 3, f"(batch, length, {dim})")
            if arr.shape[-1] != dim:
                raise ValueError(f"{where}: `{name}` must have {dim} features (last axis), got shape {arr.shape}")
        if k.shape[:2] != v.shape[:2]:
            raise ValueError(f"{where}: `k` {k.shape} and `v` {v.shape} must share batch and length")
        kw = self.precision()
        b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
        qh = Linear(self.n_head * self.d_k, name="fc_q", **kw)(q).reshape(b, nq, self.n_head, self.d_k)
        kh = Linear(self.n_head * self.d_k, name="fc_k", **kw)(k).reshape(b, nk, self.n_head, self.d_k)
        vh = Linear(self.n_head * self.d_v, name="fc_v", **kw)(v).reshape(b, nk, self.n_head, self.d_v)
        if mask is not None:
            mask = jnp.asarray(mask)[:, None] if jnp.ndim(mask) == 3 else mask
        out = scaled_dot_product_attention(qh, kh, vh, mask=mask, scale=self.d_k**-0.5)
        return Linear(self.d_o, name="fc_o", **kw)(out.reshape(b, nq, self.n_head * self.d_v))
