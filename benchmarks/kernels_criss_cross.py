"""Criss-cross attention: fused Pallas kernel vs XLA reference vs PyTorch einsum form.

GPU mode (default on a GPU): forward and forward+backward times for [B, Cv, H, W] = [8, 512, 97, 97]
with 64 query/key channels, bfloat16 and float32, the achieved HBM bandwidth against the roofline
lower bound (read q, k, v once, write out once; backward also reads dO and writes dq, dk, dv), and
the peak memory XLA reports from ``jax.jit(f).lower(...).compile().memory_analysis()``.

CPU mode (``--cpu``, needs no execution): peak memory of the compiled XLA reference at 97 x 97,
C = 512, next to dense non-local attention (``softmax(q k^T) v`` over all H*W positions).

    python benchmarks/kernels_criss_cross.py            # on an H100
    python benchmarks/kernels_criss_cross.py --cpu      # memory analysis only
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from flax_attn.kernels.criss_cross import criss_cross_attention_pallas
from flax_attn.ops.criss_cross import criss_cross_attention
from flax_attn.testing.timing import peak_memory_bytes, time_jax, time_torch

H100_HBM_BYTES_PER_S = 3.35e12


def _shapes(b, h, w, cqk, cv, dtype):
    return [jax.ShapeDtypeStruct((b, h, w, cqk), dtype)] * 2 + [jax.ShapeDtypeStruct((b, h, w, cv), dtype)]


def _xla(q, k, v):
    return criss_cross_attention(q, k, v, implementation="xla")


def _dense_nonlocal(q, k, v):
    b, h, w, c = q.shape
    s = jnp.einsum("bnc,bmc->bnm", q.reshape(b, h * w, c), k.reshape(b, h * w, c), preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bnm,bmc->bnc", p.astype(v.dtype), v.reshape(b, h * w, -1)).reshape(b, h, w, -1)


def _fwd_bwd(fn):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def _peak_mib(fn, shapes):
    nbytes = peak_memory_bytes(fn, *shapes)
    return float("nan") if nbytes is None else nbytes / 2**20


def _bytes(b, h, w, cqk, cv, itemsize, backward):
    fwd = b * h * w * (2 * cqk + 2 * cv) * itemsize  # read q, k, v, write out
    if not backward:
        return fwd
    return fwd + b * h * w * (cv + 2 * cqk + cv + cv) * itemsize  # + read dO, out; write dq, dk, dv


def _torch_times(b, h, w, cqk, cv, dtype_name):
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    q = torch.randn(b, cqk, h, w, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(b, cqk, h, w, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(b, cv, h, w, device="cuda", dtype=dt, requires_grad=True)
    eye = torch.eye(h, dtype=torch.bool, device="cuda")[:, None, :]

    def fwd():
        e_h = torch.einsum("bcyx,bcjx->byxj", q, k).float().masked_fill(eye, float("-inf"))
        e_w = torch.einsum("bcyx,bcyi->byxi", q, k).float()
        att = torch.softmax(torch.cat([e_h, e_w], 3), 3).to(dt)
        return torch.einsum("byxj,bcjx->bcyx", att[..., :h], v) + torch.einsum("byxi,bcyi->bcyx", att[..., h:], v)

    def fb():
        fwd().float().sum().backward()

    with torch.no_grad():
        t_f = time_torch(fwd, repeats=50, device="cuda") * 1e6
    t_fb = time_torch(fb, repeats=50, device="cuda") * 1e6
    torch.cuda.reset_peak_memory_stats()
    fb()
    torch.cuda.synchronize()
    return t_f, t_fb, torch.cuda.max_memory_allocated() / 2**20


def gpu(b=8, h=97, w=97, cqk=64, cv=512):
    print(
        f"criss-cross attention [B, C, H, W] = [{b}, {cv}, {h}, {w}], q/k channels {cqk}; "
        f"device {jax.devices()[0].device_kind}"
    )
    header = (
        f"{'dtype':8s} {'impl':8s} {'pass':8s} {'time us':>9s} {'GB/s':>8s} {'% HBM':>6s} "
        f"{'roofline us':>11s} {'x roofline':>10s} {'peak MiB':>9s}"
    )
    print(header)
    print("-" * len(header))
    for dtype_name in ("bfloat16", "float32"):
        dtype = jnp.dtype(dtype_name)
        key = jax.random.split(jax.random.PRNGKey(0), 3)
        args = (
            jax.random.normal(key[0], (b, h, w, cqk), dtype),
            jax.random.normal(key[1], (b, h, w, cqk), dtype),
            jax.random.normal(key[2], (b, h, w, cv), dtype),
        )
        shapes = _shapes(b, h, w, cqk, cv, dtype)
        impls = {"pallas": criss_cross_attention_pallas, "xla": _xla}
        for name, fn in impls.items():
            for pass_name, f in (("fwd", fn), ("fwd+bwd", _fwd_bwd(fn))):
                nbytes = _bytes(b, h, w, cqk, cv, dtype.itemsize, pass_name != "fwd")
                roof = nbytes / H100_HBM_BYTES_PER_S * 1e6
                try:
                    t = time_jax(jax.jit(f), *args, repeats=50) * 1e6
                    peak = _peak_mib(f, shapes)
                except Exception as e:  # report, keep going: a table with a hole beats no table
                    print(f"{dtype_name:8s} {name:8s} {pass_name:8s} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                gbs = nbytes / (t * 1e-6) / 1e9
                print(
                    f"{dtype_name:8s} {name:8s} {pass_name:8s} {t:9.1f} {gbs:8.0f} "
                    f"{100 * gbs * 1e9 / H100_HBM_BYTES_PER_S:6.1f} {roof:11.1f} {t / roof:10.2f} {peak:9.1f}"
                )
        tt = _torch_times(b, h, w, cqk, cv, dtype_name)
        if tt is None:
            print(f"{dtype_name:8s} torch    (no CUDA PyTorch in this environment)")
        else:
            for pass_name, t in (("fwd", tt[0]), ("fwd+bwd", tt[1])):
                nbytes = _bytes(b, h, w, cqk, cv, dtype.itemsize, pass_name != "fwd")
                roof = nbytes / H100_HBM_BYTES_PER_S * 1e6
                gbs = nbytes / (t * 1e-6) / 1e9
                print(
                    f"{dtype_name:8s} {'torch':8s} {pass_name:8s} {t:9.1f} {gbs:8.0f} "
                    f"{100 * gbs * 1e9 / H100_HBM_BYTES_PER_S:6.1f} {roof:11.1f} {t / roof:10.2f} "
                    f"{tt[2] if pass_name != 'fwd' else float('nan'):9.1f}"
                )
    print(
        "roofline: bytes that must move (q, k, v read and out written once; backward adds dO, out "
        "read and dq, dk, dv written) at 3.35 TB/s (H100 SXM)."
    )


def cpu(b=8, h=97, w=97, cqk=64, cv=512):
    print(
        f"XLA peak memory (compiled, not executed) for [B, C, H, W] = [{b}, {cv}, {h}, {w}], q/k {cqk}, "
        f"backend {jax.default_backend()}"
    )
    header = f"{'dtype':8s} {'op':22s} {'pass':8s} {'peak MiB':>10s} {'vs criss-cross':>15s}"
    print(header)
    print("-" * len(header))
    for dtype_name in ("float32", "bfloat16"):
        shapes = _shapes(b, h, w, cqk, cv, jnp.dtype(dtype_name))
        for pass_name, wrap in (("fwd", lambda f: f), ("fwd+bwd", _fwd_bwd)):
            cc = _peak_mib(wrap(_xla), shapes)
            dense = _peak_mib(wrap(_dense_nonlocal), shapes)
            print(f"{dtype_name:8s} {'criss-cross (XLA ref)':22s} {pass_name:8s} {cc:10.1f} {1.0:15.2f}")
            print(f"{dtype_name:8s} {'dense non-local':22s} {pass_name:8s} {dense:10.1f} {dense / cc:15.2f}")
    n = b * h * w
    print(
        f"energy sizes in float32: criss-cross B*H*W*(H+W-1) = {n * (h + w - 1) * 4 / 2**20:.1f} MiB, "
        f"dense B*(H*W)^2 = {b * (h * w) ** 2 * 4 / 2**20:.1f} MiB"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="memory analysis of the XLA reference only")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if args.cpu or jax.default_backend() == "cpu":
        cpu(b=args.batch)
    else:
        gpu(b=args.batch)


if __name__ == "__main__":
    main()
