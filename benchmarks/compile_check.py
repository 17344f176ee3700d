"""Compile every Pallas kernel for GPU and TPU on a machine that has neither (deviceless AOT).

Each kernel, forward and forward+backward, float32 and bfloat16, at its benchmark geometry, is
lowered and compiled for compile-only devices: an H100 (XLA's GPU compiler, Triton and ptxas for
sm_90, from the CUDA plugin and a target spec) and TPU v5e / v6e (the Mosaic compiler in libtpu,
from ``jax.experimental.topologies``). It prints, and with ``--out DIR`` writes
``DIR/compile_<target>.md``, one row per case: whether it compiled, the compiled memory analysis
(argument, output, temporary bytes) and XLA's cost analysis where the target gives one (flops,
bytes accessed), or the compiler's error.

Compiling proves the compilers accept the kernels; it says nothing about numerics or speed, so it
never feeds :data:`flax_attn.kernels.VERIFIED` (``benchmarks/device_check.py`` does, on hardware).

Needs a separate environment (``make compile-check`` builds it): ``jax[cuda12]`` for the GPU
targets (several GB; no GPU needed) and ``libtpu`` (the version ``jax[tpu]`` pins) for the TPU ones.
Run with ``JAX_PLATFORMS=cpu``: the CUDA plugin must not try to open a device.

    JAX_PLATFORMS=cpu python benchmarks/compile_check.py --targets h100,v5e,v6e --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from flax_attn.kernels import (  # noqa: E402
    criss_cross_attention_pallas,
    neighborhood_attention_pallas,
    window_attention_pallas,
)
from flax_attn.kernels.neighborhood import na2d_pallas  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPU_SPEC = Path(os.environ.get("FLAX_ATTN_GPU_SPEC", ROOT / "benchmarks" / "gpu_specs" / "h100_min.txtpb"))

# target -> (kind of topology, Pallas backend)
TARGETS = {"h100": ("cuda", "triton"), "v5e": ("tpu", "mosaic_tpu"), "v6e": ("tpu", "mosaic_tpu")}

# The benchmark geometries (benchmarks/kernels_*.py): name -> (input shapes, kernel call).
CCNET = (8, 97, 97)  # CCNet at 769 px: q/k 64 channels (in_dim // 8), v 512
NA = (32, 56, 56, 8, 32)  # 7x7 neighbourhood, 8 heads x 32
SWIN_T1 = (32, 56, 56, 3, 32)  # Swin-T stage 1: window 7, shift 3, bias table (169, 3)


def _cases(backend: str):
    def cc(q, k, v):
        return criss_cross_attention_pallas(q, k, v, backend=backend, interpret=False)

    def na(q, k, v):
        return neighborhood_attention_pallas(q, k, v, kernel_size=7, backend=backend, interpret=False)

    def swin(q, k, v, table):
        return window_attention_pallas(
            q, k, v, window_size=7, shift_size=3, bias_table=table, backend=backend, interpret=False
        )

    both = (jnp.float32, jnp.bfloat16)
    table = [((169, 3), jnp.float32)]  # the Swin bias table is a float32 parameter whatever the activations' dtype
    yield "criss_cross [8, 97, 97] q/k 64, v 512", cc, [(*CCNET, 64), (*CCNET, 64), (*CCNET, 512)], [], both
    yield "neighborhood 7x7 [32, 56, 56, 8x32]", na, [NA] * 3, [], both
    # na2d (NATTEN's semantics): one option at a time, then all of them; rpb (heads, 13, 13) float32,
    # key mask (batch, 56, 56) bool (not differentiated).
    rpb, mask = ((NA[3], 13, 13), jnp.float32), (NA[:3], jnp.bool_)
    for label, kw, extras in (
        ("causal (T, T)", dict(is_causal=(True, True)), []),
        ("stride 2 dilation 2", dict(stride=2, dilation=2), []),
        ("rpb + key mask", dict(), [rpb, mask]),
        (
            "all: causal rows, stride (1, 2), dilation (1, 2), rpb, mask",
            dict(stride=(1, 2), dilation=(1, 2), is_causal=(True, False)),
            [rpb, mask],
        ),
    ):

        def na2d(q, k, v, *extra, kw=kw):
            more = dict(zip(("rpb", "key_mask"), extra))
            return na2d_pallas(q, k, v, kernel_size=7, **kw, **more, backend=backend, interpret=False)

        yield f"na2d 7x7 {label} [32, 56, 56, 8x32]", na2d, [NA] * 3, extras, both
    yield "window Swin-T st.1 [32, 56, 56, 3x32]", swin, [SWIN_T1] * 3, table, both
    if backend == "triton":
        # The Mosaic GPU port (forward kernel; 16-bit operands only, so bfloat16 alone).
        def swin_mgpu(q, k, v, table):
            return window_attention_pallas(q, k, v, window_size=7, shift_size=3, bias_table=table, backend="mosaic_gpu")

        yield "window mosaic_gpu Swin-T st.1 [32, 56, 56, 3x32]", swin_mgpu, [SWIN_T1] * 3, table, (jnp.bfloat16,)


def _devices(target: str):
    kind, _ = TARGETS[target]
    if kind == "cuda":
        topo = topologies.get_topology_desc(platform="cuda", target_config=GPU_SPEC.read_text(), topology="1x1x1")
    else:
        topo = topologies.get_topology_desc(f"{target}:2x2", "tpu")
    return topo.devices


def _compile(fn, shapes, dtype, extras, sharding, grad: bool):
    """``shapes``: activations in ``dtype``; ``extras``: ``(shape, dtype)`` of further operands in their
    own dtype (bias tables, masks); the backward differentiates every floating operand."""
    args = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
    args += [jax.ShapeDtypeStruct(s, dt, sharding=sharding) for s, dt in extras]
    if grad:
        argnums = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))

        def f(*a):
            return jax.grad(lambda *b: jnp.sum(fn(*b).astype(jnp.float32)), argnums=argnums)(*a)
    else:
        f = fn
    return jax.jit(f).lower(*args).compile()


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def run(target: str, only=()):
    devices = _devices(target)
    sharding = NamedSharding(Mesh(devices[:1], ("x",)), PartitionSpec())
    rows = []
    for name, fn, shapes, extra, dtypes in _cases(TARGETS[target][1]):
        if only and not name.startswith(tuple(only)):
            continue
        for dtype in dtypes:
            for grad in (False, True):
                case = dict(kernel=name, dtype=jnp.dtype(dtype).name, pass_="fwd+bwd" if grad else "fwd")
                try:
                    compiled = _compile(fn, shapes, dtype, extra, sharding, grad)
                except Exception as e:  # the compiler's verdict is the result
                    msg = " ".join(str(e).split())
                    case.update(ok=False, error=msg[:300])
                    traceback.print_exc(limit=0, file=sys.stderr)
                else:
                    mem = compiled.memory_analysis()
                    cost = compiled.cost_analysis()
                    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
                    case.update(
                        ok=True,
                        arg=getattr(mem, "argument_size_in_bytes", None),
                        out=getattr(mem, "output_size_in_bytes", None),
                        temp=getattr(mem, "temp_size_in_bytes", None),
                        flops=(cost or {}).get("flops"),
                        bytes=(cost or {}).get("bytes accessed"),
                    )
                rows.append(case)
                status = "ok" if case["ok"] else "FAILED"
                print(f"{target:5} {name:50} {case['dtype']:9} {case['pass_']:8} {status}", flush=True)
    return devices[0].device_kind, rows


def to_markdown(target: str, device_kind: str, rows) -> str:
    lines = [
        f"# Deviceless compile: {target} ({device_kind})",
        "",
        f"jax {jax.__version__}, {datetime.date.today().isoformat()}, compiled on a CPU-only machine with "
        f"`benchmarks/compile_check.py` (backend {TARGETS[target][1]}). Compiling proves the compiler accepts "
        "the kernel; it verifies neither numerics nor speed. Memory in MiB from `compiled.memory_analysis()`; "
        "flops and bytes from `compiled.cost_analysis()`, '-' where the target reports none: XLA's "
        "estimate, each Pallas call counted as its declared `cost_estimate` (the work its kernel does, "
        "padded and masked work included).",
        "",
        "| kernel | dtype | pass | compiles | args MiB | out MiB | temp MiB | GFLOP | GB accessed | error |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["ok"]:
            gflop = "-" if r["flops"] is None else f"{r['flops'] / 1e9:.2f}"
            gb = "-" if r["bytes"] is None else f"{r['bytes'] / 1e9:.3f}"
            cells = ["yes", _fmt_bytes(r["arg"]), _fmt_bytes(r["out"]), _fmt_bytes(r["temp"]), gflop, gb, ""]
        else:
            cells = ["**no**", "", "", "", "", "", r["error"].replace("|", "/")]
        lines.append("| " + " | ".join([r["kernel"], r["dtype"], r["pass_"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="h100,v5e,v6e", help=f"comma-separated subset of {sorted(TARGETS)}")
    p.add_argument("--out", type=Path, help="write compile_<target>.md tables here")
    p.add_argument("--kernels", default="", help="only kernels whose name starts with one of these (comma-separated)")
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        p.error(f"--targets: unknown {bad}; expected a subset of {sorted(TARGETS)}")
    failed = 0
    for target in targets:
        device_kind, rows = run(target, [k for k in args.kernels.split(",") if k])
        failed += sum(not r["ok"] for r in rows)
        text = to_markdown(target, device_kind, rows)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"compile_{target}.md").write_text(text)
        print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
