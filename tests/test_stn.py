"""Spatial transformer: PyTorch-exact affine_grid/grid_sample (values and gradients) and the STN blocks."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from flax_attn import catalogue  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.ops import affine_grid, grid_sample  # noqa: E402
from flax_attn.stn import SpatialTransformer, STNTutorialNet, TutorialLocalization  # noqa: E402
from flax_attn.testing.parity import check_parity  # noqa: E402

ATOL = RTOL = 1e-5


def _grid(rng, n, ho, wo, h, w):
    """Random points in [-1.7, 1.7] plus the borders, the centre and exact half-pixel positions."""
    g = rng.uniform(-1.7, 1.7, (n, ho, wo, 2)).astype(np.float32)
    special = [-1.0, 1.0, 0.0, -1.0 - 1e-7, 1.0 + 1e-7]
    for i, v in enumerate(special):
        g[0, 0, i] = (v, special[-1 - i])
    # Unnormalised coordinate exactly k + 0.5 for both align_corners settings (round-half-even ties).
    g[1, 0, 0] = (2 * 2.5 / (w - 1) - 1, 2 * 1.5 / (h - 1) - 1)  # align_corners=True: x=2.5, y=1.5
    g[1, 0, 1] = (2 * 3.0 / w - 1, 2 * 2.0 / h - 1)  # align_corners=False: x=2.5, y=1.5
    return g


CASES = list(itertools.product(["bilinear", "nearest"], ["zeros", "border", "reflection"], [False, True]))


@pytest.mark.parametrize("mode,padding_mode,align_corners", CASES)
def test_grid_sample_matches_torch(mode, padding_mode, align_corners):
    rng = np.random.default_rng(1)
    n, h, w, c, ho, wo = 3, 5, 7, 2, 6, 9
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    g = _grid(rng, n, ho, wo, h, w)
    cot = rng.standard_normal((n, ho, wo, c)).astype(np.float32)

    xt = torch.tensor(np.moveaxis(x, -1, 1)).requires_grad_(True)
    gt = torch.tensor(g).requires_grad_(True)
    yt = F.grid_sample(xt, gt, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    (yt * torch.tensor(np.moveaxis(cot, -1, 1))).sum().backward()

    fn = lambda a, b: grid_sample(a, b, mode, padding_mode, align_corners)  # noqa: E731
    y, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(g))
    dx, dg = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(dg, gt.grad.numpy(), atol=ATOL, rtol=RTOL)


def test_nearest_rounds_half_to_even():
    x = jnp.arange(8.0).reshape(1, 1, 8, 1)
    # align_corners=True on width 8: x = 3.5 * 2 / 7 - 1 -> source 3.5 -> 4 (even); 2.5 -> 2.
    g = jnp.array([[[[3.5 * 2 / 7 - 1, 0.0], [2.5 * 2 / 7 - 1, 0.0]]]], jnp.float32)
    y = grid_sample(x, g, mode="nearest", align_corners=True)
    want = F.grid_sample(
        torch.arange(8.0).view(1, 1, 1, 8), torch.tensor(np.asarray(g)), mode="nearest", align_corners=True
    )
    np.testing.assert_array_equal(np.asarray(y).ravel(), want.numpy().ravel())


@pytest.mark.filterwarnings("ignore:Since version 1.3.0")  # torch on unit-size aligned grids
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("hw", [(13, 17), (1, 5), (4, 1)])
def test_affine_grid_matches_torch(hw, align_corners):
    rng = np.random.default_rng(2)
    theta = rng.standard_normal((3, 2, 3)).astype(np.float32)
    g = affine_grid(jnp.asarray(theta), (3, *hw, 2), align_corners=align_corners)
    want = F.affine_grid(torch.tensor(theta), (3, 2, *hw), align_corners=align_corners).numpy()
    np.testing.assert_allclose(g, want, atol=ATOL, rtol=RTOL)
    # Gradient with respect to theta.
    cot = rng.standard_normal(want.shape).astype(np.float32)
    tt = torch.tensor(theta, requires_grad=True)
    (F.affine_grid(tt, (3, 2, *hw), align_corners=align_corners) * torch.tensor(cot)).sum().backward()
    dth = jax.grad(lambda t: jnp.sum(affine_grid(t, (3, *hw, 2), align_corners) * cot))(jnp.asarray(theta))
    np.testing.assert_allclose(dth, tt.grad.numpy(), atol=1e-4, rtol=RTOL)  # sums of 221 products


def test_identity_theta_is_identity_warp():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9, 11, 3)), jnp.float32)
    theta = jnp.broadcast_to(jnp.array([[1.0, 0, 0], [0, 1.0, 0]]), (2, 2, 3))
    np.testing.assert_allclose(grid_sample(x, affine_grid(theta, x.shape)), x, atol=1e-5)


def test_bad_inputs():
    x = jnp.zeros((2, 5, 7, 3))
    with pytest.raises(ValueError, match=r"affine_grid: `theta` must have shape \(N, 2, 3\), got \(2, 3, 3\)"):
        affine_grid(jnp.zeros((2, 3, 3)), x.shape)
    with pytest.raises(ValueError, match="affine_grid: `theta` must be 3-D"):
        affine_grid(jnp.zeros((2, 6)), x.shape)
    with pytest.raises(ValueError, match=r"affine_grid: `size` must be \(N, H, W, C\)"):
        affine_grid(jnp.zeros((2, 2, 3)), (2, 5, 7))
    with pytest.raises(ValueError, match="affine_grid: batch of `size`"):
        affine_grid(jnp.zeros((3, 2, 3)), x.shape)
    with pytest.raises(ValueError, match=r"grid_sample: `grid` must end in 2 .* got shape \(2, 4, 4, 3\)"):
        grid_sample(x, jnp.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="grid_sample: `grid` must be 4-D"):
        grid_sample(x, jnp.zeros((2, 16, 2)))
    with pytest.raises(ValueError, match="grid_sample: batch of `grid`"):
        grid_sample(x, jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="grid_sample: `mode`"):
        grid_sample(x, jnp.zeros((2, 4, 4, 2)), mode="bicubic")
    with pytest.raises(ValueError, match="grid_sample: `padding_mode`"):
        grid_sample(x, jnp.zeros((2, 4, 4, 2)), padding_mode="wrap")
    loc = TutorialLocalization()
    with pytest.raises(ValueError, match=r"TutorialLocalization: `x` must be \(N, 28, 28, 1\)"):
        jax.eval_shape(SpatialTransformer(localization=loc).init, jax.random.PRNGKey(0), jnp.zeros((2, 29, 28, 1)))

    class Bad(TutorialLocalization):
        def __call__(self, x, *, train=False):
            return super().__call__(x).reshape(x.shape[0], 3, 2)[:, :2]

    with pytest.raises(ValueError, match=r"SpatialTransformer: the localization network must return .* got shape"):
        jax.eval_shape(SpatialTransformer(localization=Bad()).init, jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)))


def test_stn_starts_at_identity_and_names():
    stn = SpatialTransformer(localization=TutorialLocalization())
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 28, 28, 1)), jnp.float32)
    v = stn.init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(v["params"]["localization"]["fc_loc_2"]["kernel"], 0)
    np.testing.assert_array_equal(v["params"]["localization"]["fc_loc_2"]["bias"], [1, 0, 0, 0, 1, 0])
    np.testing.assert_allclose(stn.apply(v, x), x, atol=1e-5)
    sd = to_torch(stn, v, x)
    assert sorted(sd) == sorted(
        f"{m}.{i}.{p}"
        for m, idx in (("localization", (0, 3)), ("fc_loc", (0, 2)))
        for i in idx
        for p in ("weight", "bias")
    )


@pytest.mark.parametrize(
    "config",
    [
        dict(in_channels=1, input_size=(28, 28), mode="nearest", padding_mode="zeros", align_corners=False),
        dict(in_channels=2, input_size=(29, 33), mode="bilinear", padding_mode="reflection", align_corners=True),
    ],
    ids=["nearest-zeros", "bilinear-reflection-aligned"],
)
def test_stn_options_parity(config):
    entry = catalogue.get("spatial_transformer")
    h, w = config["input_size"]
    rng = np.random.default_rng(5)
    inputs = {"x": rng.standard_normal((3, h, w, config["in_channels"])).astype(np.float32)}
    check_parity(entry, config=config, inputs=inputs, check_grads=config["mode"] == "bilinear")


def test_tutorial_net_round_trip_and_keys():
    torch.manual_seed(0)
    from flax_attn.testing.torch_ref.stn import Net

    tnet = Net()
    sd = {k: v.numpy() for k, v in tnet.state_dict().items()}
    x = jnp.zeros((1, 28, 28, 1))
    fnet = STNTutorialNet()
    v = from_torch(fnet, sd, x)
    back = to_torch(fnet, v, x)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_bfloat16_close_to_float32():
    # A smooth image and border padding: theta carries bf16 rounding from the localisation net (~0.5%,
    # i.e. ~0.07 pixel here); on white noise, or at a zero-padded edge, such a shift changes samples by
    # O(1) times the shift, which no bf16 bound can cover.
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    img = np.sin(3 * xx + 1) * np.cos(2 * yy) + 0.5 * xx
    x = jnp.asarray(np.stack([img, img.T])[..., None], jnp.float32)
    stn = SpatialTransformer(localization=TutorialLocalization(), padding_mode="border")
    v = stn.init(jax.random.PRNGKey(0), x)
    v = jax.tree_util.tree_map(lambda a: a + 0.05 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), v)
    want = stn.apply(v, x)
    bf = SpatialTransformer(localization=TutorialLocalization(dtype=jnp.bfloat16), padding_mode="border")
    got = bf.apply(v, x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)
