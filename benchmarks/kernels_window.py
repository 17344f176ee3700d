"""Swin window attention speed and memory: Pallas kernel vs XLA reference vs PyTorch.

Usage:
  python benchmarks/kernels_window.py           # GPU: timings + bandwidth + compiled peak memory
  python benchmarks/kernels_window.py --cpu     # compiled peak memory only (no execution)
  python benchmarks/kernels_window.py --smoke   # tiny shapes: runs the GPU code path anywhere
                                                # (Pallas in interpret mode on CPU; not a timing)
                                                # and checks both torch forms against XLA

GPU mode, at Swin-T stage 1: q/k/v ``[32, 56, 56, 3 heads x 32]``, window 7 (49 tokens), shift 3,
relative position bias, bf16 and f32; forward and forward+backward (gradients for q, k, v and the
bias table) of

* the Pallas kernel (``window_attention(..., implementation="pallas")``),
* the XLA reference (``implementation="xla"``, jit),
* PyTorch: Swin's official formulation (``q @ k^T + bias + mask``, softmax, ``@ v``) and
  ``F.scaled_dot_product_attention`` on the windows with the bias + mask as a float ``attn_mask``,
  both including the roll and window partition/reverse, as the JAX rows do.

Achieved HBM bandwidth counts the unavoidable traffic only (forward: read q, k, v, write o;
backward: read q, k, v, o, dO, write dq, dk, dv), so ``roof`` is the fraction of the HBM lower
bound for the detected device (H100 SXM 3.35 TB/s, H200 4.8 TB/s). Peak memory is XLA's compiled
memory analysis (arguments + outputs + temporaries); torch's is ``max_memory_allocated``.

CPU mode reports compiled peak memory of the XLA reference (the kernel has no CPU lowering) next to
the size of the ``(windows, heads, N, N)`` float32 probabilities the kernel never writes.
Tables only; no asserts.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.ops.window import window_attention
from flax_attn.testing.timing import cuda_torch, format_mib, peak_memory_bytes, roofline_row, time_jax, time_torch

SWIN_T = dict(b=32, h=56, w=56, heads=3, d=32, ws=7, shift=3)
SMOKE = dict(b=2, h=14, w=14, heads=2, d=8, ws=7, shift=3)


def _bandwidth(device_kind: str) -> float:
    return 4.8e12 if "H200" in device_kind else 3.35e12


def _impl(implementation, ws, shift):
    def fn(q, k, v, table):
        return window_attention(
            q, k, v, window_size=ws, shift_size=shift, bias_table=table, implementation=implementation
        )

    return fn


def _fwd_bwd(fn):
    def f(q, k, v, table, do):
        _, vjp = jax.vjp(fn, q, k, v, table)
        return vjp(do)

    return f


def cpu_memory(cfg):
    b, h, w, n_heads, d, ws, shift = (cfg[k] for k in ("b", "h", "w", "heads", "d", "ws", "shift"))
    shape = (b, h, w, n_heads, d)
    table = jax.ShapeDtypeStruct(((2 * ws - 1) ** 2, n_heads), jnp.float32)
    n_windows, n = b * (h // ws) * (w // ws), ws * ws
    probs = n_windows * n_heads * n * n * 4
    print(
        f"\nCompiled peak memory (XLA memory analysis, no execution), q/k/v {list(shape)}, window {ws}, "
        f"shift {shift}, backend {jax.default_backend()}; one f32 q/k/v tensor = "
        f"{int(np.prod(shape)) * 4 / 2**20:.1f} MiB; (windows, heads, N, N) f32 probabilities = "
        f"{probs / 2**20:.1f} MiB (what the kernel keeps on chip)"
    )
    print(f"{'dtype':<10}{'implementation':<24}{'forward':>16}{'fwd+bwd':>16}{'fwd / probs':>14}")
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.ShapeDtypeStruct(shape, dtype)
        fn = _impl("xla", ws, shift)
        fwd = peak_memory_bytes(fn, x, x, x, table)
        bwd = peak_memory_bytes(_fwd_bwd(fn), x, x, x, table, x)
        print(
            f"{jnp.dtype(dtype).name:<10}{'XLA reference':<24}{format_mib(fwd):>16}{format_mib(bwd):>16}"
            f"{fwd / probs:>13.2f}x"
        )


def _torch_impls(cfg, dt, dev):
    """Inputs and the two PyTorch formulations (each returns ``(B, H, W, heads, D)``)."""
    import torch
    import torch.nn.functional as F

    from flax_attn.ops.window import relative_position_index, shift_attention_mask

    b, h, w, n_heads, d, ws, shift = (cfg[k] for k in ("b", "h", "w", "heads", "d", "ws", "shift"))
    n, nw = ws * ws, (h // ws) * (w // ws)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, w, n_heads, d, generator=gen).to(dev, dt).requires_grad_() for _ in range(3))
    table = torch.randn((2 * ws - 1) ** 2, n_heads, generator=gen).to(dev).requires_grad_()
    index = torch.from_numpy(relative_position_index((ws, ws)).reshape(-1).astype(np.int64)).to(dev)
    mask = torch.from_numpy(shift_attention_mask(h, w, ws, shift)).to(dev)  # (nW, N, N)

    def to_windows(x):  # (B, H, W, heads, D) -> (B * nW, heads, N, D), Swin's roll + window_partition
        x = torch.roll(x, (-shift, -shift), dims=(1, 2))
        x = x.view(b, h // ws, ws, w // ws, ws, n_heads, d).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b * nw, n_heads, n, d)

    def from_windows(o):
        o = o.view(b, h // ws, w // ws, n_heads, ws, ws, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, h, w, n_heads, d)
        return torch.roll(o, (shift, shift), dims=(1, 2))

    def bias_and_mask():
        bias = table[index].view(n, n, n_heads).permute(2, 0, 1)  # (heads, N, N)
        full = bias[None, None] + mask[None, :, None]  # (1, nW, heads, N, N)
        return full.expand(b, nw, n_heads, n, n).reshape(b * nw, n_heads, n, n)

    def swin_official():
        qw, kw, vw = (to_windows(x) for x in (q, k, v))
        attn = (qw * d**-0.5) @ kw.transpose(-2, -1) + bias_and_mask().to(dt)
        return from_windows(attn.softmax(-1) @ vw)

    def sdpa():
        qw, kw, vw = (to_windows(x) for x in (q, k, v))
        return from_windows(F.scaled_dot_product_attention(qw, kw, vw, attn_mask=bias_and_mask().to(dt)))

    return (q, k, v, table), (("torch Swin official", swin_official), ("torch SDPA + float mask", sdpa))


def check_torch_forms(cfg):
    """Smoke mode: both PyTorch formulations (float32, CPU) against the XLA reference."""
    try:
        import torch
    except ImportError:
        return
    (q, k, v, table), impls = _torch_impls(cfg, torch.float32, "cpu")
    args = [jnp.asarray(x.detach().numpy()) for x in (q, k, v, table)]
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(_impl("xla", cfg["ws"], cfg["shift"])(*args))
    for name, fn in impls:
        err = float(np.max(np.abs(fn().detach().numpy() - ref)))
        print(f"{name}: max |torch - XLA reference| = {err:.2e} (float32, CPU)")


def torch_rows(dtype_name, cfg):
    torch = cuda_torch()
    if torch is None:
        return []
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    _, impls = _torch_impls(cfg, dt, "cuda")
    rows = []
    for name, fn in impls:
        try:
            with torch.no_grad():
                t_f = time_torch(fn, device="cuda")
            torch.cuda.reset_peak_memory_stats()
            t_fb = time_torch(lambda fn=fn: fn().float().sum().backward(), device="cuda")
            peak = torch.cuda.max_memory_allocated()
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            print(f"{name:<28} failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        rows.append((name, t_f, t_fb, peak))
    return rows


def timings(cfg, reps):
    b, h, w, n_heads, d, ws, shift = (cfg[k] for k in ("b", "h", "w", "heads", "d", "ws", "shift"))
    shape = (b, h, w, n_heads, d)
    elems = int(np.prod(shape))
    kind = jax.devices()[0].device_kind
    hbm = _bandwidth(kind)
    print(f"Swin window attention, window {ws}, shift {shift}, q/k/v {list(shape)}, device {kind}")
    for dtype in (jnp.bfloat16, jnp.float32):
        size = jnp.dtype(dtype).itemsize
        fwd_bytes, bwd_bytes = 4 * elems * size, 8 * elems * size
        rng = np.random.default_rng(0)
        q, k, v, do = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
        table = jnp.asarray(rng.standard_normal(((2 * ws - 1) ** 2, n_heads)), jnp.float32)
        print(
            f"\n{jnp.dtype(dtype).name}: HBM bound forward {fwd_bytes / hbm * 1e6:.0f} us, "
            f"backward {bwd_bytes / hbm * 1e6:.0f} us"
        )
        print(
            f"{'implementation':<28}{'fwd us':>10}{'fwd+bwd us':>12}{'fwd TB/s':>10}{'fwd roof':>10}"
            f"{'bwd roof':>10}{'peak fwd':>16}{'peak fwd+bwd':>16}"
        )
        results = {}
        for name, impl in (("pallas kernel", "pallas"), ("XLA reference", "xla")):
            fn = _impl(impl, ws, shift)
            try:
                t_f = time_jax(jax.jit(fn), q, k, v, table, repeats=reps)
                t_fb = time_jax(jax.jit(_fwd_bwd(fn)), q, k, v, table, do, repeats=reps)
                pk_f, pk_fb = peak_memory_bytes(fn, q, k, v, table), peak_memory_bytes(_fwd_bwd(fn), q, k, v, table, do)
            except Exception as e:  # noqa: BLE001  (an OOM or lowering failure is a result here)
                print(f"{name:<28} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            results[name] = (t_f, t_fb)
            print(roofline_row(name, t_f, t_fb, fwd_bytes, bwd_bytes, hbm, peak_fwd=pk_f, peak_fwd_bwd=pk_fb))
        for name, t_f, t_fb, peak in torch_rows(jnp.dtype(dtype).name, cfg):
            results[name] = (t_f, t_fb)
            print(roofline_row(name, t_f, t_fb, fwd_bytes, bwd_bytes, hbm, peak_fwd_bwd=peak))
        if "pallas kernel" in results:
            base_f, base_fb = results["pallas kernel"]
            ratios = ", ".join(
                f"{name}: fwd {t_f / base_f:.2f}x, fwd+bwd {t_fb / base_fb:.2f}x"
                for name, (t_f, t_fb) in results.items()
                if name != "pallas kernel"
            )
            print(f"time relative to the Pallas kernel (>1 = kernel faster): {ratios}")
    print(
        "\nroof = HBM-bound time / measured time (1.00 = at the bound); bwd = (fwd+bwd) - fwd. "
        "torch peak is torch.cuda.max_memory_allocated during fwd+bwd."
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="compiled peak memory only, no execution")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes through the GPU code path")
    args = parser.parse_args()
    if args.smoke:
        timings(SMOKE, reps=1)
        cpu_memory(SMOKE)
        check_torch_forms(SMOKE)
    elif args.cpu or jax.default_backend() == "cpu":
        cpu_memory(SWIN_T)
    else:
        timings(SWIN_T, reps=20)
        cpu_memory(SWIN_T)


if __name__ == "__main__":
    main()
