"""Time catalogued blocks: JAX (jit) against PyTorch eager (and torch.compile), same shapes, same process.

For every block: forward in eval mode (inference) and forward+backward in train mode (gradients of
``sum(outputs)`` w.r.t. all parameters and floating inputs), median wall time over ``--repeats``
runs after warm-up, and XLA's compiled peak memory (``memory_analysis()``: arguments + outputs +
temporaries, minus aliased bytes). Ratios are PyTorch time / JAX time (> 1: JAX is faster).

    python benchmarks/run.py                         # every block with a PyTorch reference
    python benchmarks/run.py multihead_attention se_layer --repeats 20 --compile
    python benchmarks/run.py --small                 # the small test shapes (quick smoke run)
    python benchmarks/run.py --out benchmarks/results/cpu.md

No asserts: this prints tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flax_attn, installed or not

from flax_attn.testing.timing import compiled_mib, environment, median_ms  # noqa: E402


def bench_entry(entry, *, repeats: int, small: bool, use_compile: bool, dtype: str = "float32"):
    import jax
    import jax.numpy as jnp
    import torch

    from flax_attn.convert import from_torch
    from flax_attn.convert.io import to_numpy
    from flax_attn.testing.parity import randomize_torch_module, to_torch_axes

    config = dict(entry.config if small or entry.bench_config is None else entry.bench_config)
    inputs = entry.make_inputs(np.random.default_rng(0), config, bench=not small)
    flax_kwargs = entry.flax_kwargs  # call_kwargs, and method=flax_call when the entry has one
    float_names = [k for k, v in inputs.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]

    tmod = entry.build_torch(config)
    randomize_torch_module(tmod, 0)
    sd = {k: to_numpy(v) for k, v in tmod.state_dict().items()}
    fmod = entry.build_flax(config)
    variables = from_torch(fmod, sd, **inputs, **flax_kwargs)
    jin = {k: jnp.asarray(v) for k, v in inputs.items()}

    def leaves(out):
        return [o for o in jax.tree_util.tree_leaves(out) if o is not None]

    def fwd(v, x):
        return fmod.apply(v, **x, **flax_kwargs, train=False)

    train = entry.train_mode

    def loss(params, v, x):
        v = {**v, "params": params} if params else v
        if train:
            out, _ = fmod.apply(
                v, **x, **flax_kwargs, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)}
            )
        else:
            out = fmod.apply(v, **x, **flax_kwargs, train=False)
        return sum(jnp.sum(o.astype(jnp.float32)) for o in leaves(out))

    float_in = {k: jin[k] for k in float_names}
    other_in = {k: v for k, v in jin.items() if k not in float_names}

    def fwd_bwd(v, fx):
        # parameter-free blocks (cost volumes, soft-argmin) differentiate w.r.t. their inputs only
        return jax.grad(lambda p, f: loss(p, v, {**other_in, **f}), argnums=(0, 1))(v.get("params", {}), fx)

    fwd_c = jax.jit(fwd).lower(variables, jin).compile()
    bwd_c = jax.jit(fwd_bwd).lower(variables, float_in).compile()
    row = {"block": entry.name, "shape": " ".join(f"{k}{tuple(np.shape(v))}" for k, v in inputs.items())}
    row["jax_fwd"] = median_ms(lambda: jax.block_until_ready(fwd_c(variables, jin)), repeats, warmup=2)
    row["jax_fb"] = median_ms(lambda: jax.block_until_ready(bwd_c(variables, float_in)), repeats, warmup=2)
    row["mem_fwd"] = compiled_mib(fwd_c)
    row["mem_fb"] = compiled_mib(bwd_c)

    tin = {k: torch.from_numpy(to_torch_axes(np.asarray(v), k in entry.image_inputs)) for k, v in inputs.items()}

    def t_fwd(m):
        with torch.no_grad():
            return entry.call_torch(m, **tin)

    tmod.eval()
    row["torch_fwd"] = median_ms(lambda: t_fwd(tmod), repeats, warmup=2)
    tmod.train(train)
    params = [p for p in tmod.parameters() if p.requires_grad]
    tin_g = {k: (v.clone().requires_grad_(True) if k in float_names else v) for k, v in tin.items()}

    def t_fb(m):
        out = entry.call_torch(m, **tin_g)
        total = sum(o.float().sum() for o in jax.tree_util.tree_leaves(out) if o is not None)
        return torch.autograd.grad(total, params + [tin_g[k] for k in float_names], allow_unused=True)

    row["torch_fb"] = median_ms(lambda: t_fb(tmod), repeats, warmup=2)
    if use_compile:
        try:
            cm = torch.compile(tmod)
            cm.eval()
            row["compile_fwd"] = median_ms(lambda: t_fwd(cm), repeats, warmup=3)
        except Exception as e:  # torch.compile is unavailable for some ops/platforms
            row["compile_fwd"] = None
            row["compile_error"] = type(e).__name__
    return row


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def table(rows, use_compile: bool) -> str:
    head = ["block", "inputs", "JAX fwd ms", "torch fwd ms", "torch/JAX fwd"]
    if use_compile:
        head += ["torch.compile fwd ms"]
    head += ["JAX fwd+bwd ms", "torch fwd+bwd ms", "torch/JAX fwd+bwd", "XLA peak MB fwd", "XLA peak MB fwd+bwd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['block']} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["block"], r["shape"], _fmt(r["jax_fwd"]), _fmt(r["torch_fwd"]), _fmt(r["torch_fwd"] / r["jax_fwd"])]
        if use_compile:
            cells.append(_fmt(r.get("compile_fwd")))
        cells += [
            _fmt(r["jax_fb"]),
            _fmt(r["torch_fb"]),
            _fmt(r["torch_fb"] / r["jax_fb"]),
            _fmt(r["mem_fwd"], ".1f"),
            _fmt(r["mem_fb"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("blocks", nargs="*")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--small", action="store_true", help="use the small test shapes")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (forward)")
    p.add_argument("--out", type=Path, default=None, help="write the table (markdown) here too")
    args = p.parse_args(argv)

    import jax

    from flax_attn import catalogue

    jax.config.update("jax_default_matmul_precision", "highest")  # same float32 math as torch on CPU
    names = args.blocks or [e.name for e in catalogue.entries() if e.torch is not None]
    rows = []
    for name in names:
        entry = catalogue.get(name)
        try:
            rows.append(bench_entry(entry, repeats=args.repeats, small=args.small, use_compile=args.compile))
        except Exception as e:  # keep going: one broken benchmark should not hide the others
            rows.append({"block": name, "error": f"{type(e).__name__}: {e}"[:200]})
        print(table(rows[-1:], args.compile).splitlines()[-1], flush=True)
    env = environment()
    text = f"{env}\n\n{table(rows, args.compile)}\n"
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Block benchmarks\n\nCommand: `python benchmarks/run.py {' '.join(argv or sys.argv[1:])}`\n\n{text}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
