"""Training throughput of the ``train`` library, and a JAX vs PyTorch training step.

1. Per task (the default configs): images/s of the jitted, sharded train step alone (batch kept
   on device) and of the whole loop body (host data loading + transfer + step).
2. SE-ResNet-50 (senet.pytorch layout) trained with SGD+momentum: median step time of
   ``jax.jit`` vs the equivalent eager PyTorch module on the same device (CPU here). The Flax
   model is loaded from the PyTorch model's weights and checked to give the same logits first.

Prints a table and writes ``benchmarks/results/train_throughput.md`` (device, versions, date).

    PYTHONPATH=. python benchmarks/train_throughput.py [--steps 30] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_attn.testing.timing import median_seconds
from flax_attn.training import sharding as sh
from flax_attn.training.configs import get_config
from flax_attn.training.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"


def task_throughput(name: str, steps: int) -> dict:
    cfg = get_config(name)
    with tempfile.TemporaryDirectory() as d:
        t = Trainer(cfg, d)
        state = t.initial_state()
        src, batch_size = t.task.train_source, cfg.data.batch_size
        batch = sh.to_global(src.batch(0, t.rows), t.mesh, batch_size)
        state, m = t.train_step(state, batch, t.step_key)  # compile
        jax.block_until_ready(m)
        holder = {"s": state}

        def step_only():
            holder["s"], mm = t.train_step(holder["s"], batch, t.step_key)
            jax.block_until_ready(mm)

        def with_data(i=[1]):  # noqa: B006  (a step counter across calls)
            b = sh.to_global(src.batch(i[0], t.rows), t.mesh, batch_size)
            i[0] += 1
            holder["s"], mm = t.train_step(holder["s"], b, t.step_key)
            jax.block_until_ready(mm)

        s1 = median_seconds(step_only, steps, warmup=0)
        s2 = median_seconds(with_data, steps, warmup=0)
    return {
        "task": name,
        "batch": batch_size,
        "step_ms": 1e3 * s1,
        "img_s": batch_size / s1,
        "loop_ms": 1e3 * s2,
        "loop_img_s": batch_size / s2,
    }


# --------------------------------------------------------------------------- PyTorch equivalent


def jax_vs_torch(batch: int, size: int, reps: int) -> dict:
    """SE-ResNet-50 (senet.pytorch layout), one SGD+momentum training step, JAX jit vs PyTorch eager.

    The PyTorch model is the parity reference (``flax_attn.testing.torch_ref.se``); its weights are
    converted into the Flax model with ``from_torch`` and the eval logits are compared first.
    """
    import torch

    from flax_attn import se_resnet50
    from flax_attn.convert import from_torch
    from flax_attn.testing.torch_ref.se import se_resnet50 as torch_se_resnet50

    torch.manual_seed(0)
    net = torch_se_resnet50(num_classes=1000, se_style="senet")
    model = se_resnet50(num_classes=1000, se_style="senet")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 1000, batch).astype(np.int32)
    variables = from_torch(model, net.state_dict(), x[:1])
    tx = optax.sgd(0.01, momentum=0.9)

    mesh = sh.make_mesh()
    repl, bsh = sh.replicated(mesh), sh.batch_sharding(mesh)

    def step(params, bs, opt, xb, yb):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": bs}, xb, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd["batch_stats"]

        (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), bs, opt, loss

    jstep = jax.jit(step, in_shardings=(repl, repl, repl, bsh, bsh), out_shardings=repl, donate_argnums=(0, 1, 2))
    net.eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    out = np.asarray(model.apply(variables, jnp.asarray(x)))
    max_err = float(np.abs(out - ref).max())
    st = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]
    xb, yb = jax.device_put(x, bsh), jax.device_put(y, bsh)

    def run_jax():
        st[0], st[1], st[2], loss = jstep(st[0], st[1], st[2], xb, yb)
        loss.block_until_ready()

    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous(), torch.from_numpy(y.astype(np.int64))

    def run_torch():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()

    run_jax(), run_torch()  # compile / warm up
    tj = median_seconds(run_jax, reps, warmup=0)
    tt = median_seconds(run_torch, reps, warmup=0)
    return {
        "batch": batch,
        "size": size,
        "jax_ms": 1e3 * tj,
        "torch_ms": 1e3 * tt,
        "eval_max_err": max_err,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement (median)")
    ap.add_argument("--quick", action="store_true", help="a few steps, for a smoke test")
    args = ap.parse_args()
    reps = 3 if args.quick else args.steps

    rows = [task_throughput(n, reps) for n in ("classify", "superres")]
    cmp_ = jax_vs_torch(batch=16, size=64, reps=max(reps // 3, 3))

    import torch

    dev = jax.devices()[0]
    header = [
        f"# Training throughput ({datetime.date.today().isoformat()})",
        "",
        f"- device: {dev.platform} / {dev.device_kind} x {jax.device_count()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs)",
        f"- versions: jax {jax.__version__}, flax {__import__('flax').__version__}, "
        f"optax {optax.__version__}, "
        f"torch {torch.__version__}, python {platform.python_version()}",
        f"- median of {reps} steps after a warm-up/compile step; 1-minute load average "
        f"{os.getloadavg()[0]:.1f} when measured (other jobs on the machine inflate the times)",
        "",
        "| task | global batch | step (ms) | images/s (step) | step + data (ms) | images/s (loop) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        header.append(
            f"| {r['task']} | {r['batch']} | {r['step_ms']:.1f} | {r['img_s']:.0f} | "
            f"{r['loop_ms']:.1f} | {r['loop_img_s']:.0f} |"
        )
    header += [
        "",
        f"SE-ResNet-50 (senet layout, 1000 classes), batch {cmp_['batch']}, "
        f"3x{cmp_['size']}x{cmp_['size']}, SGD momentum, one training step "
        "(forward, loss, backward, update); "
        f"eval logits JAX vs PyTorch max abs err {cmp_['eval_max_err']:.2e}:",
        "",
        "| framework | step (ms) | images/s | ratio (torch / jax) |",
        "| --- | ---: | ---: | ---: |",
        f"| JAX jit | {cmp_['jax_ms']:.1f} | {cmp_['batch'] * 1e3 / cmp_['jax_ms']:.0f} | "
        f"{cmp_['torch_ms'] / cmp_['jax_ms']:.2f} |",
        f"| PyTorch eager ({cmp_['torch_threads']} threads) | {cmp_['torch_ms']:.1f} | "
        f"{cmp_['batch'] * 1e3 / cmp_['torch_ms']:.0f} | 1.00 |",
        "",
    ]
    text = "\n".join(header)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        (RESULTS / "train_throughput.md").write_text(text)


if __name__ == "__main__":
    main()
