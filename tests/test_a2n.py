"""A2N (arXiv 2104.09497): variants, key layout, visualisation outputs, bad input, released checkpoints."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn import catalogue, sr_metrics  # noqa: E402
from flax_attn.a2n import A2N, AAB, PA, AttentionBranch  # noqa: E402
from flax_attn.convert import from_torch, load_state_dict, mapping, to_torch  # noqa: E402
from flax_attn.ops import attention_dropout_weights, mix_branches, sigmoid_gate  # noqa: E402
from flax_attn.testing.parity import check_parity, randomize_torch_module  # noqa: E402
from flax_attn.testing.torch_ref import a2n as ref  # noqa: E402

SET5 = ("baby", "bird", "butterfly", "head", "woman")
# Official Set5 Y-PSNR of the released models with this protocol (shared/data/README.md).
OFFICIAL_PSNR = {2: 38.06, 3: 34.48}


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


# --------------------------------------------------------------------------- parity of the variants


@pytest.mark.parametrize("override", [dict(scale=2), dict(scale=3, non_attention_kernel=1)], ids=["x2", "x3_a2n_m"])
def test_a2n_variants_parity(override):
    # The catalogue entry covers scale 4 (two reconstruction stages); 2 and 3 take one stage, 3 with
    # a non-power-of-two nearest upsampling and bilinear skip, here with the A2N-M 1x1 branch.
    # (Each new configuration costs ~10 s of eager JAX op compilation in the harness.)
    entry = catalogue.get("a2n")
    check_parity(entry, config={**entry.config, **override})


@pytest.mark.parametrize(
    "override",
    [dict(K=3), dict(t=1.0), dict(reduction=2), dict(non_attention_kernel=1)],
    ids=["K3", "t1", "reduction2", "a2n_m"],
)
def test_aab_options_parity(override):
    entry = catalogue.get("aab")
    check_parity(entry, config={**entry.config, **override})


def test_aab_temperature_matters():
    # Sanity check that the parity test can fail: a Flax AAB with a different temperature than
    # the reference must not match it (t=1 makes the branch weights far from uniform).
    entry = catalogue.get("aab")
    tmod = ref.AAB(**entry.config)
    randomize_torch_module(tmod)
    with torch.no_grad():  # make the ADM logits large so the temperature shows
        tmod.ADM[2].weight.mul_(50.0)
    x = np.random.default_rng(0).standard_normal((2, 9, 11, 8), dtype=np.float32)
    want = _nhwc(tmod(_nchw(x)))
    fmod = AAB(**{**entry.config, "t": 1.0})
    got = fmod.apply(from_torch(fmod, tmod.state_dict(), jnp.asarray(x)), jnp.asarray(x))
    assert np.abs(np.asarray(got) - want).max() > 1e-3


def test_aab_bfloat16_close_to_float32():
    entry = catalogue.get("aab")
    tmod = ref.AAB(**entry.config)
    randomize_torch_module(tmod)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 13, 17, 8), dtype=np.float32))
    f32 = AAB(**entry.config)
    bf16 = AAB(**entry.config, dtype=jnp.bfloat16)
    variables = from_torch(f32, tmod.state_dict(), x)
    want = np.asarray(f32.apply(variables, x))
    got, inter = bf16.apply(variables, x, mutable=["intermediates"])
    assert got.dtype == jnp.bfloat16
    # The ADM weights stay float32 whatever the compute dtype.
    assert inter["intermediates"]["attention_dropout"][0].dtype == jnp.float32
    err = np.abs(np.asarray(got, np.float32) - want).max()
    assert err < 5e-2 * max(1.0, np.abs(want).max()), err


# --------------------------------------------------------------------------- key layout and round trips


def test_official_key_names_x2():
    # The full-size network names every tensor exactly as the official AAN (172 keys at x2).
    model = A2N(scale=2)
    names = sorted(mapping(model, jnp.zeros((1, 8, 8, 3))).values())
    want = sorted(ref.AAN(scale=2).state_dict().keys())
    assert len(want) == 172
    assert names == want
    assert "AAB_trunk.15.ADM.2.weight" in names and "att1.conv.bias" in names


@pytest.mark.parametrize("scale", [3, 4])
def test_round_trip(scale):
    tmod = ref.AAN(nf=8, unf=6, nb=2, scale=scale)
    randomize_torch_module(tmod)
    sd = {k: v.numpy() for k, v in tmod.state_dict().items()}
    model = A2N(nf=8, unf=6, nb=2, scale=scale)
    x = jnp.zeros((1, 5, 7, 3))
    back = to_torch(model, from_torch(model, sd, x), x)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    if scale == 4:
        assert "upconv2.weight" in back and "att2.conv.weight" in back


# --------------------------------------------------------------------------- visualisation outputs


def test_intermediates_match_torch():
    """The sown ADM weights and attention maps equal the reference's, read with forward hooks."""
    tmod = ref.AAN(nf=8, unf=6, nb=2, scale=4)
    randomize_torch_module(tmod)
    x = np.random.default_rng(2).standard_normal((2, 7, 9, 3), dtype=np.float32)
    seen = {}

    def save(name):
        return lambda m, i, o: seen.__setitem__(name, o.detach())

    # ADM output logits, the attention branch's sigmoid, and the PA sigmoids.
    tmod.AAB_trunk[1].ADM.register_forward_hook(save("adm1"))
    tmod.AAB_trunk[0].attention.sigmoid.register_forward_hook(save("branch0"))
    tmod.att1.sigmoid.register_forward_hook(save("pa1"))
    tmod.att2.sigmoid.register_forward_hook(save("pa2"))
    tmod(_nchw(x))

    model = A2N(nf=8, unf=6, nb=2, scale=4)
    variables = from_torch(model, tmod.state_dict(), jnp.asarray(x))
    _, state = model.apply(variables, jnp.asarray(x), mutable=["intermediates"])
    inter = state["intermediates"]
    ax = np.asarray(inter["AAB_trunk_1"]["attention_dropout"][0])
    assert ax.shape == (2, 2)
    np.testing.assert_allclose(ax.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(ax, torch.softmax(seen["adm1"] / 30, dim=1).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(inter["AAB_trunk_0"]["attention"]["attention_map"][0]), _nhwc(seen["branch0"]), atol=1e-5
    )
    pa1 = np.asarray(inter["att1"]["attention_map"][0])
    assert pa1.shape == (2, 14, 18, 6)
    np.testing.assert_allclose(pa1, _nhwc(seen["pa1"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(inter["att2"]["attention_map"][0]), _nhwc(seen["pa2"]), atol=1e-5)


# --------------------------------------------------------------------------- ops


def test_attention_dropout_weights():
    logits = jnp.asarray([[3.0, -3.0], [0.0, 0.0]])
    w = np.asarray(attention_dropout_weights(logits, 30.0))
    np.testing.assert_allclose(w[0], np.exp([0.1, -0.1]) / np.exp([0.1, -0.1]).sum(), rtol=1e-6)
    np.testing.assert_allclose(w[1], [0.5, 0.5])
    with pytest.raises(ValueError, match="temperature"):
        attention_dropout_weights(logits, 0.0)
    with pytest.raises(ValueError, match=r"attention_dropout_weights: `logits` must be 2-D"):
        attention_dropout_weights(logits[0], 30.0)


def test_mix_and_gate():
    a = jnp.ones((2, 3, 4, 5))
    b = 2 * jnp.ones((2, 3, 4, 5))
    w = jnp.asarray([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]])
    out = np.asarray(mix_branches(a, b, w))
    np.testing.assert_allclose(out[0], 1.75)
    np.testing.assert_allclose(out[1], 1.0)
    with pytest.raises(ValueError, match=r"mix_branches: `weights` must be \(batch=2, K>=2\)"):
        mix_branches(a, b, w[:, :1])
    with pytest.raises(ValueError, match="must match"):
        mix_branches(a, b[:, :2], w)
    gated, att = sigmoid_gate(2 * a, jnp.zeros_like(a))
    np.testing.assert_allclose(np.asarray(att), 0.5)
    np.testing.assert_allclose(np.asarray(gated), 1.0)


# --------------------------------------------------------------------------- bad input


_TINY = A2N(nf=8, unf=6, nb=1, scale=2)


def _init(module, x):
    return module.init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize(
    "module, shape, match",
    [
        (_TINY, (8, 8, 3), r"A2N: `x` must be 4-D \(batch, height, width, channels\), got shape \(8, 8, 3\)"),
        (_TINY, (1, 8, 8, 4), r"A2N: `x` must have 3 channels .* got shape \(1, 8, 8, 4\)"),
        (A2N(in_nc=1, out_nc=1, nf=8, unf=6, nb=1), (1, 8, 8, 3), r"A2N: `x` must have 1 channels"),
        (A2N(nf=8, unf=6, nb=1, scale=5), (1, 8, 8, 3), r"A2N: `scale` must be 2, 3 or 4, got 5"),
        (A2N(in_nc=3, out_nc=1, nf=8, unf=6, nb=1), (1, 8, 8, 3), r"A2N: `in_nc`=3 must equal `out_nc`=1"),
        (AAB(nf=8), (1, 8, 8, 6), r"AAB: `x` must have 8 channels .* got shape \(1, 8, 8, 6\)"),
        (AAB(nf=8), (8, 8, 8), r"AAB: `x` must be 4-D"),
        (AAB(nf=8, K=1), (1, 8, 8, 8), r"AAB: `K` must be >= 2"),
        (AAB(nf=8, non_attention_kernel=5), (1, 8, 8, 8), r"`non_attention_kernel` must be 3 \(A2N\) or 1"),
        (AAB(nf=2, reduction=4), (1, 8, 8, 2), r"AAB: `nf` // `reduction` must be >= 1"),
        (PA(nf=6), (1, 8, 8, 5), r"PA: `x` must have 6 channels"),
        (AttentionBranch(nf=6), (1, 8, 6), r"AttentionBranch: `x` must be 4-D"),
    ],
)
def test_bad_input(module, shape, match):
    with pytest.raises(ValueError, match=match):
        _init(module, jnp.zeros(shape))


# --------------------------------------------------------------------------- released checkpoints, Set5


def _set5(shared_data):
    from PIL import Image

    folder = shared_data / "set5"
    return {n: np.asarray(Image.open(folder / f"{n}.png").convert("RGB")) for n in SET5}


def _load_official(shared_data, scale):
    path = shared_data / "a2n" / f"aan_x{scale}.pt"
    if not path.exists():
        pytest.skip(f"{path} not available")
    sd = load_state_dict(path)
    assert len(sd) == 172
    model = A2N(scale=scale)
    return model, from_torch(model, sd, jnp.zeros((1, 8, 8, 3))), sd


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("scale", [2, 3])
def test_released_checkpoint_set5_psnr(shared_data, scale):
    """The Flax port of the released model reproduces the official Set5 Y-PSNR to 0.01 dB."""
    model, variables, _ = _load_official(shared_data, scale)
    images = _set5(shared_data)
    # One compilation per image size (five sizes); whole-image inference, no tiling, as the
    # official test does. About 10-15 s per scale on two CPU cores.
    apply = jax.jit(model.apply)
    start = time.perf_counter()
    psnrs = sr_metrics.evaluate_sr(lambda lr: apply(variables, jnp.asarray(lr)[None])[0], images.values(), scale)
    elapsed = time.perf_counter() - start
    bicubic = sr_metrics.evaluate_sr(
        lambda lr: sr_metrics.bicubic_upscale(lr.astype(np.uint8), scale), images.values(), scale
    )
    mean = float(np.mean(psnrs))
    print(f"x{scale}: A2N {mean:.4f} dB, bicubic {np.mean(bicubic):.4f} dB, {elapsed:.1f} s")
    assert abs(mean - OFFICIAL_PSNR[scale]) < 0.01, (mean, psnrs)
    # Every image is far better than bicubic: the weights really are used.
    assert all(p > b + 1.0 for p, b in zip(psnrs, bicubic)), (psnrs, bicubic)


@pytest.mark.data
def test_released_checkpoint_matches_torch(shared_data):
    """Same checkpoint, same Set5 image: the PyTorch reference and the Flax port give the same SR."""
    model, variables, sd = _load_official(shared_data, 3)
    hr = sr_metrics.crop_to_scale(_set5(shared_data)["butterfly"], 3)
    lr = sr_metrics.bicubic_downscale(hr, 3).astype(np.float32)
    tmod = ref.AAN(scale=3)
    tmod.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    tmod.eval()
    threads = torch.get_num_threads()
    # On a shared CPU, torch's intra-op threads can spin against each other (10x slower here).
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            want = _nhwc(tmod(_nchw(lr[None])))[0]
    finally:
        torch.set_num_threads(threads)
    got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(lr)[None]))[0]
    assert got.shape == hr.shape
    # Outputs are in [0, 255] after 16 blocks: float32 rounding reaches ~5e-4 here.
    np.testing.assert_allclose(got, want, atol=5e-3, rtol=1e-5)
    # The saved images agree except where a value sits on a rounding boundary.
    differ = sr_metrics.quantize(got) != sr_metrics.quantize(want)
    assert differ.mean() < 1e-4, differ.sum()
    assert (
        abs(sr_metrics.psnr_y(sr_metrics.quantize(got), hr, 3) - sr_metrics.psnr_y(sr_metrics.quantize(want), hr, 3))
        < 1e-3
    )


# --------------------------------------------------------------------------- metric protocol


def test_psnr_y_protocol():
    rng = np.random.default_rng(3)
    hr = rng.integers(0, 200, (20, 22, 3), dtype=np.uint8)  # room for +10 without clipping
    sr = hr.astype(np.float64).copy()
    sr[5, 6, 1] += 10.0  # inside the shaved area's complement
    sr[0, 0, :] += 100.0  # on the border: shaved away
    y_err = 129.057 / 256 * 10.0
    want = 10 * np.log10(255.0**2 / (y_err**2 / (16 * 18)))
    assert abs(sr_metrics.psnr_y(sr_metrics.quantize(sr), hr, 2) - want) < 1e-9
    np.testing.assert_allclose(sr_metrics.rgb_to_y(np.array([255.0, 255.0, 255.0])), 235.0, atol=0.1)
    np.testing.assert_allclose(sr_metrics.rgb_to_y(np.zeros(3)), 16.0)
    assert sr_metrics.crop_to_scale(hr, 3).shape == (18, 21, 3)
    assert sr_metrics.bicubic_downscale(sr_metrics.crop_to_scale(hr, 3), 3).shape == (6, 7, 3)
    with pytest.raises(ValueError, match="not a multiple of scale 3"):
        sr_metrics.bicubic_downscale(hr, 3)
    with pytest.raises(ValueError, match="same shape"):
        sr_metrics.psnr_y(hr[:10], hr, 2)


def test_sr_metrics_one_implementation_numpy_and_jit():
    """The trainer's jitted metrics and the float64 protocol are the same functions: on a batch they
    agree to float32 rounding, per image, with the JAX path traced under jit."""
    rng = np.random.default_rng(4)
    hr = rng.integers(0, 256, (2, 24, 26, 3)).astype(np.float64)
    sr = np.clip(hr + rng.normal(0, 6, hr.shape), 0, 255).round()
    want = [sr_metrics.psnr_y(sr[i], hr[i], 2) for i in range(2)]
    assert all(isinstance(w, float) for w in want)
    got = jax.jit(lambda a, b: sr_metrics.psnr_y(a, b, 2))(jnp.asarray(sr, jnp.float32), jnp.asarray(hr, jnp.float32))
    assert got.dtype == jnp.float32 and got.shape == (2,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    np.testing.assert_allclose(sr_metrics.psnr_y(sr, hr, 2), want, rtol=1e-12)  # a NumPy batch, float64
    assert sr_metrics.psnr_y(hr[0], hr[0], 2) == float("inf")  # the protocol's value for a perfect image
    assert np.isfinite(float(sr_metrics.psnr_y(jnp.asarray(hr[0]), jnp.asarray(hr[0]), 2)))  # floored MSE
    ssim = jax.jit(lambda a, b: sr_metrics.ssim_y(a, b, 2))(jnp.asarray(sr), jnp.asarray(hr))
    assert ssim.shape == (2,) and bool(jnp.all((ssim > 0.5) & (ssim < 1)))
    np.testing.assert_allclose(sr_metrics.ssim_y(hr, hr, 2), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"ssim_y: `shave`=12 leaves nothing of a 24x26 image"):
        sr_metrics.ssim_y(sr, hr, 12)
