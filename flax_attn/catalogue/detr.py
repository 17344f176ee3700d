"""Catalogue entries of :mod:`flax_attn.detr` (test and tooling data; see :mod:`flax_attn.catalogue`)."""

from __future__ import annotations

import functools

import numpy as np

from flax_attn import detr
from flax_attn.catalogue import family

# The torch references use DETR's layouts: sequences (length, batch, features) and NCHW images.
# These adapters move the batch-first inputs there and the outputs back, at the boundary only.


def _seq_first(t):
    return None if t is None else t.transpose(0, 1)


def _torch_encoder_call(m, src, src_key_padding_mask=None, pos=None, **kw):
    return m(_seq_first(src), src_key_padding_mask=src_key_padding_mask, pos=_seq_first(pos), **kw).transpose(0, 1)


def _torch_decoder_layer_call(m, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None, **kw):
    out = m(
        _seq_first(tgt),
        _seq_first(memory),
        memory_key_padding_mask=memory_key_padding_mask,
        pos=_seq_first(pos),
        query_pos=_seq_first(query_pos),
        **kw,
    )
    return out.transpose(0, 1)


def _torch_decoder_call(m, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None, **kw):
    out = m(
        _seq_first(tgt),
        _seq_first(memory),
        memory_key_padding_mask=memory_key_padding_mask,
        pos=_seq_first(pos),
        query_pos=_seq_first(query_pos),
        **kw,
    )
    return out.transpose(1, 2)  # (layers, Q, B, d) -> (layers, B, Q, d)


def _torch_nested_call(m, x=None, mask=None, samples=None):
    from flax_attn.testing.torch_ref.detr import NestedTensor

    return m(NestedTensor(x if samples is None else samples, mask))


def _hs_memory_to_flax(outputs):
    hs, memory = outputs
    return hs, memory.permute(0, 2, 3, 1)


def _padding_mask(b, *spatial, padded=((0, 3), (1, 1))):
    """True = padded at the end (bottom/right for images, as DETR batches them).

    ``padded = ((i, n), (j, k))``: image/sequence ``i`` loses its last ``n`` rows (or positions),
    ``j`` its last ``k`` columns (or positions).
    """
    mask = np.zeros((b, *spatial), dtype=bool)
    (i, n), (j, k) = padded
    if len(spatial) == 1:
        mask[i, -n:] = True
        mask[j, -k:] = True
    else:
        mask[i, -n:, :] = True
        mask[j, :, -k:] = True
    return mask


def _encoder_layer_inputs(b, l, d):
    def make(rng):
        return {
            "src": rng.standard_normal((b, l, d), dtype=np.float32),
            "src_key_padding_mask": _padding_mask(b, l),
            "pos": rng.standard_normal((b, l, d), dtype=np.float32),
        }

    return make


def _decoder_layer_inputs(b, q, s, d):
    def make(rng):
        return {
            "tgt": rng.standard_normal((b, q, d), dtype=np.float32),
            "memory": rng.standard_normal((b, s, d), dtype=np.float32),
            "memory_key_padding_mask": _padding_mask(b, s),
            "pos": rng.standard_normal((b, s, d), dtype=np.float32),
            "query_pos": rng.standard_normal((b, q, d), dtype=np.float32),
        }

    return make


def _transformer_inputs(b, h, w, d, q):
    def make(rng):
        return {
            "src": rng.standard_normal((b, h, w, d), dtype=np.float32),
            "mask": _padding_mask(b, h, w, padded=((0, 2), (1, 3))),
            "query_embed": rng.standard_normal((q, d), dtype=np.float32),
            "pos_embed": rng.standard_normal((b, h, w, d), dtype=np.float32),
        }

    return make


def _position_inputs(b, h, w, c, with_mask=True):
    def make(rng):
        # The encodings read only the shape of ``x`` (not differentiable in it), so it is given as
        # integers: the parity harness then does not ask for gradients that do not exist.
        out = {"x": rng.integers(-3, 3, size=(b, h, w, c)).astype(np.int8)}
        if with_mask:
            out["mask"] = _padding_mask(b, h, w, padded=((0, 4), (b - 1, 5)))
        return out

    return make


def _detr_inputs(b, h, w, padded):
    def make(rng):
        return {
            "samples": rng.standard_normal((b, h, w, 3), dtype=np.float32),
            "mask": _padding_mask(b, h, w, padded=padded),
        }

    return make


_SMALL_LAYER = dict(d_model=24, nhead=4, dim_feedforward=40, dropout=0.1)
_BENCH_LAYER = dict(d_model=256, nhead=8, dim_feedforward=2048, dropout=0.1)
# Dropout masks cannot match torch's RNG, so train mode is compared with dropout off in
# tests/test_detr.py; the catalogue compares eval mode (train_mode=False).
add = family("detr", paper="Carion et al., ECCV 2020 (DETR)", arxiv="2005.12872", train_mode=False)
# The transformer's parts take and return (batch, length, features) sequences, not images.
add_sequence = functools.partial(add, image_inputs=(), output_layout="same")

add_sequence(
    name="transformer_encoder_layer",
    flax=detr.TransformerEncoderLayer,
    torch="transformer_encoder_layer",
    config=_SMALL_LAYER,
    inputs=_encoder_layer_inputs(3, 13, 24),
    bench_config=_BENCH_LAYER,
    bench_inputs=_encoder_layer_inputs(2, 850, 256),
    torch_call=_torch_encoder_call,
)

add_sequence(
    name="transformer_decoder_layer",
    flax=detr.TransformerDecoderLayer,
    torch="transformer_decoder_layer",
    config=_SMALL_LAYER,
    inputs=_decoder_layer_inputs(3, 7, 17, 24),
    bench_config=_BENCH_LAYER,
    bench_inputs=_decoder_layer_inputs(2, 100, 850, 256),
    torch_call=_torch_decoder_layer_call,
)

add_sequence(
    name="transformer_encoder",
    flax=detr.TransformerEncoder,
    torch="transformer_encoder",
    config=dict(num_layers=2, normalize_before=True, **_SMALL_LAYER),
    inputs=_encoder_layer_inputs(3, 13, 24),
    bench_config=dict(num_layers=6, **_BENCH_LAYER),
    bench_inputs=_encoder_layer_inputs(2, 850, 256),
    torch_call=_torch_encoder_call,
)

add_sequence(
    name="transformer_decoder",
    flax=detr.TransformerDecoder,
    torch="transformer_decoder",
    config=dict(num_layers=2, return_intermediate=True, **_SMALL_LAYER),
    inputs=_decoder_layer_inputs(3, 7, 17, 24),
    bench_config=dict(num_layers=6, return_intermediate=True, **_BENCH_LAYER),
    bench_inputs=_decoder_layer_inputs(2, 100, 850, 256),
    torch_call=_torch_decoder_call,
)

add(
    name="transformer",
    flax=detr.Transformer,
    torch="transformer",
    config=dict(
        d_model=24,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=40,
        return_intermediate_dec=True,
    ),
    inputs=_transformer_inputs(3, 5, 7, 24, 6),
    bench_config=dict(d_model=256, return_intermediate_dec=True),
    bench_inputs=_transformer_inputs(2, 25, 34, 256, 100),
    image_inputs=("src", "pos_embed"),
    output_layout=_hs_memory_to_flax,
    atol=1e-4,
    rtol=1e-4,
)

add(
    name="position_embedding_sine",
    flax=detr.PositionEmbeddingSine,
    torch="position_embedding_sine",
    config=dict(num_pos_feats=16, normalize=True),
    inputs=_position_inputs(3, 13, 17, 5),
    bench_config=dict(num_pos_feats=128, normalize=True),
    bench_inputs=_position_inputs(2, 25, 34, 2048),
    torch_call=_torch_nested_call,
)

add(
    name="position_embedding_learned",
    flax=detr.PositionEmbeddingLearned,
    torch="position_embedding_learned",
    config=dict(num_pos_feats=12),
    inputs=_position_inputs(3, 13, 17, 5),
    bench_config=dict(num_pos_feats=128),
    bench_inputs=_position_inputs(2, 25, 34, 2048),
    torch_call=_torch_nested_call,
)

add(
    name="detr",
    flax=detr.DETR,
    torch="detr",
    config=dict(num_classes=7, num_queries=5, hidden_dim=32, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=48),
    inputs=_detr_inputs(3, 67, 45, padded=((0, 20), (2, 13))),
    bench_config=dict(),  # detr-r50
    bench_inputs=_detr_inputs(2, 320, 320, padded=((0, 64), (1, 32))),
    image_inputs=("samples",),
    output_layout="same",
    torch_call=_torch_nested_call,
    atol=1e-4,
    rtol=1e-4,
    # The input gradient runs back through a ReLU/max-pool ResNet: a unit within float32 rounding of
    # its threshold flips on another CPU path and reroutes the gradient, so it compares in float64.
    float64_modes=("eval",),
    conditioning="eval: with XLA on SSE4.2 and torch on its default kernels, float32 grad[samples] of one "
    "image moved by up to 8e-4 in 3468 elements (Flax vs float64: 8e-4; torch vs float64: 1.3e-6; outputs "
    "1.7e-6): a gradient discontinuity (a ReLU/max-pool selection flipped by rounding), not a formula error",
    # DETR's sine position encoding is float32 by definition in the reference (float32 cumsum and
    # frequency table) in both precisions; the frameworks' float32 sin differ by ~5e-7, which the
    # float64 transformer carries into its outputs at ~1.3e-8.
    float64_tolerance=1e-7,
)
