"""Scaled dot-product attention: flax_attn.ops vs jax.nn.dot_product_attention vs torch SDPA, same process.

    python benchmarks/sdpa.py [--repeats 10] [--out benchmarks/results/sdpa_cpu.md]

Forward and forward+backward (gradients w.r.t. q, k, v of sum(out)), float32, median milliseconds,
and XLA's compiled peak memory. Ratio = torch time / flax_attn time (> 1: flax_attn is faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flax_attn, installed or not

from flax_attn.testing.timing import compiled_mib, markdown_head, median_ms, timing_text, write_report  # noqa: E402

SHAPES = [  # (batch, length, heads, head_dim, masked)
    (8, 256, 8, 64, False),
    (8, 256, 8, 64, True),
    (4, 1024, 8, 64, False),
    (32, 128, 4, 32, True),
]


def bench_shape(b, l, h, d, masked, repeats):
    import jax
    import jax.numpy as jnp
    import torch

    from flax_attn.ops import scaled_dot_product_attention as sdpa

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, l, h, d), dtype=np.float32) for _ in range(3))
    mask = None
    if masked:
        keep = np.ones((b, 1, 1, l), bool)
        keep[:, ..., l // 2 :] = rng.random((b, 1, 1, l - l // 2)) > 0.5
        mask = keep
    jq, jk, jv = map(jnp.asarray, (q, k, v))
    jm = None if mask is None else jnp.asarray(mask)
    fwd = jax.jit(lambda q, k, v, m: sdpa(q, k, v, mask=m)).lower(jq, jk, jv, jm).compile()
    ref = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m)).lower(jq, jk, jv, jm).compile()
    fb = jax.jit(jax.grad(lambda q, k, v, m: jnp.sum(sdpa(q, k, v, mask=m)), argnums=(0, 1, 2)))
    fb = fb.lower(jq, jk, jv, jm).compile()
    t_f = median_ms(lambda: jax.block_until_ready(fwd(jq, jk, jv, jm)), repeats, warmup=2)
    t_ref = median_ms(lambda: jax.block_until_ready(ref(jq, jk, jv, jm)), repeats, warmup=2)
    t_fb = median_ms(lambda: jax.block_until_ready(fb(jq, jk, jv, jm)), repeats, warmup=2)

    tq, tk, tv = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v))
    tm = None if mask is None else torch.from_numpy(mask)

    def t_fwd():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm)

    gq, gk, gv = (t.clone().requires_grad_() for t in (tq, tk, tv))

    def t_fwd_bwd():
        out = torch.nn.functional.scaled_dot_product_attention(gq, gk, gv, attn_mask=tm)
        return torch.autograd.grad(out.sum(), (gq, gk, gv))

    tt_f = median_ms(t_fwd, repeats, warmup=2)
    tt_fb = median_ms(t_fwd_bwd, repeats, warmup=2)
    cells = [
        f"{b}, {l}, {h}, {d}",
        "key padding" if masked else "-",
        f"{t_f:.2f}",
        f"{t_ref:.2f}",
        f"{tt_f:.2f}",
        f"{tt_f / t_f:.2f}",
        f"{t_fb:.2f}",
        f"{tt_fb:.2f}",
        f"{tt_fb / t_fb:.2f}",
        f"{compiled_mib(fwd):.1f}",
        f"{compiled_mib(fb):.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    head = [
        "B, L, H, D",
        "mask",
        "flax_attn fwd",
        "jax.nn fwd",
        "torch fwd",
        "torch/flax_attn fwd",
        "flax_attn f+b",
        "torch f+b",
        "torch/flax_attn f+b",
        "XLA peak MB fwd",
        "XLA peak MB f+b",
    ]
    lines = markdown_head(head)
    for shape in SHAPES:
        lines.append(bench_shape(*shape, args.repeats))
        print(lines[-1], flush=True)
    text = timing_text(lines, args.repeats)
    write_report("SDPA benchmark", "python benchmarks/sdpa.py", text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
