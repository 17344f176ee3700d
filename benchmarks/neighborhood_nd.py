"""ops.na1d/na2d/na3d (XLA) against dense attention with the same mask and against NATTEN's CPU forward.

    python benchmarks/neighborhood_nd.py                       # prints the table
    python benchmarks/neighborhood_nd.py --out benchmarks/results/neighborhood_cpu.md
    python benchmarks/neighborhood_nd.py --repeats 1 --sizes 1d  # quick smoke run

Sizes: NAT-Tiny stage 1 (56x56 tokens, 7x7 window, 2 heads x 32), the same 3136 tokens as a 1-D
sequence with a 49-token window, and a video clip (8x28x28, 3x3x3 window, 2 heads x 32); the
dilated and causal variants of the 2-D size too. For each: forward and forward+backward (gradient
of ``sum(out * ct)`` w.r.t. q, k, v) median wall time, ``jax.jit``-compiled, of

* ``na``: ``flax_attn.ops.na{n}d(..., implementation="xla")``;
* ``dense``: ``softmax(q k^T * scale, masked to NATTEN's window) v`` over all tokens in JAX
  (the mask from ``flax_attn.testing.neighborhood_ref.natten_mask``);
* ``natten``: ``natten.na{n}d`` (0.21, Flex Attention backend, forward only: it has no CPU
  backward; without ``torch.compile`` flex runs unfused and materialises the full score matrix);

and XLA's compiled peak memory (arguments + outputs + temporaries) of the two JAX functions.
Ratios > 1 mean ``na`` is faster / smaller. No asserts: it prints a table.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax_attn.testing.timing import compiled_mib, markdown_head, median_ms, timing_text  # noqa: E402

SIZES = {  # name: (batch, spatial, kernel_size, dilation, is_causal)
    "1d": (2, (3136,), 49, 1, False),
    "2d": (2, (56, 56), 7, 1, False),
    "2d_dilated": (2, (56, 56), 7, 4, False),
    "2d_causal": (2, (56, 56), 7, 1, True),
    "3d": (1, (8, 28, 28), 3, 1, False),
}
HEADS, DIM = 2, 32


def _dense(mask, scale):
    import jax
    import jax.numpy as jnp

    def fn(q, k, v):
        b, *spatial, h, d = q.shape
        n = math.prod(spatial)
        qf, kf, vf = (x.reshape(b, n, h, d) for x in (q, k, v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
        weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, vf).reshape(q.shape)

    return fn


def bench(name, repeats):
    import jax
    import jax.numpy as jnp

    from flax_attn.ops import na1d, na2d, na3d
    from flax_attn.testing.neighborhood_ref import natten_mask

    batch, spatial, ks, dl, causal = SIZES[name]
    n = len(spatial)
    op = {1: na1d, 2: na2d, 3: na3d}[n]
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((batch, *spatial, HEADS, DIM)), jnp.float32) for _ in range(4))
    mask = jnp.asarray(natten_mask(spatial, (ks,) * n, (1,) * n, (dl,) * n, (causal,) * n))
    scale = DIM**-0.5
    fns = {
        "na": lambda q, k, v: op(q, k, v, ks, dilation=dl, is_causal=causal, implementation="xla"),
        "dense": _dense(mask, scale),
    }
    row = {"size": name, "shape": f"{batch}x{'x'.join(map(str, spatial))}, k={ks}, d={dl}, causal={causal}"}
    outs = {}
    for label, f in fns.items():
        fwd = jax.jit(f)
        grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2)))
        row[f"{label} peak fwd"] = compiled_mib(fwd.lower(q, k, v).compile())
        row[f"{label} peak fwd+bwd"] = compiled_mib(grad.lower(q, k, v).compile())
        row[f"{label} fwd"] = median_ms(lambda fwd=fwd: fwd(q, k, v).block_until_ready(), repeats, warmup=1)
        row[f"{label} fwd+bwd"] = median_ms(lambda grad=grad: jax.block_until_ready(grad(q, k, v)), repeats, warmup=1)
        outs[label] = np.asarray(fwd(q, k, v))
    row["max |na - dense|"] = float(np.abs(outs["na"] - outs["dense"]).max())
    try:
        import natten
        import torch
    except ImportError:
        row["natten fwd"] = None
        return row
    tq, tk, tv = (torch.from_numpy(np.array(x)) for x in (q, k, v))
    nfn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[n]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        run = lambda: nfn(tq, tk, tv, kernel_size=ks, dilation=dl, is_causal=causal)  # noqa: E731
        row["natten fwd"] = median_ms(run, repeats, warmup=1)
        row["max |na - natten|"] = float(np.abs(outs["na"] - run().numpy()).max())
    return row


def _f(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table(rows) -> str:
    head = [
        "size",
        "na fwd ms",
        "dense fwd ms",
        "dense/na fwd",
        "natten fwd ms",
        "natten/na fwd",
        "na fwd+bwd ms",
        "dense fwd+bwd ms",
        "dense/na fwd+bwd",
        "na peak MB fwd / fwd+bwd",
        "dense peak MB fwd / fwd+bwd",
        "max err vs dense / natten",
    ]
    lines = markdown_head(head)
    for r in rows:
        nat = r.get("natten fwd")
        cells = [
            f"{r['size']} ({r['shape']})",
            _f(r["na fwd"]),
            _f(r["dense fwd"]),
            _f(r["dense fwd"] / r["na fwd"], ".2f"),
            _f(nat),
            _f(None if nat is None else nat / r["na fwd"], ".2f"),
            _f(r["na fwd+bwd"]),
            _f(r["dense fwd+bwd"]),
            _f(r["dense fwd+bwd"] / r["na fwd+bwd"], ".2f"),
            f"{_f(r['na peak fwd'])} / {_f(r['na peak fwd+bwd'])}",
            f"{_f(r['dense peak fwd'])} / {_f(r['dense peak fwd+bwd'])}",
            f"{r['max |na - dense|']:.1e} / {_f(r.get('max |na - natten|'), '.1e')}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    for name in args.sizes:
        rows.append(bench(name, args.repeats))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = (
        "# Neighbourhood attention (na1d/na2d/na3d, XLA) vs dense masked attention vs NATTEN, CPU\n\n"
        f"Command: `python benchmarks/neighborhood_nd.py --repeats {args.repeats}`\n\n"
        + timing_text(table(rows).splitlines(), args.repeats, f"; {HEADS} heads x {DIM}, float32")
    )
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
