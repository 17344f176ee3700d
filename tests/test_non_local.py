"""Non-local blocks: modes, 1-D/2-D/3-D, options, maps, the memory-saving ops, the released MNIST net."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import catalogue  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.non_local import NONLocalBlock2D, NonLocalBlockND, NonLocalMNISTNet  # noqa: E402
from flax_attn.ops.non_local import NON_LOCAL_MODES, non_local_attention  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref.non_local import Network, non_local_block  # noqa: E402

ENTRY = catalogue.get("non_local_2d_embedded_gaussian")


def _x(shape, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)}


@pytest.mark.parametrize("mode", NON_LOCAL_MODES)
@pytest.mark.parametrize("dimension,shape", [(1, (3, 19, 6)), (3, (2, 3, 7, 9, 6))], ids=["1d", "3d"])
def test_dimensions(mode, dimension, shape):
    # Train mode (BN batch statistics over 1-D/3-D) for one mode keeps the file fast; eval for all.
    train = mode == "embedded_gaussian"
    config = dict(in_channels=6, inter_channels=None, dimension=dimension, sub_sample=True, bn_layer=True, mode=mode)
    check_parity(ENTRY, config=config, inputs=_x(shape), train=train)


@pytest.mark.parametrize(
    "mode,sub_sample,bn_layer,inter",
    [
        ("gaussian", False, False, None),
        ("dot_product", True, False, 5),
        ("concatenation", False, True, 3),
        ("embedded_gaussian", False, False, None),
    ],
)
def test_options(mode, sub_sample, bn_layer, inter):
    config = dict(in_channels=8, inter_channels=inter, dimension=2, sub_sample=sub_sample, bn_layer=bn_layer, mode=mode)
    for train in (False, True):
        check_parity(ENTRY, config=config, inputs=_x((3, 7, 5, 8)), train=train)


def test_single_channel_gets_one_inter_channel():
    config = dict(in_channels=1, dimension=2, mode="embedded_gaussian")
    check_parity(ENTRY, config=config, inputs=_x((2, 5, 7, 1)), train=True)
    variables = jax.eval_shape(lambda: NONLocalBlock2D(1).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 1))))
    assert variables["params"]["g"]["kernel"].shape == (1, 1, 1, 1)


@pytest.mark.parametrize(
    "mode,dimension,shape",
    [
        *[(m, 2, (3, 13, 17, 6)) for m in NON_LOCAL_MODES],
        ("embedded_gaussian", 1, (2, 11, 6)),
        ("concatenation", 3, (2, 3, 5, 7, 6)),
    ],
)
def test_nl_map_matches_official(mode, dimension, shape):
    entry = dataclasses.replace(
        ENTRY,
        call_kwargs=dict(return_nl_map=True),
        output_layout=lambda outs: [outs[0].movedim(1, -1), outs[1]],
    )
    config = dict(in_channels=6, dimension=dimension, mode=mode)
    res = check_parity(entry, config=config, inputs=_x(shape))
    assert "output[1]" in res.errors  # the map itself was compared


@pytest.mark.parametrize("mode", ["dot_product", "concatenation"])
def test_memory_saving_paths_match_dense(mode):
    """Without return_weights the op never forms (N, M); it must equal the dense formula, with gradients."""
    rng = np.random.default_rng(1)
    theta = jnp.asarray(rng.standard_normal((2, 37, 5), dtype=np.float32))
    phi = jnp.asarray(rng.standard_normal((2, 23, 5), dtype=np.float32))
    g = jnp.asarray(rng.standard_normal((2, 23, 4), dtype=np.float32))
    kern = jnp.asarray(rng.standard_normal((10,), dtype=np.float32)) if mode == "concatenation" else None

    def fast(t, p, v):
        return non_local_attention(t, p, v, mode=mode, concat_kernel=kern)

    def dense(t, p, v):
        return non_local_attention(t, p, v, mode=mode, concat_kernel=kern, return_weights=True)[0]

    np.testing.assert_allclose(fast(theta, phi, g), dense(theta, phi, g), atol=1e-5, rtol=1e-5)
    cot = jnp.asarray(rng.standard_normal((2, 37, 4), dtype=np.float32))
    gf = jax.grad(lambda *a: jnp.sum(fast(*a) * cot), argnums=(0, 1, 2))(theta, phi, g)
    gd = jax.grad(lambda *a: jnp.sum(dense(*a) * cot), argnums=(0, 1, 2))(theta, phi, g)
    for a, b in zip(gf, gd):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    jaxpr = str(jax.make_jaxpr(fast)(theta, phi, g))
    assert "37,23" not in jaxpr.replace(" ", "")  # no (N, M) intermediate


@pytest.mark.parametrize("mode", NON_LOCAL_MODES)
def test_round_trip_and_identity_init(mode):
    tmod = non_local_block(8, dimension=2, sub_sample=True, bn_layer=True, mode=mode)
    randomize_torch_module(tmod)
    sd = {k: v.numpy() for k, v in tmod.state_dict().items() if not k.endswith("num_batches_tracked")}
    block = NonLocalBlockND(8, dimension=2, mode=mode)
    x = jnp.ones((1, 6, 6, 8))
    back = to_torch(block, from_torch(block, sd, x), x)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    # Zero-init BN (bn_layer) or zero W: a fresh block is the identity, as in the paper.
    for bn_layer in (True, False):
        blk = NonLocalBlockND(8, dimension=2, mode=mode, bn_layer=bn_layer)
        xr = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 7, 8), dtype=np.float32))
        np.testing.assert_array_equal(blk.apply(blk.init(jax.random.PRNGKey(0), xr), xr), xr)


def test_bad_input():
    x = jnp.ones((2, 8, 8, 6))
    with pytest.raises(ValueError, match=r"NONLocalBlock2D: `x` must be 4-D"):
        NONLocalBlock2D(6).init(jax.random.PRNGKey(0), jnp.ones((2, 8, 6)))
    with pytest.raises(ValueError, match=r"NONLocalBlock2D: `x` must have 6 channels.*\(2, 8, 8, 5\)"):
        NONLocalBlock2D(6).init(jax.random.PRNGKey(0), jnp.ones((2, 8, 8, 5)))
    with pytest.raises(ValueError, match=r"`mode` must be one of"):
        NONLocalBlock2D(6, mode="cosine").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"sub_sample pools spatial axis 1 by 2.*size 1"):
        NONLocalBlock2D(6).init(jax.random.PRNGKey(0), jnp.ones((2, 8, 1, 6)))
    with pytest.raises(ValueError, match=r"NonLocalMNISTNet: `x` must be \(batch, 28, 28, 1\)"):
        NonLocalMNISTNet().init(jax.random.PRNGKey(0), jnp.ones((2, 32, 32, 1)))


def _digits(n=64):
    """sklearn's 8x8 digits as MNIST-like 28x28 images in [0, 1]: a 20x20 digit inside a 4-pixel border."""
    sklearn = pytest.importorskip("sklearn.datasets")
    d = sklearn.load_digits()
    imgs = torch.from_numpy(d.images[:n].astype(np.float32) / 16.0)[:, None]
    imgs = torch.nn.functional.interpolate(imgs, size=(20, 20), mode="bilinear", align_corners=False)
    imgs = torch.nn.functional.pad(imgs, (4, 4, 4, 4)).clamp(0, 1)
    return imgs.numpy(), d.target[:n]


def test_released_mnist_network(shared_data):
    path = shared_data / "nonlocal_mnist" / "net.pth"
    if not path.exists():
        pytest.skip(f"{path} not found")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    tnet = Network()
    tnet.load_state_dict({k.removeprefix("module."): v for k, v in raw.items()})
    tnet.eval()

    imgs, labels = _digits()
    net = NonLocalMNISTNet()
    x = jnp.asarray(np.moveaxis(imgs, 1, -1))
    variables = from_torch(net, str(path), x)  # strips DataParallel's "module."
    logits, maps = net.apply(variables, x, return_nl_map=True)
    with torch.no_grad():
        t_logits, t_maps = tnet(torch.from_numpy(imgs), return_nl_map=True)
    np.testing.assert_allclose(logits, t_logits.numpy(), atol=1e-4, rtol=1e-4)
    assert [m.shape for m in maps] == [(64, 196, 49), (64, 49, 9)]
    for m, tm in zip(maps, t_maps):
        np.testing.assert_allclose(m, tm.numpy(), atol=1e-5, rtol=1e-4)
    pred, t_pred = np.argmax(logits, -1), t_logits.argmax(-1).numpy()
    assert (pred == t_pred).all()
    # A trained MNIST net should recognise most of these unfamiliar (upsampled 8x8) digits.
    assert (pred == labels).mean() > 0.5


@pytest.mark.parametrize("mode", ["embedded_gaussian", "concatenation"])
def test_bfloat16_close_to_float32(mode):
    x = jnp.asarray(_x((2, 9, 11, 8))["x"])
    block = NonLocalBlockND(8, dimension=2, bn_layer=False, mode=mode)
    v = block.init(jax.random.PRNGKey(0), x)
    # W is zero-initialised: give it weights so the attention path shows in the output.
    v = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(1), a.shape), v)
    want = block.apply(v, x)
    got = NonLocalBlockND(8, dimension=2, bn_layer=False, mode=mode, dtype=jnp.bfloat16).apply(v, x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)
