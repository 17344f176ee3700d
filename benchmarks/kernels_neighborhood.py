"""Neighbourhood attention (7x7) speed and memory: Pallas kernel vs XLA reference vs PyTorch.

Usage:
  python benchmarks/kernels_neighborhood.py            # GPU: timings + bandwidth + compiled memory
  python benchmarks/kernels_neighborhood.py --cpu-memory   # compiled peak memory only (no execution)
  python benchmarks/kernels_neighborhood.py --na2d     # GPU: na2d kernel (NATTEN semantics) only
  python benchmarks/kernels_neighborhood.py --na2d --smoke   # the same code, tiny, interpreted on CPU

GPU mode, at q/k/v ``[32, 56, 56, 8 heads x 32]``, window 7x7, reflect border, bf16 and f32:
forward and forward+backward of the Pallas kernel, the XLA reference (jit), PyTorch's ACmix
unfold formulation and PyTorch's dense ``scaled_dot_product_attention`` over all 3136 tokens
(yardstick). Achieved HBM bandwidth counts the unavoidable traffic only (forward: read q, k, v,
write o; backward: read q, k, v, o, dO, write dq, dk, dv), so ``roofline`` is the fraction of
the H100 lower bound (3.35 TB/s: 61 us forward, 124 us backward in bf16 at this size).
Peak memory is XLA's compiled memory analysis (arguments + outputs + temporaries).

``--na2d``: the ``na2d_pallas`` kernel (NATTEN's window rule) at NAT-Tiny stage 1
``[32, 56, 56, 2 heads x 32]``, 7x7, per option (plain, causal, stride 2, dilation 2, rpb + key
mask), forward and forward+backward, against dense masked attention with the same mask (XLA),
``flax_attn.ops.na2d`` where it exists and ``natten.na2d`` on the GPU where installed, with
compiled peak memory. ``--smoke`` runs it tiny in interpret mode to check the script only.

CPU mode reports compiled peak memory of the XLA reference, ACmix's unfold form written in JAX,
and dense (non-local) attention on the same input: 56x56, C = 256, 8 heads. Tables only; no asserts.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn import ops as _ops
from flax_attn.kernels.neighborhood import na2d_pallas
from flax_attn.ops import neighborhood_attention, scaled_dot_product_attention
from flax_attn.testing.neighborhood_ref import dense_neighborhood_attention
from flax_attn.testing.timing import cuda_torch, format_mib, peak_memory_bytes, roofline_row, time_jax, time_torch

B, H, W, N, D, K = 32, 56, 56, 8, 32, 7
HBM_BYTES_PER_S = 3.35e12  # H100 SXM


def unfold_form(q, k, v, kernel_size=K):
    """ACmix's formulation in JAX: reflect-pad, materialise all k^2 shifted copies, weight, sum."""
    p = kernel_size // 2
    h, w = q.shape[1:3]
    pad = lambda x: jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0), (0, 0)), mode="reflect")  # noqa: E731
    kp, vp = pad(k), pad(v)
    uk = jnp.stack([kp[:, a : a + h, b : b + w] for a in range(kernel_size) for b in range(kernel_size)], 4)
    uv = jnp.stack([vp[:, a : a + h, b : b + w] for a in range(kernel_size) for b in range(kernel_size)], 4)
    att = jax.nn.softmax(jnp.einsum("bhwnd,bhwnkd->bhwnk", q * q.shape[-1] ** -0.5, uk).astype(jnp.float32), -1)
    return jnp.einsum("bhwnk,bhwnkd->bhwnd", att.astype(q.dtype), uv)


def dense(q, k, v):
    b, h, w, n, d = q.shape
    flat = lambda x: x.reshape(b, h * w, n, d)  # noqa: E731
    return scaled_dot_product_attention(flat(q), flat(k), flat(v)).reshape(q.shape)


def _fwd_bwd(fn):
    def f(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return vjp(do)

    return f


def cpu_memory():
    shape = (B, H, W, N, D)
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.ShapeDtypeStruct(shape, dtype)
        for name, fn in (
            (
                "neighborhood (XLA reference)",
                lambda q, k, v: neighborhood_attention(q, k, v, kernel_size=K, implementation="xla"),
            ),
            ("ACmix unfold form (JAX)", unfold_form),
            ("dense non-local attention", dense),
        ):
            fwd = peak_memory_bytes(fn, x, x, x)
            bwd = peak_memory_bytes(_fwd_bwd(fn), x, x, x, x)
            rows.append((jnp.dtype(dtype).name, name, fwd, bwd))
    io = int(np.prod(shape)) * 4
    print(
        f"\nCompiled peak memory (XLA memory analysis, no execution), q/k/v {list(shape)}, k={K}, "
        f"backend {jax.default_backend()}; one f32 q/k/v tensor = {io / 2**20:.1f} MiB"
    )
    print(f"{'dtype':<9}{'implementation':<32}{'forward':>16}{'fwd+bwd':>16}{'fwd vs dense':>14}")
    for dt, name, fwd, bwd in rows:
        dense_fwd = next(r[2] for r in rows if r[0] == dt and r[1].startswith("dense"))
        print(f"{dt:<9}{name:<32}{format_mib(fwd):>16}{format_mib(bwd):>16}{fwd / dense_fwd:>13.3f}x")


def torch_rows(dtype_name):
    torch = cuda_torch()
    if torch is None:
        return []
    import torch.nn.functional as F

    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    # (B * heads, D, H, W) as ACmix holds them.
    q, k, v = (torch.randn(B * N, D, H, W, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    pad, unfold = torch.nn.ReflectionPad2d(K // 2), torch.nn.Unfold(K)

    def acmix_unfold():
        uk = unfold(pad(k)).view(B * N, D, K * K, H, W)
        uv = unfold(pad(v)).view(B * N, D, K * K, H, W)
        att = torch.softmax((q.unsqueeze(2) * D**-0.5 * uk).sum(1), dim=1)
        return (att.unsqueeze(1) * uv).sum(2)

    qs, ks, vs = (torch.randn(B, N, H * W, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))

    def sdpa():
        return F.scaled_dot_product_attention(qs, ks, vs)

    rows = []
    for name, fn in (("torch ACmix unfold", acmix_unfold), ("torch SDPA dense (yardstick)", sdpa)):
        try:
            with torch.no_grad():
                t_f = time_torch(fn, device="cuda")
            torch.cuda.reset_peak_memory_stats()
            t_fb = time_torch(lambda fn=fn: fn().sum().backward(), device="cuda")
            peak = torch.cuda.max_memory_allocated()
        except torch.cuda.OutOfMemoryError:
            t_f = t_fb = float("nan")
            peak = -1
        rows.append((name, t_f, t_fb, peak))
    return rows


def gpu():
    shape = (B, H, W, N, D)
    elems = int(np.prod(shape))
    print(f"Neighbourhood attention {K}x{K} reflect, q/k/v {list(shape)}, device {jax.devices()[0].device_kind}")
    for dtype in (jnp.bfloat16, jnp.float32):
        size = jnp.dtype(dtype).itemsize
        fwd_bytes, bwd_bytes = 4 * elems * size, 8 * elems * size
        rng = np.random.default_rng(0)
        q, k, v, do = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
        print(
            f"\n{jnp.dtype(dtype).name}: roofline forward {fwd_bytes / HBM_BYTES_PER_S * 1e6:.0f} us, "
            f"backward {bwd_bytes / HBM_BYTES_PER_S * 1e6:.0f} us"
        )
        print(
            f"{'implementation':<32}{'fwd us':>10}{'fwd+bwd us':>12}{'fwd TB/s':>10}{'fwd roof':>10}"
            f"{'bwd roof':>10}{'peak fwd':>16}{'peak fwd+bwd':>16}"
        )
        impls = (
            (
                "pallas kernel",
                lambda q, k, v: neighborhood_attention(q, k, v, kernel_size=K, implementation="pallas"),
            ),
            (
                "XLA reference",
                lambda q, k, v: neighborhood_attention(q, k, v, kernel_size=K, implementation="xla"),
            ),
            ("JAX unfold form", unfold_form),
        )
        for name, fn in impls:
            try:
                f = jax.jit(fn)
                fb = jax.jit(_fwd_bwd(fn))
                t_f = time_jax(f, q, k, v)
                t_fb = time_jax(fb, q, k, v, do)
                pk_f, pk_fb = peak_memory_bytes(fn, q, k, v), peak_memory_bytes(_fwd_bwd(fn), q, k, v, do)
            except Exception as e:  # noqa: BLE001  (an OOM or lowering failure is a result here)
                print(f"{name:<32} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            print(
                roofline_row(
                    name,
                    t_f,
                    t_fb,
                    fwd_bytes,
                    bwd_bytes,
                    HBM_BYTES_PER_S,
                    peak_fwd=pk_f,
                    peak_fwd_bwd=pk_fb,
                    name_width=32,
                )
            )
        for name, t_f, t_fb, peak in torch_rows(jnp.dtype(dtype).name):
            print(
                roofline_row(name, t_f, t_fb, fwd_bytes, bwd_bytes, HBM_BYTES_PER_S, peak_fwd_bwd=peak, name_width=32)
            )
    print(
        "\nroof = roofline time / measured time (1.00 = at the HBM bound); bwd = (fwd+bwd) - fwd. "
        "torch peak is torch.cuda.max_memory_allocated during fwd+bwd."
    )


NA2D_VARIANTS = (
    ("plain", dict()),
    ("causal (T, T)", dict(is_causal=(True, True))),
    ("stride 2", dict(stride=2)),
    ("dilation 2", dict(dilation=2)),
    ("rpb + key mask", dict(rpb=True, key_mask=True)),
)


def na2d(smoke: bool):
    """na2d_pallas per option against dense masked attention, ops.na2d and natten (see the docstring)."""
    b, h, w, n, d, ks = (2, 9, 11, 2, 8, 3) if smoke else (32, 56, 56, 2, 32, 7)
    reps = 1 if smoke else 20
    rng = np.random.default_rng(0)
    device = jax.devices()[0].device_kind + (" (smoke)" if smoke else "")
    print(f"na2d {ks}x{ks}, q/k/v {[b, h, w, n, d]}, device {device}")
    print(f"{'dtype':<9}{'option':<16}{'implementation':<30}{'fwd us':>10}{'fwd+bwd us':>12}{'vs dense f+b':>13}"
          f"{'peak fwd':>16}{'peak fwd+bwd':>16}")  # fmt: skip
    for dtype in (jnp.bfloat16, jnp.float32):
        q, k, v, do = (jnp.asarray(rng.standard_normal((b, h, w, n, d)), dtype) for _ in range(4))
        rpb = jnp.asarray(rng.standard_normal((n, 2 * ks - 1, 2 * ks - 1)), jnp.float32)
        mask = np.ones((b, h, w), bool)
        mask[1::2, :, w - w // 4 :] = False
        mask = jnp.asarray(mask)
        for label, opts in NA2D_VARIANTS:
            kw = dict(
                kernel_size=ks,
                stride=opts.get("stride", 1),
                dilation=opts.get("dilation", 1),
                is_causal=opts.get("is_causal", False),
            )
            r = rpb if opts.get("rpb") else jnp.zeros_like(rpb)
            m = mask if opts.get("key_mask") else jnp.ones_like(mask)
            extra = dict(rpb=rpb if opts.get("rpb") else None, key_mask=mask if opts.get("key_mask") else None)
            impls = [  # dense first: the other rows' ratios refer to it
                (
                    "dense masked (XLA)",
                    lambda q, k, v, kw=kw, r=r, m=m: dense_neighborhood_attention(
                        q, k, v, **kw, rpb=r, key_mask=m
                    ).astype(q.dtype),
                ),
                ("pallas na2d_pallas", lambda q, k, v, kw=kw, extra=extra: na2d_pallas(q, k, v, **kw, **extra)),
            ]
            if hasattr(_ops, "na2d"):
                impls.append(
                    ("flax_attn.ops.na2d (XLA)", lambda q, k, v, kw=kw, extra=extra: _ops.na2d(q, k, v, **kw, **extra))
                )
            results = {}
            for name, fn in impls:
                try:
                    t_f = time_jax(jax.jit(fn), q, k, v, repeats=reps)
                    t_fb = time_jax(jax.jit(_fwd_bwd(fn)), q, k, v, do, repeats=reps)
                    pk_f, pk_fb = peak_memory_bytes(fn, q, k, v), peak_memory_bytes(_fwd_bwd(fn), q, k, v, do)
                except Exception as e:  # noqa: BLE001  (an OOM or lowering failure is a result here)
                    print(f"{jnp.dtype(dtype).name:<9}{label:<16}{name:<30} failed: {type(e).__name__}: {str(e)[:100]}")
                    continue
                results[name] = t_fb
                ratio = results.get("dense masked (XLA)", float("nan")) / t_fb
                print(f"{jnp.dtype(dtype).name:<9}{label:<16}{name:<30}{t_f * 1e6:>10.0f}{t_fb * 1e6:>12.0f}"
                      f"{ratio:>12.2f}x{format_mib(pk_f):>16}{format_mib(pk_fb):>16}")  # fmt: skip
            if not opts.get("rpb") and not opts.get("key_mask") and jax.default_backend() == "gpu":
                _natten_row(dtype, label, kw, (b, h, w, n, d), reps)
    print("\nvs dense f+b = dense masked forward+backward time / this row's (above 1: faster than dense). "
          "Interpret-mode (smoke) timings say nothing about the kernel's speed.")  # fmt: skip


def _natten_row(dtype, label, kw, shape, reps):
    try:
        import natten
        import torch
    except ImportError:
        return
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[jnp.dtype(dtype).name]
    q, k, v = (torch.randn(*shape, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    name = "natten.na2d (torch)"
    try:
        with torch.no_grad():
            t_f = time_torch(lambda: natten.na2d(q, k, v, **kw), repeats=reps, device="cuda")
        t_fb = time_torch(lambda: natten.na2d(q, k, v, **kw).float().sum().backward(), repeats=reps, device="cuda")
    except Exception as e:  # noqa: BLE001
        print(f"{jnp.dtype(dtype).name:<9}{label:<16}{name:<30} failed: {type(e).__name__}: {str(e)[:100]}")
        return
    print(f"{jnp.dtype(dtype).name:<9}{label:<16}{name:<30}{t_f * 1e6:>10.0f}{t_fb * 1e6:>12.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-memory", action="store_true", help="compiled peak memory only, no execution")
    parser.add_argument("--na2d", action="store_true", help="the na2d kernel (NATTEN semantics) only")
    parser.add_argument("--smoke", action="store_true", help="with --na2d: tiny shapes, interpreted on CPU")
    args = parser.parse_args()
    if args.na2d:
        if jax.default_backend() == "cpu" and not args.smoke:
            parser.error("--na2d times the kernel on a GPU or TPU; on a CPU use --na2d --smoke")
        na2d(args.smoke)
    elif args.cpu_memory or jax.default_backend() == "cpu":
        cpu_memory()
    else:
        gpu()
        cpu_memory()


if __name__ == "__main__":
    main()
