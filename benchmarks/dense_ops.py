"""Side-by-side: each op rewritten for issue 11 against its previous version, same process, same shapes.

The previous version of every module is loaded from git (``--baseline``, default ``a444c70``, where issue 11 began) with
``git show``, so both run under the same JAX, threads and machine state. Timed: the jitted
forward + backward (gradient of ``sum(out * cotangent)`` w.r.t. every floating input), median of
``--repeats`` runs after warm-up, with the two versions interleaved run by run so that load on a
shared machine hits both alike; and XLA's compiled peak memory of that step. Ratio = old / new
(> 1: the rewrite is faster). Also counts serial ops (scatter, select_and_scatter) in each lowering.
The ``layers.Conv`` rows compare ``lax.conv_general_dilated`` with the patch matmul that ``Conv``
now uses for tiny output maps on CPU.

    python benchmarks/dense_ops.py [--baseline a444c70] [--repeats 15] [--out benchmarks/results/dense_ops_cpu.md]

No asserts: this prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flax_attn.testing.timing import compiled_mib, environment  # noqa: E402


def _old_module(ref: str, path: str) -> types.ModuleType:
    src = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True)
    mod = types.ModuleType(f"baseline_{Path(path).stem}")
    exec(compile(src.stdout, f"{ref}:{path}", "exec"), mod.__dict__)
    return mod


def _cases(ref: str):
    import jax
    import jax.numpy as jnp

    from flax_attn import ops
    from flax_attn.ops import neighborhood, non_local, relative_logits, sampling
    from flax_attn.ops.conv import patch_matmul_conv

    old = {
        name: _old_module(ref, f"flax_attn/ops/{name}.py")
        for name in (
            "max_pool",
            "resize",
            "relative_logits",
            "sampling",
            "deform",
            "neighborhood",
            "window",
            "non_local",
        )
    }
    rng = np.random.default_rng(0)

    def a(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def theta(n):
        t = np.tile(np.array([[0.9, 0.1, 0.05], [-0.1, 0.8, -0.02]], np.float32), (n, 1, 1))
        return t + 0.05 * a(n, 2, 3)

    def grid(n, h, w):
        return np.asarray(ops.affine_grid(jnp.asarray(theta(n)), (n, h, w, 1)))

    def with_table(window_attention):
        def f(q, k, v, table, **kw):
            return window_attention(q, k, v, bias_table=table, **kw)

        return f

    def conv_general(x, w):
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=dn)

    def conv_patches(x, w):
        return patch_matmul_conv(x, w, (1, 1), [(1, 1), (1, 1)], (1, 1))

    def concat_terms(mod):
        def f(th, ph, g):
            return mod._concat_sorted(th[..., 0], ph[..., 0], g)

        return f

    qkv = a(4, 56, 56, 8, 32)
    yield (
        "max_pool 3x3/2 pad 1 (se_resnet18 stem)",
        old["max_pool"].max_pool,
        ops.max_pool,
        (a(8, 32, 32, 64),),
        dict(kernel_size=3, stride=2, padding=1),
    )
    yield (
        "max_pool 2x2 (non_local sub-sampling)",
        old["max_pool"].max_pool,
        ops.max_pool,
        (a(8, 64, 64, 128),),
        dict(kernel_size=2),
    )
    yield (
        "interpolate nearest x2 (a2n)",
        old["resize"].interpolate,
        ops.interpolate,
        (a(16, 64, 64, 24),),
        dict(scale_factor=2, mode="nearest"),
    )
    yield (
        "interpolate bilinear x4 (a2n skip)",
        old["resize"].interpolate,
        ops.interpolate,
        (a(16, 64, 64, 3),),
        dict(scale_factor=4, mode="bilinear", align_corners=False),
    )
    yield (
        "interpolate bilinear ac 28->56 (res. attention)",
        old["resize"].interpolate,
        ops.interpolate,
        (a(8, 28, 28, 256),),
        dict(size=(56, 56), mode="bilinear", align_corners=True),
    )
    yield (
        "relative_logits_2d 32x32, 8 heads",
        old["relative_logits"].relative_logits_2d,
        relative_logits.relative_logits_2d,
        (a(8, 32, 32, 8, 8), a(63, 8), a(63, 8)),
        {},
    )
    yield (
        "window_attention 7x7 shift 3, bias",
        with_table(old["window"].window_attention),
        with_table(ops.window_attention),
        (a(32, 56, 56, 3, 32), a(32, 56, 56, 3, 32), a(32, 56, 56, 3, 32), a(169, 3)),
        dict(window_size=7, shift_size=3, implementation="xla"),
    )
    yield (
        "neighborhood 7x7 reflect (acmix)",
        old["neighborhood"].neighborhood_attention,
        neighborhood.neighborhood_attention,
        (qkv, qkv, qkv),
        dict(kernel_size=7, implementation="xla"),
    )
    yield (
        "neighborhood 7x7 reflect stride 2",
        old["neighborhood"].neighborhood_attention,
        neighborhood.neighborhood_attention,
        (a(4, 28, 28, 8, 32), qkv, qkv),
        dict(kernel_size=7, stride=2, implementation="xla"),
    )
    yield (
        "neighborhood 7x7 clamp (NATTEN)",
        old["neighborhood"].neighborhood_attention,
        neighborhood.neighborhood_attention,
        (qkv, qkv, qkv),
        dict(kernel_size=7, border="clamp", implementation="xla"),
    )
    yield (
        "grid_sample bilinear 128x128x3 (stn)",
        old["sampling"].grid_sample,
        sampling.grid_sample,
        (a(32, 128, 128, 3), grid(32, 128, 128)),
        {},
    )
    yield (
        "grid_sample bilinear 64x64x32",
        old["sampling"].grid_sample,
        sampling.grid_sample,
        (a(8, 64, 64, 32), grid(8, 64, 64)),
        {},
    )
    yield (
        "deform_conv2d 3x3 64->64 at 64x64",
        old["deform"].deform_conv2d,
        ops.deform_conv2d,
        (a(8, 64, 64, 64), 0.5 * a(8, 64, 64, 18), 0.1 * a(3, 3, 64, 64)),
        dict(padding=1),
    )
    yield (
        "foveate g=8 k=3 (RAM, 28x28)",
        old["sampling"].foveate,
        sampling.foveate,
        (a(128, 28, 28, 1), np.clip(a(128, 2), -1, 1)),
        dict(g=8, k=3, s=2),
    )
    yield (
        "non-local concatenation N=4096 M=1024",
        concat_terms(old["non_local"]),
        concat_terms(non_local),
        (a(8, 4096, 1), a(8, 1024, 1), a(8, 1024, 128)),
        {},
    )
    for b, hw, ch in ((8, 2, 512), (8, 4, 512), (8, 7, 512), (8, 8, 256)):
        yield (
            f"layers.Conv 3x3 {ch}->{ch} at {b}x{hw}x{hw} (conv vs patch matmul)",
            conv_general,
            conv_patches,
            (a(b, hw, hw, ch), 0.02 * a(3, 3, ch, ch)),
            {},
        )


def _step(fn, args, kwargs):
    """``(jitted step, its arguments)``: the VJP of ``fn`` for a fixed random cotangent passed in.

    The cotangent is an argument, not computed in the graph: XLA fuses elementwise producers into
    every consumer, so a cotangent built from, e.g., ``cos(iota)`` would be recomputed inside each
    fused gradient loop and time that instead of the op.
    """
    import jax

    floats = tuple(i for i, x in enumerate(args) if np.issubdtype(np.asarray(x).dtype, np.floating))
    out_shapes = jax.eval_shape(lambda *xs: fn(*xs, **kwargs), *args)
    rng = np.random.default_rng(1)
    cots = jax.tree_util.tree_map(lambda o: rng.standard_normal(o.shape).astype(o.dtype), out_shapes)

    def step(xs, cot):
        def f(*diff):
            full = list(xs)
            for i, d in zip(floats, diff):
                full[i] = d
            return fn(*full, **kwargs)

        _, vjp = jax.vjp(f, *[xs[i] for i in floats])
        return vjp(cot)

    return jax.jit(step), (tuple(args), cots)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--baseline", default="a444c70", help="git ref of the previous versions (default: where issue 11 began)"
    )
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--only", default=None, help="substring of the case names to run")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import jax

    from flax_attn.testing.hlo import SERIAL_OPS, count_ops

    jax.config.update("jax_default_matmul_precision", "highest")
    rows = []
    for name, old_fn, new_fn, xs, kwargs in _cases(args.baseline):
        if args.only and args.only not in name:
            continue
        xs = tuple(jax.numpy.asarray(x) for x in xs)
        compiled, serial = [], []
        for fn in (old_fn, new_fn):
            step, step_args = _step(fn, xs, kwargs)
            lowered = step.lower(*step_args)
            counts = count_ops(lowered.as_text(), SERIAL_OPS)
            serial.append(", ".join(f"{k.split('.')[-1]} {v}" for k, v in counts.items() if v) or "none")
            compiled.append(lowered.compile())
        times = ([], [])
        for i in range(args.repeats + 2):
            for j, c in enumerate(compiled):
                t0 = time.perf_counter()
                jax.block_until_ready(c(*step_args))
                if i >= 2:
                    times[j].append((time.perf_counter() - t0) * 1e3)
        t_old, t_new = (statistics.median(t) for t in times)
        m_old, m_new = (compiled_mib(c) for c in compiled)
        rows.append((name, t_old, t_new, m_old, m_new, serial[0], serial[1]))
        print(
            f"{name:50s} old {t_old:9.2f} ms  new {t_new:9.2f} ms  x{t_old / t_new:5.2f}  "
            f"mem {m_old:.1f} -> {m_new:.1f} MB  [{serial[0]} -> {serial[1]}]",
            flush=True,
        )

    head = (
        "| op (fwd+bwd, jit) | previous ms | rewritten ms | previous / rewritten | peak MB prev | peak MB new "
        "| serial ops prev | serial ops new |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name, t_old, t_new, m_old, m_new, s_old, s_new in rows:
        cells = [name, f"{t_old:.2f}", f"{t_new:.2f}", f"{t_old / t_new:.2f}", f"{m_old:.1f}", f"{m_new:.1f}"]
        lines.append("| " + " | ".join([*cells, s_old, s_new]) + " |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        args.out.write_text(
            f"# Issue 11 rewrites vs their previous versions (baseline `{args.baseline}`)\n\n{environment()}\n\n"
            f"Median of {args.repeats} interleaved runs.\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
