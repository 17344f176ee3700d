"""``train`` the Flax way: constructor or call (``nn.merge_param``), positional after the inputs, so
every block works inside ``nn.scan``, ``nn.remat`` (with ``static_argnums``) and ``nn.vmap``.

Before, ``train`` was keyword-only: ``nn.scan`` passes only positional arguments, so a scanned
stack with dropout "trained" gave exactly the eval output, and ``nn.remat(CBAM, static_argnums=...)``
raised ``TypeError``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn import catalogue
from flax_attn.cbam import CBAM
from flax_attn.detr import TransformerEncoderLayer
from flax_attn.layers import BatchNorm
from flax_attn.se import SEBasicBlock

ENTRIES = [e for e in catalogue.entries() if not e.slow]
RNGS = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}


def _positional(module, inputs, kwargs):
    """The call's arguments before ``train`` by position, as ``(name, default)`` pairs: an entry's
    array inputs are looked up by name when traced, the rest are constants. A block whose ``train``
    is not accepted positionally right after them fails here."""
    params = list(inspect.signature(type(module).__call__).parameters.values())[1:]
    names = [p.name for p in params]
    assert "train" in names, f"{type(module).__name__}.__call__ takes no `train`"
    train_at = names.index("train")
    assert params[train_at].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, (
        f"{type(module).__name__}: `train` must be accepted positionally"
    )
    unknown = set(inputs) - set(names[:train_at])
    assert not unknown, f"{type(module).__name__}: inputs {sorted(unknown)} come after `train`"
    spec = [(p.name, kwargs.get(p.name, p.default)) for p in params[:train_at]]
    rest = {k: v for k, v in kwargs.items() if k not in names[:train_at]}
    return spec, rest


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_train_positional_keyword_and_constructor_agree(entry):
    # Traced, not run: the three spellings must give the same program (and, for blocks with a
    # train mode, a different one from eval), which checks the flag reaches every layer.
    module = entry.build_flax()
    raw = entry.make_inputs(np.random.default_rng(0))
    inputs = {k: jnp.asarray(v) for k, v in raw.items()}
    kwargs = entry.flax_kwargs  # call_kwargs, and method=flax_call where the entry has one
    variables = jax.eval_shape(lambda i: module.init(RNGS, **i, **kwargs), inputs)
    ctor = module.clone(train=True)
    if entry.flax_call is None:
        spec, rest = _positional(module, inputs, kwargs)

        def program(call):
            def run(v, arrays):
                return call(v, [arrays.get(name, const) for name, const in spec], rest)

            return str(jax.make_jaxpr(run)(variables, inputs))
    else:  # a flax_call adapter takes the entry's flat arrays (and train) by keyword

        def program(call):
            return str(jax.make_jaxpr(lambda v, arrays: call(v, [], {**arrays, **kwargs}))(variables, inputs))

    apply = dict(rngs={"dropout": jax.random.PRNGKey(2)}, mutable=["batch_stats"])
    keyword = program(lambda v, a, kw: module.apply(v, *a, **kw, train=True, **apply))
    constructor = program(lambda v, a, kw: ctor.apply(v, *a, **kw, **apply))
    if entry.flax_call is None:  # a flax_call adapter takes its flat arrays (and train) by keyword
        positional = program(lambda v, a, kw: module.apply(v, *a, True, **kw, **apply))
        assert positional == keyword, f"{entry.name}: block(x, True) != block(x, train=True)"
    assert constructor == keyword, f"{entry.name}: Block(train=True)(x) != block(x, train=True)"
    if entry.train_mode:
        evaluation = program(lambda v, a, kw: module.apply(v, *a, **kw, train=False, **apply))
        assert evaluation != keyword, f"{entry.name}: train=True traced the same program as eval"


def test_train_given_twice_is_an_error_naming_the_block():
    x = jnp.ones((2, 5, 6, 16))
    block = CBAM(16, 4, train=True)
    variables = CBAM(16, 4).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"CBAM: `train` was given to the constructor .* and to the call"):
        block.apply(variables, x, False)


def test_batchnorm_takes_train_like_the_blocks():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 5, 6)) * 3 + 1
    variables = BatchNorm().init(jax.random.PRNGKey(0), x)
    y_call, _ = BatchNorm().apply(variables, x, True, mutable=["batch_stats"])
    y_kw, _ = BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])
    y_ctor, _ = BatchNorm(train=True).apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(y_call, y_kw)
    np.testing.assert_array_equal(y_call, y_ctor)
    assert float(jnp.abs(y_call - BatchNorm().apply(variables, x)).max()) > 0.1  # batch vs running stats


# --------------------------------------------------------------------------- nn.scan


class _EncoderBody(nn.Module):
    @nn.compact
    def __call__(self, carry, train):
        layer = TransformerEncoderLayer(16, 2, 32, dropout=0.5, name="layer")
        return layer(carry, None, None, None, train), None


class _ScannedEncoder(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        stack = nn.scan(
            _EncoderBody,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=3,
        )
        return stack(name="stack")(x, train)[0]


def test_scanned_stack_with_dropout_trains():
    # The bug: the scanned stack "trained" with dropout 0.5 gave exactly the eval output.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 16))
    model = _ScannedEncoder()
    variables = model.init(RNGS, x, False)
    assert variables["params"]["stack"]["layer"]["linear1"]["kernel"].shape == (3, 16, 32)
    evaluation = model.apply(variables, x, False)
    trained = model.apply(variables, x, True, rngs={"dropout": jax.random.PRNGKey(3)})
    again = model.apply(variables, x, True, rngs={"dropout": jax.random.PRNGKey(3)})
    assert float(jnp.abs(trained - evaluation).max()) > 0.1
    np.testing.assert_array_equal(trained, again)  # dropout is the only randomness


class _CBAMBody(nn.Module):
    @nn.compact
    def __call__(self, carry, train):
        return CBAM(16, 4, name="cbam")(carry, train), None


def test_scanned_batchnorm_blocks_use_batch_statistics_in_train_mode():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 6, 16)) * 2 + 1
    stack = nn.scan(
        _CBAMBody,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=2,
    )()
    variables = stack.init(RNGS, x, False)
    (y_train, _), state = stack.apply(variables, x, True, mutable=["batch_stats"])
    y_eval, _ = stack.apply(variables, x, False)
    mean = state["batch_stats"]["cbam"]["SpatialGate"]["spatial"]["bn"]["mean"]
    assert mean.shape == (2, 1) and float(jnp.abs(mean).max()) > 0  # running stats moved, per layer
    assert float(jnp.abs(y_train - y_eval).max()) > 1e-3


# --------------------------------------------------------------------------- nn.remat


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: (CBAM, (16, 4)), (2, 5, 6, 16)),
        (lambda: (SEBasicBlock, (16, 16)), (2, 5, 6, 16)),
        (lambda: (TransformerEncoderLayer, (16, 2, 32)), (2, 7, 16)),
    ],
    ids=["cbam", "se_basic_block", "transformer_encoder_layer"],
)
def test_remat_with_static_train_matches_the_plain_block(make, x):
    cls, args = make()
    x = jax.random.normal(jax.random.PRNGKey(0), x)
    plain = cls(*args)
    # self is argument 0, x 1, train 2 (TransformerEncoderLayer: src, src_mask, kpm, pos, train).
    train_at = list(inspect.signature(cls.__call__).parameters).index("train")
    remat = nn.remat(cls, static_argnums=(train_at,))(*args)
    variables = plain.init(RNGS, x)
    extra = (None,) * (train_at - 2)
    rngs = {"dropout": jax.random.PRNGKey(4)}

    def loss(module, v):
        y, _ = module.apply(v, x, *extra, True, rngs=rngs, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y))

    want, want_grad = jax.value_and_grad(lambda v: loss(plain, v))(variables)
    got, got_grad = jax.jit(jax.value_and_grad(lambda v: loss(remat, v)))(variables)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_grad, want_grad)
    # Without static_argnums the flag goes through the constructor instead.
    ctor = nn.remat(cls)(*args, train=True)
    y_ctor, _ = ctor.apply(variables, x, rngs=rngs, mutable=["batch_stats"])
    y_plain, _ = plain.apply(variables, x, *extra, True, rngs=rngs, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ctor, y_plain, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- nn.vmap


def test_vmap_over_an_extra_axis_with_shared_parameters():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 7, 16))  # (ensemble member, batch, length, d)
    vmapped = nn.vmap(
        TransformerEncoderLayer,
        in_axes=(0, None, None, None, None),
        variable_axes={"params": None},
        split_rngs={"params": False, "dropout": True},
    )(16, 2, 32, dropout=0.5)
    variables = vmapped.init(RNGS, x, None, None, None, False)
    layer = TransformerEncoderLayer(16, 2, 32, dropout=0.5)
    evaluation = vmapped.apply(variables, x, None, None, None, False)
    for i in range(2):
        np.testing.assert_allclose(evaluation[i], layer.apply(variables, x[i]), rtol=1e-5, atol=1e-5)
    trained = vmapped.apply(variables, x, None, None, None, True, rngs={"dropout": jax.random.PRNGKey(5)})
    assert float(jnp.abs(trained - evaluation).max()) > 0.1


def test_vmap_of_a_batchnorm_block_in_eval_mode():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 6, 16))
    vmapped = nn.vmap(
        CBAM, in_axes=(0, None), variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True}
    )(16, 4)
    variables = vmapped.init(RNGS, x, False)
    y = vmapped.apply(variables, x, False)
    for i in range(2):
        member = jax.tree_util.tree_map(lambda v, i=i: v[i], variables)
        np.testing.assert_allclose(y[i], CBAM(16, 4).apply(member, x[i]), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- scan_layers (DETR)


def _scanned(name):
    entry = catalogue.get(name)
    return dataclasses.replace(entry, flax=functools.partial(entry.flax, scan_layers=True))


@pytest.mark.parametrize("name", ["transformer_encoder", "transformer_decoder"])
def test_scan_layers_parity_with_detr(name):
    # The PyTorch reference is DETR's unstacked ModuleList (layers.0.*, layers.1.*): the converter
    # stacks it into the scanned parameters; outputs and input gradients match as unscanned.
    # Eval only, as in the catalogue (train_mode=False): dropout masks differ between frameworks.
    pytest.importorskip("torch")
    from flax_attn.testing.parity import run_parity

    entry = _scanned(name)
    result = run_parity(entry, train=False, dtype="float32")
    assert result.passed, str(result)


@pytest.mark.parametrize("name", ["transformer_encoder", "transformer_decoder", "transformer"])
def test_scan_layers_converts_to_and_from_the_unstacked_layout(name):
    from flax_attn.convert import from_torch, to_torch

    entry = catalogue.get(name)
    inputs = {k: jnp.asarray(v) for k, v in entry.make_inputs(np.random.default_rng(0)).items()}
    plain = entry.build_flax()
    scanned = plain.clone(scan_layers=True)
    variables = plain.init(RNGS, **inputs)
    state_dict = to_torch(plain, variables, **inputs)
    assert any(".1." in k for k in state_dict), sorted(state_dict)[:5]  # unstacked torch keys
    stacked = from_torch(scanned, state_dict, **inputs)
    params = stacked["params"]
    stacks = [params["encoder"]["layers"], params["decoder"]["layers"]] if name == "transformer" else [params["layers"]]
    depth = entry.config.get("num_layers", entry.config.get("num_encoder_layers"))
    assert {v.shape[0] for stack in stacks for v in jax.tree_util.tree_leaves(stack)} == {depth}
    back = to_torch(scanned, stacked, **inputs)
    assert sorted(back) == sorted(state_dict)
    for k in state_dict:
        np.testing.assert_array_equal(back[k], state_dict[k], err_msg=k)
    got = jax.tree_util.tree_leaves(scanned.apply(stacked, **inputs))
    want = jax.tree_util.tree_leaves(plain.apply(variables, **inputs))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
