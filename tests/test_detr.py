"""DETR family: layer options, torch.nn layers, the whole detector, padding, round trips, bad input.

The generic eval-mode parity of every catalogued DETR block runs in tests/test_catalogue_parity.py;
this file covers what is specific to the family.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import catalogue, detr  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref import detr as ref  # noqa: E402

LAYER = dict(d_model=24, nhead=4, dim_feedforward=40, dropout=0.1)
TINY_DETR = dict(num_classes=7, num_queries=5, hidden_dim=32, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=48)


# --------------------------------------------------------------------------- layer options


# post-norm + relu is the catalogue's own case
OPTIONS = [(True, "relu"), (False, "gelu"), (True, "glu")]
OPTION_IDS = ["pre_relu", "post_gelu", "pre_glu"]


@pytest.mark.parametrize("normalize_before,activation", OPTIONS, ids=OPTION_IDS)
def test_encoder_layer_options(normalize_before, activation):
    entry = catalogue.get("transformer_encoder_layer")
    check_parity(entry, config=dict(LAYER, normalize_before=normalize_before, activation=activation))


@pytest.mark.parametrize("normalize_before,activation", OPTIONS, ids=OPTION_IDS)
def test_decoder_layer_options(normalize_before, activation):
    entry = catalogue.get("transformer_decoder_layer")
    check_parity(entry, config=dict(LAYER, normalize_before=normalize_before, activation=activation))


def test_encoder_layer_attn_mask():
    """``src_mask`` (torch ``attn_mask``), float and bool, together with the padding mask."""
    entry = catalogue.get("transformer_encoder_layer")
    rng = np.random.default_rng(3)
    inputs = entry.inputs(rng)
    inputs["src_mask"] = rng.standard_normal((13, 13)).astype(np.float32)
    check_parity(entry, inputs=inputs)
    inputs["src_mask"] = np.triu(np.ones((13, 13), bool), k=1)  # causal, True = not allowed
    check_parity(entry, inputs=inputs)


def test_decoder_without_intermediate_and_encoder_post_norm():
    dec = catalogue.get("transformer_decoder")
    check_parity(dec, config=dict(LAYER, num_layers=3, return_intermediate=False, normalize_before=True))
    enc = catalogue.get("transformer_encoder")
    check_parity(enc, config=dict(LAYER, num_layers=2, normalize_before=False))  # no final norm


def test_position_embedding_sine_options():
    entry = catalogue.get("position_embedding_sine")
    check_parity(entry, config=dict(num_pos_feats=8))  # normalize=False: raw valid-pixel counts
    check_parity(entry, config=dict(num_pos_feats=12, temperature=20, normalize=True, scale=3.0))


def test_dropout_uses_the_dropout_rng():
    layer = detr.TransformerDecoderLayer(**dict(LAYER, dropout=0.5))
    layer0 = detr.TransformerDecoderLayer(**dict(LAYER, dropout=0.0))
    rng = np.random.default_rng(0)
    tgt = jnp.asarray(rng.standard_normal((2, 5, 24), np.float32))
    memory = jnp.asarray(rng.standard_normal((2, 9, 24), np.float32))
    variables = jax.jit(layer.init)(jax.random.PRNGKey(0), tgt, memory)

    train = jax.jit(lambda key: layer.apply(variables, tgt, memory, train=True, rngs={"dropout": key}))
    a, b, c = train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(2))
    eval_out, train_no_dropout = jax.jit(
        lambda v: (layer.apply(v, tgt, memory), layer0.apply(v, tgt, memory, train=True))
    )(variables)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a - c)).max() > 1e-2
    assert np.abs(np.asarray(a - eval_out)).max() > 1e-2
    np.testing.assert_allclose(train_no_dropout, eval_out, atol=1e-6, rtol=1e-6)  # dropout=0: the eval path
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda: layer.apply(variables, tgt, memory, train=True))


def test_bfloat16_compute_close_to_float32():
    layer32 = detr.TransformerEncoderLayer(**LAYER)
    layer16 = detr.TransformerEncoderLayer(**LAYER, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 13, 24), np.float32))
    variables = jax.jit(layer32.init)(jax.random.PRNGKey(0), x)
    want, got = jax.jit(lambda v: (layer32.apply(v, x), layer16.apply(v, x)))(variables)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)


# --------------------------------------------------------------------------- torch.nn layers


def _nn_entry(kind, batch_first):
    """torch.nn's own Transformer{Encoder,Decoder}Layer as the reference for the Flax layers."""
    flax_cls = detr.TransformerEncoderLayer if kind == "encoder" else detr.TransformerDecoderLayer

    def flax_factory(norm_first, batch_first, **config):
        # torch.nn's norm_first is DETR's normalize_before; the Flax layers are batch-first either way.
        return flax_cls(**config, normalize_before=norm_first)

    def seq(t):
        return t if batch_first else t.transpose(0, 1)

    if kind == "encoder":

        def inputs(rng):
            mask = np.zeros((3, 13), bool)
            mask[0, -4:] = True
            return {"src": rng.standard_normal((3, 13, 24), dtype=np.float32), "src_key_padding_mask": mask}

        def call(m, src, src_key_padding_mask):
            return seq(m(seq(src), src_key_padding_mask=src_key_padding_mask))
    else:

        def inputs(rng):
            mask = np.zeros((3, 17), bool)
            mask[1, -5:] = True
            tmask = np.zeros((3, 7), bool)
            tmask[2, -2:] = True
            return {
                "tgt": rng.standard_normal((3, 7, 24), dtype=np.float32),
                "memory": rng.standard_normal((3, 17, 24), dtype=np.float32),
                "tgt_key_padding_mask": tmask,
                "memory_key_padding_mask": mask,
            }

        def call(m, tgt, memory, tgt_key_padding_mask, memory_key_padding_mask):
            return seq(
                m(
                    seq(tgt),
                    seq(memory),
                    tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask,
                )
            )

    return catalogue.Entry(
        name=f"torch_nn_{kind}_layer",
        family="detr",
        paper="torch.nn",
        flax=flax_factory,
        inputs=inputs,
        torch=f"torch.nn:Transformer{kind.capitalize()}Layer",
        image_inputs=(),
        output_layout="same",
        torch_call=call,
        layouts=("torch.nn",),
        train_mode=False,
        config=dict(LAYER, activation="relu", layer_norm_eps=1e-5, norm_first=False, batch_first=batch_first),
    )


@pytest.mark.parametrize(
    "kind,batch_first,norm_first,activation",
    [
        ("encoder", False, False, "relu"),
        ("encoder", True, True, "gelu"),
        ("decoder", False, True, "gelu"),
        ("decoder", True, False, "relu"),
    ],
    ids=[
        "encoder-seq_first-post_relu",
        "encoder-batch_first-pre_gelu",
        "decoder-seq_first-pre_gelu",
        "decoder-batch_first-post_relu",
    ],
)
def test_loads_torch_nn_layers(kind, batch_first, norm_first, activation):
    entry = _nn_entry(kind, batch_first)
    config = dict(entry.config, norm_first=norm_first, activation=activation, layer_norm_eps=1e-6)
    check_parity(entry, config=config, layout="torch.nn")


# --------------------------------------------------------------------------- the whole detector


def _randomize_frozen_bn(model, seed=0):
    """FrozenBatchNorm2d's affine parameters are buffers the generic randomiser leaves at 1/0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ref.FrozenBatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def _tiny_detr_state_dict(seed=0, **config):
    torch.manual_seed(seed)
    model = ref.detr(**{**TINY_DETR, **config})
    randomize_torch_module(model, seed)
    _randomize_frozen_bn(model, seed)
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_detr_sd():
    return _tiny_detr_state_dict()


def test_detr_loads_official_keys_strictly_and_round_trips(tiny_detr_sd):
    sd = tiny_detr_sd
    for key in (
        "backbone.0.body.conv1.weight",
        "backbone.0.body.bn1.running_var",
        "backbone.0.body.bn1.weight",
        "backbone.0.body.layer1.0.downsample.0.weight",
        "backbone.0.body.layer4.2.conv3.weight",
        "transformer.encoder.layers.1.self_attn.in_proj_weight",
        "transformer.decoder.norm.weight",
        "transformer.decoder.layers.0.multihead_attn.out_proj.bias",
        "input_proj.weight",
        "query_embed.weight",
        "class_embed.bias",
        "bbox_embed.layers.2.weight",
    ):
        assert key in sd, key
    assert not any("num_batches_tracked" in k or ".fc." in k for k in sd)
    assert "transformer.encoder.norm.weight" not in sd  # post-norm DETR has no encoder norm
    model = detr.DETR(**TINY_DETR)
    x = jnp.zeros((1, 64, 48, 3))
    variables = from_torch(model, sd, x)  # strict=True: every key used, none missing, shapes checked
    # in_proj_weight/bias are split into q/k/v in Flax: 2 extra leaves per fused tensor
    n_fused = sum(k.endswith(("in_proj_weight", "in_proj_bias")) for k in sd)
    assert len(jax.tree_util.tree_leaves(variables)) == len(sd) + 2 * n_fused
    back = to_torch(model, variables, x)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_detr_variant_parity_with_frozen_bn_affine():
    """Learned encodings, pre-norm, DC5 backbone, no aux outputs; FrozenBN weight/bias non-trivial.

    (The default R50 configuration is the catalogue's ``detr`` entry.)
    """
    variant = dict(position_embedding="learned", pre_norm=True, dilation=True, aux_loss=False)
    entry = catalogue.get("detr")
    sd = _tiny_detr_state_dict(**variant)
    rng = np.random.default_rng(1)
    inputs = {
        "samples": rng.standard_normal((2, 41, 37, 3), dtype=np.float32),
        "mask": np.zeros((2, 41, 37), bool),
    }
    inputs["mask"][1, -9:, :] = True
    inputs["mask"][1, :, -20:] = True
    # Input gradients through the backbone are compared by the catalogue's detr entry; here the
    # variant parts (encodings, pre-norm, dilated layer4, frozen-BN affine) are forward-only to stay cheap.
    check_parity(entry, config={**TINY_DETR, **variant}, inputs=inputs, state_dict=sd, check_grads=False)


# A one-layer transformer for the round trip and padding tests.
SMALL_TRANSFORMER = dict(d_model=16, nhead=2, num_encoder_layers=1, dim_feedforward=24, return_intermediate_dec=True)


def test_transformer_round_trip_into_torch():
    config = dict(SMALL_TRANSFORMER, num_decoder_layers=2, normalize_before=True)
    tr = detr.Transformer(**config)
    args = (
        jnp.zeros((1, 3, 4, 16)),
        jnp.zeros((1, 3, 4), bool),
        jnp.zeros((5, 16)),
        jnp.zeros((1, 3, 4, 16)),
    )
    variables = jax.jit(tr.init)(jax.random.PRNGKey(0), *args)
    sd = to_torch(tr, variables, *args)
    torch_tr = ref.transformer(**config)
    torch_tr.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    again = from_torch(tr, sd, *args)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- padding


def test_fully_padded_image_is_finite_and_independent():
    """A batch element with every pixel padded: finite outputs and gradients, no effect on the others."""
    tr = detr.Transformer(**SMALL_TRANSFORMER, num_decoder_layers=1)
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.standard_normal((2, 3, 5, 16), np.float32))
    pos = jnp.asarray(rng.standard_normal((2, 3, 5, 16), np.float32))
    queries = jnp.asarray(rng.standard_normal((4, 16), np.float32))
    mask = np.zeros((2, 3, 5), bool)
    mask[1] = True
    variables = jax.jit(tr.init)(jax.random.PRNGKey(0), src, mask, queries, pos)

    def loss(params, src):
        hs, memory = tr.apply({"params": params}, src, mask, queries, pos)
        return jnp.sum(hs**2) + jnp.sum(memory**2), (hs, memory)

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (hs, memory)), (g_params, g_src) = grad_fn(variables["params"], src)
    for t in (hs, memory, g_src, *jax.tree_util.tree_leaves(g_params)):
        assert np.isfinite(np.asarray(t)).all()
    assert np.abs(np.asarray(g_src[1])).max() > 0  # padded tokens still get value/residual gradients
    # The padded image's content cannot reach the other image (nor produce NaN there).
    (_, (hs2, memory2)), _ = grad_fn(variables["params"], src.at[1].set(1e3))
    np.testing.assert_allclose(hs2[:, 0], hs[:, 0], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(memory2[0], memory[0], atol=1e-6, rtol=1e-6)


def test_detr_fully_padded_image_gives_finite_outputs_and_gradients(tiny_detr_sd):
    model = detr.DETR(**TINY_DETR)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3), np.float32))
    mask = np.zeros((2, 32, 32), bool)
    mask[1] = True
    variables = from_torch(model, tiny_detr_sd, x, mask)  # cheaper than compiling model.init
    # NaN from a fully masked attention row would show in every gradient downstream of it, including
    # input_proj's (which multiplies the backbone features by d loss / d src); leaving the ResNet's own
    # parameters out of the differentiated set keeps the compile small.
    head = {k: v for k, v in variables["params"].items() if k != "backbone_0"}

    @jax.jit
    def loss(head):
        params = {**variables["params"], **head}
        out = model.apply({**variables, "params": params}, x, mask)
        return sum(jnp.sum(t) for t in jax.tree_util.tree_leaves(out)), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(head)
    for t in (*jax.tree_util.tree_leaves(out), *jax.tree_util.tree_leaves(grads)):
        assert np.isfinite(np.asarray(t)).all()
    assert np.abs(np.asarray(grads["input_proj"]["kernel"])).max() > 0


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    x = jnp.zeros((2, 7, 24))
    with pytest.raises(ValueError, match=r"TransformerEncoderLayer: `d_model`=24 must be divisible by `nhead`=5"):
        detr.TransformerEncoderLayer(d_model=24, nhead=5).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"TransformerEncoderLayer: unknown `activation` 'swish'"):
        detr.TransformerEncoderLayer(d_model=24, nhead=4, activation="swish").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"'glu'.*`dim_feedforward` must be even, got 41"):
        detr.TransformerEncoderLayer(d_model=24, nhead=4, dim_feedforward=41, activation="glu").init(
            jax.random.PRNGKey(0), x
        )
    with pytest.raises(ValueError, match=r"`src_key_padding_mask` must have shape \(2, 7\).*got \(2, 6\)"):
        detr.TransformerEncoderLayer(d_model=24, nhead=4).init(
            jax.random.PRNGKey(0), x, src_key_padding_mask=jnp.zeros((2, 6), bool)
        )
    with pytest.raises(ValueError, match=r"TransformerEncoderLayer: `src` must have 24 channels"):
        detr.TransformerEncoderLayer(d_model=24, nhead=4).init(jax.random.PRNGKey(0), jnp.zeros((2, 7, 20)))
    with pytest.raises(
        ValueError, match=r"TransformerDecoderLayer: `memory_key_padding_mask` must have shape \(2, 9\)"
    ):
        detr.TransformerDecoderLayer(d_model=24, nhead=4).init(
            jax.random.PRNGKey(0), x, jnp.zeros((2, 9, 24)), memory_key_padding_mask=jnp.zeros((2, 7), bool)
        )
    with pytest.raises(ValueError, match=r"TransformerDecoder: `return_intermediate=True` needs the final norm"):
        detr.TransformerDecoder(num_layers=1, d_model=24, nhead=4, norm=False, return_intermediate=True).init(
            jax.random.PRNGKey(0), x, x
        )
    src = jnp.zeros((2, 3, 5, 24))
    with pytest.raises(ValueError, match=r"Transformer: `mask` must have shape \(2, 3, 5\).*got \(2, 5, 3\)"):
        detr.Transformer(d_model=24, nhead=4).init(
            jax.random.PRNGKey(0), src, jnp.zeros((2, 5, 3), bool), jnp.zeros((4, 24)), src
        )
    img = jnp.zeros((1, 33, 31, 3))
    with pytest.raises(ValueError, match=r"DETR: `mask` must have shape \(1, 33, 31\).*got \(1, 31, 33\)"):
        detr.DETR(**TINY_DETR).init(jax.random.PRNGKey(0), img, jnp.zeros((1, 31, 33), bool))
    with pytest.raises(ValueError, match=r"DETR: unknown `position_embedding` 'rope'"):
        detr.DETR(**TINY_DETR, position_embedding="rope").init(jax.random.PRNGKey(0), img)
    with pytest.raises(ValueError, match=r"Backbone: unknown `backbone` 'resnet18'"):
        detr.DETR(**TINY_DETR, backbone="resnet18").init(jax.random.PRNGKey(0), img)
    with pytest.raises(ValueError, match=r"DETR: `samples` must have 3 channels"):
        detr.DETR(**TINY_DETR).init(jax.random.PRNGKey(0), jnp.zeros((1, 33, 31, 4)))
    with pytest.raises(ValueError, match=r"PositionEmbeddingSine: `normalize` should be True if `scale` is passed"):
        detr.PositionEmbeddingSine(scale=1.0).apply({}, src, jnp.zeros((2, 3, 5), bool))
    with pytest.raises(ValueError, match=r"PositionEmbeddingSine: `mask` must have shape \(2, 3, 5\)"):
        detr.PositionEmbeddingSine().apply({}, src, jnp.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match=r"PositionEmbeddingLearned: the tables hold 50 rows/columns; got a 3x51"):
        detr.PositionEmbeddingLearned(8).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 51, 4)))
    with pytest.raises(ValueError, match=r"TransformerEncoder"):
        detr.TransformerEncoder(num_layers=1, d_model=24, nhead=7).init(jax.random.PRNGKey(0), x)
