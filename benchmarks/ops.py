"""Ops without parameters: flax_attn.ops (jit) vs their PyTorch counterparts, same process, same shapes.

    python benchmarks/ops.py [--repeats 10] [--out benchmarks/results/ops_cpu.md]

grid_sample and affine_grid are compared with torch.nn.functional; deform_conv2d with the plain-torch
gather implementation of torchvision's semantics in flax_attn.testing.torch_ref.deform (torchvision
has no CPU wheel here, so its C++ kernel is not available to time); criss-cross attention with the
einsum form CCNet's pure-PyTorch version uses; neighbourhood attention with ACmix's unfold form.
Forward, and forward+backward (gradients of sum(out) w.r.t. every floating input). Ratio = torch /
JAX (> 1: JAX faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flax_attn, installed or not

from flax_attn.testing.timing import compiled_mib, markdown_head, median_ms, timing_text, write_report  # noqa: E402


def _cases():
    import torch

    from flax_attn import ops
    from flax_attn.testing.torch_ref import deform as tdeform

    rng = np.random.default_rng(0)
    f32 = np.float32

    def gs_inputs():
        x = rng.standard_normal((8, 64, 64, 32), dtype=f32)
        grid = rng.uniform(-1.1, 1.1, (8, 48, 48, 2)).astype(f32)
        return {"x": x, "grid": grid}

    def gs_torch(x, grid):
        return torch.nn.functional.grid_sample(
            x.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )

    def dc_inputs():
        x = rng.standard_normal((4, 32, 32, 64), dtype=f32)
        offset = rng.standard_normal((4, 32, 32, 2 * 9), dtype=f32)
        mask = rng.uniform(0, 1, (4, 32, 32, 9)).astype(f32)
        weight = (rng.standard_normal((3, 3, 64, 64)) * 0.05).astype(f32)
        return {"x": x, "offset": offset, "mask": mask, "weight": weight}

    def dc_torch(x, offset, mask, weight):
        return tdeform.deform_conv2d(
            x.permute(0, 3, 1, 2),
            offset.permute(0, 3, 1, 2),
            weight.permute(3, 2, 0, 1),
            None,
            padding=(1, 1),
            mask=mask.permute(0, 3, 1, 2),
        )

    def cc_inputs():
        return {
            "q": rng.standard_normal((2, 97, 97, 64), dtype=f32),
            "k": rng.standard_normal((2, 97, 97, 64), dtype=f32),
            "v": rng.standard_normal((2, 97, 97, 128), dtype=f32),
        }

    def cc_torch(q, k, v):
        # CCNet's pure-PyTorch form (cc.py): column energies with the centre masked, row energies.
        b, h, w, _ = q.shape
        e_h = torch.einsum("bhwc,bjwc->bhwj", q, k) + torch.diag(torch.full((h,), float("-inf")))[None, :, None, :]
        e_w = torch.einsum("bhwc,bhjc->bhwj", q, k)
        att = torch.softmax(torch.cat([e_h, e_w], -1), -1)
        return torch.einsum("bhwj,bjwc->bhwc", att[..., :h], v) + torch.einsum("bhwj,bhjc->bhwc", att[..., h:], v)

    def na_inputs():
        return {k: rng.standard_normal((4, 28, 28, 4, 32), dtype=f32) for k in ("q", "k", "v")}

    def na_torch(q, k, v, ks=7):
        # ACmix's unfold form: reflection-pad keys/values, unfold k x k windows, softmax over them.
        b, h, w, nh, d = q.shape
        pad = ks // 2

        def unfold(t):
            t = t.permute(0, 3, 4, 1, 2).reshape(b, nh * d, h, w)
            t = torch.nn.functional.pad(t, (pad,) * 4, mode="reflect")
            return torch.nn.functional.unfold(t, ks).view(b, nh, d, ks * ks, h, w)

        qh = q.permute(0, 3, 4, 1, 2).unsqueeze(3) * d**-0.5
        att = torch.softmax((qh * unfold(k)).sum(2), dim=2)
        return (att.unsqueeze(2) * unfold(v)).sum(3)

    return [
        (
            "grid_sample bilinear zeros",
            gs_inputs,
            lambda x, grid: ops.grid_sample(x, grid, mode="bilinear", padding_mode="zeros"),
            gs_torch,
        ),
        (
            "deform_conv2d v2 (modulated)",
            dc_inputs,
            lambda x, offset, mask, weight: ops.deform_conv2d(x, offset, weight, padding=1, mask=mask),
            dc_torch,
        ),
        ("criss_cross_attention 97x97", cc_inputs, lambda q, k, v: ops.criss_cross_attention(q, k, v), cc_torch),
        (
            "neighborhood_attention 7x7 reflect",
            na_inputs,
            lambda q, k, v: ops.neighborhood_attention(q, k, v, kernel_size=7, border="reflect"),
            na_torch,
        ),
    ]


def bench(name, make_inputs, jax_fn, torch_fn, repeats):
    import jax
    import jax.numpy as jnp
    import torch

    inputs = make_inputs()
    jin = {k: jnp.asarray(v) for k, v in inputs.items()}
    fwd = jax.jit(lambda a: jax_fn(**a)).lower(jin).compile()
    fb = jax.jit(jax.grad(lambda a: jnp.sum(jax_fn(**a)))).lower(jin).compile()
    t_fwd = median_ms(lambda: jax.block_until_ready(fwd(jin)), repeats, warmup=2)
    t_fb = median_ms(lambda: jax.block_until_ready(fb(jin)), repeats, warmup=2)
    tin = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def torch_fwd():
        with torch.no_grad():
            return torch_fn(**tin)

    tg = {k: v.clone().requires_grad_() for k, v in tin.items()}

    def torch_fb():
        return torch.autograd.grad(torch_fn(**tg).sum(), list(tg.values()))

    tt_fwd = median_ms(torch_fwd, repeats, warmup=2)
    tt_fb = median_ms(torch_fb, repeats, warmup=2)
    shapes = " ".join(f"{k}{tuple(v.shape)}" for k, v in inputs.items())
    return (
        f"| {name} | {shapes} | {t_fwd:.2f} | {tt_fwd:.2f} | {tt_fwd / t_fwd:.2f} | {t_fb:.2f} | "
        f"{tt_fb:.2f} | {tt_fb / t_fb:.2f} | {compiled_mib(fwd):.1f} | {compiled_mib(fb):.1f} |"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    head = ["op", "inputs", "JAX fwd ms", "torch fwd ms", "torch/JAX fwd", "JAX fwd+bwd ms", "torch fwd+bwd ms"]
    head += ["torch/JAX fwd+bwd", "XLA peak MB fwd", "XLA peak MB fwd+bwd"]
    lines = markdown_head(head)
    for case in _cases():
        lines.append(bench(*case, args.repeats))
        print(lines[-1], flush=True)
    text = timing_text(lines, args.repeats)
    write_report("Ops benchmark", "python benchmarks/ops.py", text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
