"""``flax_attn.nnx.Block``: any flax_attn block as an NNX module, BatchNorm state handled, trained in
a jitted ``nnx.Optimizer`` step, loaded from a PyTorch state dict."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_attn import catalogue
from flax_attn.nnx import Block

# A representative set: BatchNorm (cbam, se_basic_block, rcca_module), dropout
# (transformer_encoder_layer), several inputs and options (multihead_attention), a kernel op.
NAMES = ["cbam", "se_basic_block", "rcca_module", "transformer_encoder_layer", "multihead_attention"]


def _inputs(entry):
    return {k: jnp.asarray(v) for k, v in entry.make_inputs(np.random.default_rng(0)).items()}


@pytest.mark.parametrize("name", NAMES)
def test_block_matches_the_linen_apply_in_eval_and_train(name):
    entry = catalogue.get(name)
    inputs, kwargs = _inputs(entry), entry.flax_kwargs
    model = Block(entry.build_flax(), **inputs, **kwargs, rngs=0)
    variables = model.linen_variables()
    linen = entry.build_flax()
    want = linen.apply(variables, **inputs, **kwargs)
    got = model(**inputs, **kwargs)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6), got, want)
    if not entry.train_mode:
        return
    # Train mode: the BatchNorm running statistics move inside the NNX module, as the linen
    # apply with mutable=["batch_stats"] says they should.
    want_y, want_state = linen.apply(
        variables, **inputs, **kwargs, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(9)}
    )
    model.train()
    model(**inputs, **kwargs)
    got_stats = model.linen_variables().get("batch_stats", {})
    assert jax.tree_util.tree_structure(got_stats) == jax.tree_util.tree_structure(want_state["batch_stats"])
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6), got_stats, want_state["batch_stats"]
    )
    before = jax.tree_util.tree_leaves(variables["batch_stats"])
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(before, jax.tree_util.tree_leaves(got_stats)))


def test_jitted_optimizer_step_trains_a_batchnorm_block():
    entry = catalogue.get("se_basic_block")
    x = _inputs(entry)["x"]
    model = Block(entry.build_flax(), x, rngs=1)
    target = jnp.tanh(jax.random.normal(jax.random.PRNGKey(3), model(x).shape))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    stats0 = jax.tree_util.tree_leaves(model.linen_variables()["batch_stats"])

    @nnx.jit
    def step(model, optimizer, x, target):
        def loss_fn(m):
            return jnp.mean((m(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)  # grads wrt nnx.Param only
        optimizer.update(model, grads)
        return loss

    model.train()
    losses = [float(step(model, optimizer, x, target)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses
    stats = jax.tree_util.tree_leaves(model.linen_variables()["batch_stats"])
    assert all(float(jnp.abs(a - b).max()) > 0 for a, b in zip(stats0, stats))  # updated without mutable=
    model.eval()
    eval_out = model(x)
    assert eval_out.shape == target.shape and bool(jnp.all(jnp.isfinite(eval_out)))


def test_dropout_follows_train_and_eval():
    entry = catalogue.get("transformer_encoder_layer")
    inputs = _inputs(entry)
    model = Block(entry.build_flax({**entry.config, "dropout": 0.5}), **inputs)
    a = model(**inputs)
    np.testing.assert_array_equal(a, model(**inputs))  # eval: deterministic
    model.train()
    b = model(**inputs)
    assert float(jnp.abs(a - b).max()) > 0.1


def test_load_torch_state_dict_matches_pytorch():
    torch = pytest.importorskip("torch")
    from flax_attn.convert import StateDictMismatchError
    from flax_attn.testing.parity import randomize_torch_module

    entry = catalogue.get("cbam")
    inputs = _inputs(entry)
    reference = entry.build_torch()
    randomize_torch_module(reference, 0)
    reference.eval()
    model = Block(entry.build_flax(), **inputs)
    model.load_torch(reference.state_dict(), **inputs)
    with torch.no_grad():
        nchw = np.array(inputs["x"]).transpose(0, 3, 1, 2).copy()
        want = reference(torch.from_numpy(nchw)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(model(**inputs), want, rtol=1e-5, atol=1e-5)
    bad = dict(reference.state_dict())
    bad.pop(next(iter(bad)))
    with pytest.raises(StateDictMismatchError, match="missing torch key"):
        model.load_torch(bad, **inputs)


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match=r"Block: `module` must be a flax linen Module, got int"):
        Block(3)
    entry = catalogue.get("eca")
    with pytest.raises(TypeError, match=r"Block: `rngs` must be nnx.Rngs or an int seed, got str"):
        Block(entry.build_flax(), **_inputs(entry), rngs="0")
