"""Deformable convolution: the op against a numpy loop and the plain-torch reference; the blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_attn.convert import from_torch, to_torch  # noqa: E402
from flax_attn.deform import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack  # noqa: E402
from flax_attn.ops import deform_conv2d  # noqa: E402
from flax_attn.testing.torch_ref import deform as tref  # noqa: E402

ATOL = RTOL = 1e-5


def _numpy_deform(x, offset, weight, bias, stride, pad, dil, mask):
    """A direct loop over every output, channel and kernel point (NHWC, HWIO), torchvision semantics."""
    n, h, w, c = x.shape
    kh, kw, cin_g, out_c = weight.shape
    groups = c // cin_g
    k = kh * kw
    og = offset.shape[-1] // (2 * k)
    _, ho, wo, _ = offset.shape

    def sample(img, y, xx):
        if y <= -1 or y >= h or xx <= -1 or xx >= w:
            return 0.0
        y0, x0 = int(np.floor(y)), int(np.floor(xx))
        ly, lx = y - y0, xx - x0
        total = 0.0
        for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
            for xq, wx in ((x0, 1 - lx), (x0 + 1, lx)):
                if 0 <= yy < h and 0 <= xq < w:
                    total += wy * wx * img[yy, xq]
        return total

    out = np.zeros((n, ho, wo, out_c))
    for b in range(n):
        for oy in range(ho):
            for ox in range(wo):
                for o in range(out_c):
                    g = o // (out_c // groups)
                    acc = 0.0 if bias is None else float(bias[o])
                    for ci in range(cin_g):
                        ch = g * cin_g + ci
                        grp = ch // (c // og)
                        for i in range(kh):
                            for j in range(kw):
                                kk = grp * k + i * kw + j
                                y = oy * stride - pad + i * dil + offset[b, oy, ox, 2 * kk]
                                xx = ox * stride - pad + j * dil + offset[b, oy, ox, 2 * kk + 1]
                                v = sample(x[b, :, :, ch], y, xx)
                                if mask is not None:
                                    v *= mask[b, oy, ox, kk]
                                acc += v * weight[i, j, ci, o]
                    out[b, oy, ox, o] = acc
    return out


def test_against_numpy_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 5, 4))
    weight = rng.standard_normal((2, 3, 2, 2))  # groups = 2
    bias = rng.standard_normal(2)
    ho, wo = 3, 3  # stride 2, padding 1, dilation 1 on 4x5 with a 2x3 kernel
    offset = 1.5 * rng.standard_normal((1, ho, wo, 2 * 2 * 6))  # offset groups 2
    offset[0, 0, 0, :4] = [-1.0, 0.0, 4.0, -1.0]  # exactly on the zero-region borders (y = -1, y = H)
    mask = rng.uniform(size=(1, ho, wo, 2 * 6))
    want = _numpy_deform(x, offset, weight, bias, 2, 1, 1, mask)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = deform_conv2d(f32(x), f32(offset), f32(weight), f32(bias), stride=2, padding=1, mask=f32(mask))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("with_mask", [False, True], ids=["v1", "v2"])
def test_op_matches_torch_reference_values_and_grads(with_mask):
    rng = np.random.default_rng(1)
    n, h, w, c, o, kh, kw, groups, og = 3, 7, 9, 4, 6, 3, 2, 2, 2
    st, pd, dl = (2, 1), (1, 2), (1, 2)
    ho = (h + 2 * pd[0] - dl[0] * (kh - 1) - 1) // st[0] + 1
    wo = (w + 2 * pd[1] - dl[1] * (kw - 1) - 1) // st[1] + 1
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    off = (3 * rng.standard_normal((n, ho, wo, 2 * og * kh * kw))).astype(np.float32)
    off[0, 0, 0, :6] = [-1.0, 0.0, 0.0, -3.0, 7.0, 0.0]  # integer offsets landing on -1 and on H
    mask = rng.uniform(size=(n, ho, wo, og * kh * kw)).astype(np.float32) if with_mask else None
    wt = rng.standard_normal((kh, kw, c // groups, o)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    args = [x, off, wt, b] + ([mask] if with_mask else [])

    def f(x, off, wt, b, *m):
        return deform_conv2d(x, off, wt, b, stride=st, padding=pd, dilation=dl, mask=m[0] if m else None)

    y, vjp = jax.vjp(f, *map(jnp.asarray, args))
    cot = rng.standard_normal(y.shape).astype(np.float32)
    grads = vjp(jnp.asarray(cot))

    nchw = lambda a: torch.tensor(np.moveaxis(a, -1, 1)).requires_grad_(True)  # noqa: E731
    xt, ot = nchw(x), nchw(off)
    mt = nchw(mask) if with_mask else None
    wtt = torch.tensor(wt.transpose(3, 2, 0, 1)).requires_grad_(True)
    bt = torch.tensor(b).requires_grad_(True)
    yt = tref.deform_conv2d(xt, ot, wtt, bt, st, pd, dl, mt)
    (yt * torch.tensor(np.moveaxis(cot, -1, 1))).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), atol=ATOL, rtol=RTOL)
    back = lambda t: t.grad.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    want = [back(xt), back(ot), wtt.grad.numpy().transpose(2, 3, 1, 0), bt.grad.numpy()]
    if with_mask:
        want.append(back(mt))
    for name, g, wg in zip(["x", "offset", "weight", "bias", "mask"], grads, want):
        # weight/bias gradients sum ~100 products of O(10) terms: 1e-5 relative to their scale
        np.testing.assert_allclose(g, wg, atol=1e-4 if name in ("weight", "bias") else ATOL, rtol=RTOL, err_msg=name)


def test_zero_offsets_is_a_plain_convolution():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 9, 11, 4)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((3, 3, 2, 6)), jnp.float32)
    off = jnp.zeros((2, 5, 5, 18))
    y = deform_conv2d(x, off, wt, stride=2, padding=(1, 0), dilation=(1, 1))
    want = jax.lax.conv_general_dilated(
        x, wt, (2, 2), [(1, 1), (0, 0)], dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    np.testing.assert_allclose(y, want, atol=ATOL, rtol=RTOL)


def test_packs_start_as_plain_convolutions():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 7, 8, 4)), jnp.float32)
    for cls, scale in ((DeformConv2dPack, 1.0), (ModulatedDeformConv2dPack, 0.5)):  # sigmoid(0) = 0.5
        m = cls(4, 6, 3, padding=1, deform_groups=2)
        v = m.init(jax.random.PRNGKey(0), x)
        np.testing.assert_array_equal(v["params"]["conv_offset"]["kernel"], 0)
        k = v["params"]["kernel"]
        want = scale * jax.lax.conv_general_dilated(
            x, k, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        np.testing.assert_allclose(m.apply(v, x), want + (v["params"].get("bias", 0)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "cls,tcls,keys",
    [
        (DeformConv2dPack, tref.DeformConv2dPack, ["weight", "conv_offset.weight", "conv_offset.bias"]),
        (
            ModulatedDeformConv2dPack,
            tref.ModulatedDeformConv2dPack,
            ["weight", "bias", "conv_offset.weight", "conv_offset.bias"],
        ),
    ],
)
def test_state_dict_round_trip(cls, tcls, keys):
    torch.manual_seed(0)
    t = tcls(4, 6, 3, padding=1, deform_groups=2)
    sd = {k: v.numpy() for k, v in t.state_dict().items()}
    assert sorted(sd) == sorted(keys)
    x = jnp.zeros((1, 5, 6, 4))
    m = cls(4, 6, 3, padding=1, deform_groups=2)
    back = to_torch(m, from_torch(m, sd, x), x)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_bad_inputs():
    x = jnp.zeros((2, 6, 7, 4))
    wt = jnp.zeros((3, 3, 4, 8))
    off = jnp.zeros((2, 6, 7, 18))
    with pytest.raises(
        ValueError,
        match=r"deform_conv2d: `offset` must have 2 \* offset_groups \* kh \* kw .* \(2, 6, 7, 17\)",
    ):
        deform_conv2d(x, jnp.zeros((2, 6, 7, 17)), wt, padding=1)
    with pytest.raises(ValueError, match=r"deform_conv2d: `offset` must be \(2, 6, 7, 18\)"):
        deform_conv2d(x, jnp.zeros((2, 5, 7, 18)), wt, padding=1)
    with pytest.raises(ValueError, match=r"deform_conv2d: input channels 4 must be divisible by offset_groups=3"):
        deform_conv2d(x, jnp.zeros((2, 6, 7, 54)), wt, padding=1)
    with pytest.raises(ValueError, match=r"deform_conv2d: `mask` must be \(2, 6, 7, 9\)"):
        deform_conv2d(x, off, wt, padding=1, mask=jnp.zeros((2, 6, 7, 18)))
    with pytest.raises(
        ValueError, match="deform_conv2d: input channels 4 .* multiple of the weight's input channels 3"
    ):
        deform_conv2d(x, off, jnp.zeros((3, 3, 3, 8)), padding=1)
    with pytest.raises(ValueError, match="deform_conv2d: `x` must be 4-D"):
        deform_conv2d(x[0], off, wt, padding=1)
    with pytest.raises(ValueError, match=r"deform_conv2d: `bias` must be \(8,\)"):
        deform_conv2d(x, off, wt, jnp.zeros(7), padding=1)
    with pytest.raises(ValueError, match="DeformConv2d: `x` must have 5 channels"):
        jax.eval_shape(DeformConv2d(5, 8, 3, padding=1).init, jax.random.PRNGKey(0), x, off)
    with pytest.raises(ValueError, match="DeformConv2dPack: `bias` must be False"):
        jax.eval_shape(DeformConv2dPack(4, 8, 3, bias=True).init, jax.random.PRNGKey(0), x)


def test_bfloat16_close_to_float32(assert_bfloat16_close):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 7, 8, 4)), jnp.float32)
    assert_bfloat16_close(ModulatedDeformConv2dPack(4, 6, 3, padding=1, deform_groups=2), x, rng)
