"""ops.neighborhood_attention (XLA reference) against brute-force per-pixel references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn.ops import neighborhood_attention
from flax_attn.testing.neighborhood_ref import natten014_window_start


def _brute_force(q, k, v, kernel_size, dilation, border, stride, scale):
    """Per pixel: reflect via np.pad(mode='reflect') (== ReflectionPad2d), clamp via NATTEN's rule."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, h, w, n, d = k.shape
    r = kernel_size // 2
    p = r * dilation
    kp = np.pad(k, ((0, 0), (p, p), (p, p), (0, 0), (0, 0)), mode="reflect") if border == "reflect" else None
    vp = np.pad(v, ((0, 0), (p, p), (p, p), (0, 0), (0, 0)), mode="reflect") if border == "reflect" else None
    hq, wq = q.shape[1:3]
    out = np.zeros(q.shape)
    weights = np.zeros((b, hq, wq, n, kernel_size * kernel_size))
    for i in range(hq):
        for j in range(wq):
            ci, cj = i * stride, j * stride
            if border == "reflect":
                rows = [ci + p + (t - r) * dilation for t in range(kernel_size)]
                cols = [cj + p + (t - r) * dilation for t in range(kernel_size)]
                keys = kp[:, rows][:, :, cols]
                vals = vp[:, rows][:, :, cols]
            else:
                si = natten014_window_start(ci, h, kernel_size, dilation)
                sj = natten014_window_start(cj, w, kernel_size, dilation)
                rows = [si + t * dilation for t in range(kernel_size)]
                cols = [sj + t * dilation for t in range(kernel_size)]
                keys = k[:, rows][:, :, cols]
                vals = v[:, rows][:, :, cols]
            keys = keys.reshape(b, -1, n, d)
            vals = vals.reshape(b, -1, n, d)
            logits = np.einsum("bnd,bknd->bnk", q[:, i, j], keys) * scale
            wgt = np.exp(logits - logits.max(-1, keepdims=True))
            wgt /= wgt.sum(-1, keepdims=True)
            weights[:, i, j] = wgt
            out[:, i, j] = np.einsum("bnk,bknd->bnd", wgt, vals)
    return out, weights


CASES = [  # border, kernel_size, dilation, stride, (H, W)
    ("reflect", 3, 1, 1, (5, 7)),
    ("reflect", 5, 2, 1, (7, 6)),
    ("reflect", 3, 1, 2, (6, 9)),
    ("clamp", 3, 1, 1, (5, 7)),
    ("clamp", 3, 2, 1, (7, 8)),
    ("clamp", 5, 1, 2, (7, 9)),
]


@pytest.mark.parametrize("border,ks,dil,stride,hw", CASES)
def test_matches_brute_force(border, ks, dil, stride, hw):
    rng = np.random.default_rng(0)
    h, w = hw
    k = rng.standard_normal((2, h, w, 2, 3)).astype(np.float32)
    v = rng.standard_normal((2, h, w, 2, 3)).astype(np.float32)
    q = rng.standard_normal((2, -(-h // stride), -(-w // stride), 2, 3)).astype(np.float32)
    out, wgt = jax.jit(
        lambda q, k, v: neighborhood_attention(
            q,
            k,
            v,
            kernel_size=ks,
            dilation=dil,
            border=border,
            stride=stride,
            return_weights=True,
            implementation="xla",
        )
    )(q, k, v)
    ref_out, ref_w = _brute_force(q, k, v, ks, dil, border, stride, 3**-0.5)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(wgt), ref_w, atol=1e-5, rtol=1e-5)


def test_reflect_matches_torch_unfold():
    """The reflect border is exactly ReflectionPad2d + Unfold (ACmix's formulation), gradients included."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    b, h, w, n, d, ks = 2, 6, 9, 2, 4, 5
    q, k, v = (rng.standard_normal((b, h, w, n, d)).astype(np.float32) for _ in range(3))
    ct = rng.standard_normal((b, h, w, n, d)).astype(np.float32)

    def torch_na(q, k, v):
        to_nchw = lambda x: x.permute(0, 3, 4, 1, 2).reshape(b * n, d, h, w)  # noqa: E731
        pad, unfold = torch.nn.ReflectionPad2d(ks // 2), torch.nn.Unfold(ks)
        uk = unfold(pad(to_nchw(k))).view(b * n, d, ks * ks, h, w)
        uv = unfold(pad(to_nchw(v))).view(b * n, d, ks * ks, h, w)
        att = torch.softmax((to_nchw(q).unsqueeze(2) * d**-0.5 * uk).sum(1), dim=1)
        out = (att.unsqueeze(1) * uv).sum(2)
        return out.view(b, n, d, h, w).permute(0, 3, 4, 1, 2)

    tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    t_out = torch_na(tq, tk, tv)
    (t_out * torch.from_numpy(ct)).sum().backward()

    f = lambda q, k, v: jnp.sum(neighborhood_attention(q, k, v, kernel_size=ks, implementation="xla") * ct)  # noqa: E731
    out = neighborhood_attention(q, k, v, kernel_size=ks, implementation="xla")
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), t_out.detach().numpy(), atol=1e-5, rtol=1e-5)
    for g, t in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float32():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 7, 9, 2, 8)).astype(np.float32) for _ in range(3))
    f = jax.jit(lambda q, k, v: neighborhood_attention(q, k, v, kernel_size=3, implementation="xla"))
    ref = f(q, k, v)
    out = f(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "kwargs,shapes,match",
    [
        (dict(kernel_size=4), None, "odd"),
        (dict(kernel_size=0), None, "odd"),
        (dict(kernel_size=7), ((1, 3, 8, 1, 2),) * 3, "reflection padding 3"),
        (dict(kernel_size=3, dilation=3), ((1, 6, 3, 1, 2),) * 3, "reflection padding 3"),
        (dict(kernel_size=5, border="clamp"), ((1, 4, 8, 1, 2),) * 3, "larger than the image"),
        (dict(kernel_size=3, border="clamp", dilation=3), ((1, 8, 8, 1, 2),) * 3, "larger than the image"),
        (dict(kernel_size=3, border="zeros"), None, "border"),
        (dict(kernel_size=3), ((1, 6, 8, 1, 2), (1, 6, 8, 1, 3), (1, 6, 8, 1, 3)), "`q` must have shape"),
        (dict(kernel_size=3), ((1, 6, 8, 1, 2), (1, 6, 8, 1, 2), (1, 6, 7, 1, 2)), "same shape"),
        (dict(kernel_size=3, stride=2), ((1, 6, 8, 1, 2),) * 3, r"ceil\(H/stride\)"),
        (dict(kernel_size=3), ((6, 8, 1, 2),) * 3, "5-D"),
        (dict(kernel_size=3, implementation="cuda"), None, "implementation"),
    ],
)
def test_bad_arguments(kwargs, shapes, match):
    shapes = shapes or ((1, 6, 8, 1, 2),) * 3
    q, k, v = (jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda q, k, v: neighborhood_attention(q, k, v, **kwargs), q, k, v)
