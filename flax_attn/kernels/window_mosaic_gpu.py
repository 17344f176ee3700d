"""Swin window attention forward as a Mosaic GPU Pallas kernel (Hopper ``wgmma``), compile-checked.

The port of :mod:`flax_attn.kernels.window` to the GPU backend JAX keeps (Mosaic GPU; the Triton
lowering is deprecated from JAX 0.11). One program is one warpgroup owning one ``(window, head)``:
its ``(Np, Dp)`` query, key and value tiles are copied to shared memory (swizzled for ``wgmma``),
``S = Q K^T`` runs as one ``wgmma`` into a float32 register accumulator, the softmax runs on that
accumulator in its WGMMA register layout, and ``O = P V`` is a second ``wgmma``. Swin's relative
position bias, the shift mask and the mask of padded keys are folded by the wrapper into one
float32 ``(nW, heads, Np, Np)`` bias per image (a few MiB at Swin sizes, read from L2), indexed
by the program's window and head.

Status: it compiles deviceless for an H100 (``benchmarks/compile_check.py``) but has not run on a
GPU, and Pallas has no interpreter for Mosaic GPU, so its numerics are unchecked until
``benchmarks/device_check.py`` runs on one. The backward pass is the XLA recomputation of dense
attention per window (``jax.vjp`` of :func:`_dense_windows`), not a kernel. Limits: 16-bit inputs
(``wgmma`` operands), ``Np = 64`` or ``128`` (windows up to 11 x 11), head dims padded to 16, 32
or a multiple of 64 (the shared-memory swizzle). See ``docs/mosaic_gpu.md``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flax_attn.kernels._common import round_up

_WHERE = "window_attention_pallas(backend='mosaic_gpu')"


def padded_sizes(n: int, d: int, dtype) -> tuple[int, int]:
    """``(Np, Dp)`` for ``n`` tokens and head dim ``d``; raises ``ValueError`` outside the limits."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"{_WHERE}: inputs must be bfloat16 or float16 (wgmma operands), got {jnp.dtype(dtype)}")
    np_ = round_up(n, 64)
    if np_ > 128:
        raise ValueError(f"{_WHERE}: windows of at most 128 tokens (11 x 11) fit one warpgroup, got {n} tokens")
    dp = 16 if d <= 16 else 32 if d <= 32 else round_up(d, 64)
    return np_, dp


def _transforms(cols: int, itemsize: int):
    """Shared-memory layout of a tile with rows of ``cols`` elements: the widest swizzle the row
    allows, tiled in (8 rows, one swizzle span) blocks, as ``wgmma`` reads its operands."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(q_smem, k_smem, v_smem, b_smem, o_smem, *, scale: float, np_: int, dp: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
        return acc_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((np_, np_), jnp.float32))
    s = s * scale + plgpu.load(b_smem, (), layout=plgpu.Layout.WGMMA)
    m = jnp.max(s, axis=1)
    p = jnp.exp(s - lax.broadcast_in_dim(m, s.shape, [0]))
    l = jnp.sum(p, axis=1)
    p16 = p.astype(q_smem.dtype)

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem)

    zeros = plgpu.layout_cast(jnp.zeros((np_, dp), jnp.float32), plgpu.Layout.WGMMA)
    acc = pl.run_state(pv)(plgpu.ACC.init(zeros))
    o_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(o_smem.dtype)


def _forward(q, k, v, bias, scale):
    """``q, k, v``: ``(windows, heads, Np, Dp)``; ``bias``: ``(nW, heads, Np, Np)`` float32."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    windows, heads, np_, dp = q.shape
    nw = bias.shape[0]
    itemsize = jnp.dtype(q.dtype).itemsize
    tile = plgpu.BlockSpec((None, None, np_, dp), lambda h, w: (w, h, 0, 0), transforms=_transforms(dp, itemsize))
    bias_spec = plgpu.BlockSpec((None, None, np_, np_), lambda h, w: (w % nw, h, 0, 0), transforms=_transforms(np_, 4))
    return pl.pallas_call(
        functools.partial(_kernel, scale=scale, np_=np_, dp=dp),
        grid=(heads, windows),
        in_specs=[tile, tile, tile, bias_spec],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(),
        name="window_attention_mosaic_gpu_fwd",
    )(q, k, v, bias)


def _dense_windows(q, k, v, bias, scale):
    """The same attention in XLA on the windowed layout (the backward pass differentiates it)."""
    windows, heads, np_, _ = q.shape
    nw = bias.shape[0]
    full = jnp.tile(bias, (windows // nw, 1, 1, 1))
    s = jnp.einsum("whnd,whmd->whnm", q, k, preferred_element_type=jnp.float32) * scale + full
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("whnm,whmd->whnd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def window_attention_windows(q, k, v, bias, scale):
    """Forward: the Mosaic GPU kernel; backward: the VJP of :func:`_dense_windows`."""
    return _forward(q, k, v, bias, scale)


def _fwd(q, k, v, bias, scale):
    return _forward(q, k, v, bias, scale), (q, k, v, bias)


def _bwd(scale, res, dout):
    q, k, v, bias = res
    _, vjp = jax.vjp(lambda *a: _dense_windows(*a, scale), q, k, v, bias)
    return vjp(dout)


window_attention_windows.defvjp(_fwd, _bwd)
