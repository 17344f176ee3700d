"""AANet network: stereo ops, feature extractor, refinement, whole model, loading, real stereo pair."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import catalogue  # noqa: E402
from flax_attn.aanet import AANet, DisparityEstimation, FeaturePyramidNetwork, StereoDRNetRefinement  # noqa: E402
from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.ops import correlation_cost_volume, disparity_regression, disparity_warp  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref import aanet as tref  # noqa: E402

KEY = jax.random.PRNGKey(0)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


# --------------------------------------------------------------------------- ops


def test_correlation_cost_volume_matches_official_loop():
    rng = np.random.default_rng(0)
    left = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)
    right = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)
    # max_disp beyond the width: AANet leaves those candidates at zero.
    for d in (1, 4, 9):
        want = tref.CostVolume(d)(_nchw(left), _nchw(right)).numpy()
        got = np.moveaxis(np.asarray(correlation_cost_volume(jnp.asarray(left), jnp.asarray(right), d)), -1, 1)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
    got = np.asarray(correlation_cost_volume(jnp.asarray(left), jnp.asarray(right), 4))
    assert np.all(got[:, :, :3, 3] == 0) and np.all(got[:, :, 3:, 3] != 0)


@pytest.mark.parametrize("match_similarity", [True, False])
def test_disparity_regression_soft_argmin(match_similarity):
    rng = np.random.default_rng(1)
    cost = 4 * rng.standard_normal((2, 5, 7, 9)).astype(np.float32)
    want = tref.DisparityEstimation(12, match_similarity)(_nchw(cost)).numpy()
    got = disparity_regression(jnp.asarray(cost), match_similarity=match_similarity)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert got.min() >= 0 and got.max() <= 8
    # a peaked similarity gives its argmin/argmax candidate
    peaked = jnp.asarray(100.0 * np.eye(9, dtype=np.float32)[[3]].reshape(1, 1, 1, 9))
    assert float(
        disparity_regression(peaked if match_similarity else -peaked, match_similarity=match_similarity)[0, 0, 0]
    ) == pytest.approx(3.0)


def test_disparity_warp_shifts_by_integer_disparity():
    rng = np.random.default_rng(2)
    img = rng.standard_normal((1, 4, 8, 3)).astype(np.float32)
    disp = np.full((1, 4, 8), 2.0, np.float32)
    got = np.asarray(disparity_warp(jnp.asarray(img), jnp.asarray(disp)))
    np.testing.assert_allclose(got[:, :, 2:], img[:, :, :-2], atol=1e-6)
    np.testing.assert_allclose(got[:, :, :2], np.repeat(img[:, :, :1], 2, axis=2), atol=1e-6)  # border
    want = tref.disp_warp(_nchw(img), torch.from_numpy(disp[:, None] + 0.37)).numpy()
    got = disparity_warp(jnp.asarray(img), jnp.asarray(disp + 0.37))
    np.testing.assert_allclose(np.moveaxis(np.asarray(got), -1, 1), want, atol=1e-6, rtol=1e-5)


def test_op_bad_inputs():
    a = jnp.zeros((1, 4, 6, 8))
    with pytest.raises(ValueError, match=r"correlation_cost_volume: `left` and `right` must have the same shape"):
        correlation_cost_volume(a, jnp.zeros((1, 4, 7, 8)), 3)
    with pytest.raises(ValueError, match="correlation_cost_volume: `max_disp` must be a positive int, got 0"):
        correlation_cost_volume(a, a, 0)
    with pytest.raises(ValueError, match=r"disparity_regression: `cost` must be 4-D"):
        disparity_regression(jnp.zeros((4, 6, 8)))
    with pytest.raises(ValueError, match=r"disparity_warp: `disp` must have shape \(1, 4, 6\)"):
        disparity_warp(a, jnp.zeros((1, 4, 5)))


# --------------------------------------------------------------------------- blocks


def test_feature_extractor_deformable_eval():
    entry = catalogue.get("aanet_feature")
    x = {"x": np.random.default_rng(3).standard_normal((2, 13, 17, 3)).astype(np.float32)}
    check_parity(entry, config=dict(in_channels=4, feature_mdconv=True), inputs=x)


def test_feature_extractor_init_and_keys():
    t = tref.AANetFeature(in_channels=4)
    sd = t.state_dict()
    for k in (
        "conv1.0.weight",
        "conv1.1.running_var",
        "layer1.0.downsample.0.weight",
        "layer2.0.downsample.1.bias",
        "layer3.5.conv2.offset_conv.weight",
        "layer3.0.conv2.deform_conv.weight",
        "layer2.3.bn3.weight",
    ):
        assert k in sd, k
    from flax_attn.aanet import AANetFeature

    x = jnp.zeros((1, 13, 17, 3))
    v = jax.jit(AANetFeature(in_channels=4).init)(KEY, x)
    p = v["params"]
    assert np.all(np.asarray(p["layer2_3"]["bn3"]["scale"]) == 0)  # zero-init residual (plain bottlenecks)
    assert np.all(np.asarray(p["layer3_0"]["bn3"]["scale"]) == 1)  # AANet's DeformBottleneck is not zeroed
    assert np.any(np.asarray(p["layer3_0"]["conv2"]["offset_conv"]["kernel"]) != 0)  # kaiming loop reaches it
    assert sorted(to_torch(AANetFeature(in_channels=4), v, x)) == sorted(
        k for k in sd if not k.endswith("num_batches_tracked")
    )


def test_refinement_at_full_resolution():
    """scale 1: the disparity is used as is (no upsampling), as in AANet."""
    entry = catalogue.get("aanet_stereodrnet_refinement")
    rng = np.random.default_rng(4)
    inputs = {
        "low_disp": rng.uniform(0, 3, (2, 9, 11)).astype(np.float32),
        "left_img": rng.standard_normal((2, 9, 11, 3)).astype(np.float32),
        "right_img": rng.standard_normal((2, 9, 11, 3)).astype(np.float32),
    }
    check_parity(entry, inputs=inputs, train=True)


def test_block_bad_inputs():
    img = jnp.zeros((1, 8, 12, 3))
    with pytest.raises(ValueError, match=r"StereoDRNetRefinement: `left_img` and `right_img` must have the same shape"):
        jax.eval_shape(StereoDRNetRefinement().init, KEY, jnp.zeros((1, 4, 6)), img, jnp.zeros((1, 8, 10, 3)))
    fpn = FeaturePyramidNetwork(in_channels=(4, 4, 4), out_channels=4)
    with pytest.raises(ValueError, match=r"FeaturePyramidNetwork: level 0 must be twice level 1 in size"):
        jax.eval_shape(fpn.init, KEY, [jnp.zeros((1, 7, 8, 4)), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 2, 2, 4))])
    with pytest.raises(ValueError, match="DisparityEstimation: `cost_volume` has 9 candidates, more than max_disp=8"):
        DisparityEstimation(8).apply({}, jnp.zeros((1, 3, 3, 9)))


# --------------------------------------------------------------------------- whole network

_TINY = dict(max_disp=48, num_fusions=2, num_deform_blocks=1, feature_pyramid_network=True)


def test_network_bad_inputs():
    img = jnp.zeros((1, 24, 36, 3))
    with pytest.raises(ValueError, match=r"AANet: `left_img` and `right_img` must have the same shape"):
        jax.eval_shape(AANet(**_TINY).init, KEY, img, jnp.zeros((1, 24, 48, 3)))
    with pytest.raises(ValueError, match=r"AANet: image height and width must be multiples of 12.*got 26x36"):
        jax.eval_shape(AANet(**_TINY).init, KEY, jnp.zeros((1, 26, 36, 3)), jnp.zeros((1, 26, 36, 3)))
    with pytest.raises(ValueError, match=r"AANet: `max_disp`=36 must be divisible by 24"):
        jax.eval_shape(AANet(**{**_TINY, "max_disp": 36}).init, KEY, img, img)
    with pytest.raises(ValueError, match=r"AANet: only aggregation_type in \('adaptive',\) is implemented"):
        jax.eval_shape(AANet(**{**_TINY, "aggregation_type": "psmnet_basic"}).init, KEY, img, img)
    with pytest.raises(ValueError, match=r"AANet: `left_img` must have 3 channels"):
        jax.eval_shape(AANet(**_TINY).init, KEY, jnp.zeros((1, 24, 36, 1)), jnp.zeros((1, 24, 36, 1)))


@pytest.fixture(scope="module")
def official_aanet():
    """The released AANet's configuration (scripts/aanet_predict.sh) on a 1x3x48x72 pair, eval mode."""
    cfg = dict(max_disp=48, feature_pyramid_network=True, no_intermediate_supervision=True)
    torch.manual_seed(0)
    t = tref.AANet(**cfg)
    randomize_torch_module(t, 0)
    t.eval()
    sd = {k: v.detach().numpy() for k, v in t.state_dict().items()}
    rng = np.random.default_rng(5)
    left = rng.standard_normal((1, 48, 72, 3)).astype(np.float32)
    right = np.roll(left, -3, axis=2) + 0.1 * rng.standard_normal(left.shape).astype(np.float32)
    return cfg, t, sd, left, right


@pytest.mark.slow
def test_official_config_parity_and_strict_loading(official_aanet):
    cfg, t, sd, left, right = official_aanet
    m = AANet(**cfg)
    for k in (
        "feature_extractor.layer3.5.conv2.offset_conv.weight",
        "fpn.fpn_convs.2.1.running_mean",
        "fpn.lateral_convs.0.bias",
        "aggregation.fusions.5.branches.2.0.conv2.deform_conv.weight",
        "aggregation.final_conv.0.weight",
        "refinement.1.dilated_blocks.5.conv2.weight",
        "refinement.0.conv2.1.weight",
        "refinement.1.final_conv.bias",
    ):
        assert k in sd, k
    assert "aggregation.final_conv.1.weight" not in sd  # no intermediate supervision: one final conv
    variables = from_torch(m, sd, jnp.asarray(left), jnp.asarray(right))  # strict: every key used
    with torch.no_grad():
        want = [o.numpy() for o in t(_nchw(left), _nchw(right))]
    got = jax.jit(lambda v, a, b: m.apply(v, a, b))(variables, jnp.asarray(left), jnp.asarray(right))
    assert [g.shape for g in got] == [(1, 16, 24), (1, 24, 36), (1, 48, 72)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=1e-4)
    back = to_torch(m, variables, jnp.asarray(left), jnp.asarray(right))
    assert sorted(back) == sorted(k for k in sd if not k.endswith("num_batches_tracked"))
    for k in back:
        np.testing.assert_array_equal(back[k], sd[k])


@pytest.mark.slow  # one compile of a whole AANet (about 50 s on 2 shared CPU cores)
def test_skimage_stereo_motorcycle_shape_range_and_baseline_epe():
    """A real stereo pair with ground truth (Middlebury 2014 motorcycle, via scikit-image).

    The network is randomly initialised, so the end-point error is only a baseline to compare a
    trained model with: it is reported, not asserted.
    """
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    left, right, gt = skimage_data.stereo_motorcycle()
    h0, w0 = gt.shape
    h, w = 48, 72  # multiples of 12, aspect ratio close to the original 500x741
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def prep(img):
        x = resize(img.astype(np.float64) / 255.0, (h, w), order=1, anti_aliasing=True)
        return ((x - mean) / std).astype(np.float32)[None]

    # Disparities are horizontal pixel offsets: they scale with the width.
    valid = np.isfinite(gt)
    gt_small = resize(np.where(valid, gt, 0.0), (h, w), order=0, anti_aliasing=False) * (w / w0)
    valid_small = resize(valid.astype(np.float64), (h, w), order=0, anti_aliasing=False) > 0.5
    max_disp = 48
    net = AANet(
        max_disp=max_disp,
        num_fusions=2,
        num_deform_blocks=1,
        feature_pyramid_network=True,
        no_intermediate_supervision=True,
    )
    lj, rj = jnp.asarray(prep(left)), jnp.asarray(prep(right))
    variables = net.init(KEY, lj, rj)
    pyramid = jax.jit(lambda v, a, b: net.apply(v, a, b))(variables, lj, rj)
    pred = np.asarray(pyramid[-1])[0]
    assert pred.shape == (h, w) and np.isfinite(pred).all()
    # soft-argmin over max_disp // 3 candidates at 1/3 resolution, scaled by 3 to full resolution;
    # the random refinement residuals are small at init (zero offsets, unit BN), so it stays in range.
    coarse = np.asarray(pyramid[0])[0]
    assert coarse.min() >= 0 and coarse.max() <= max_disp // 3 - 1
    assert pred.min() >= 0 and pred.max() < max_disp
    epe = float(np.abs(pred - gt_small)[valid_small].mean())
    print(
        f"\nstereo_motorcycle {h}x{w} (gt disparity max {gt_small[valid_small].max():.1f}): random-init AANet "
        f"EPE {epe:.2f} px (baseline before any training)"
    )
