# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Kernels: memory and speed of the attention ops
#
# The structured attentions in `flax_attn.ops` (criss-cross, neighbourhood) each have a pure-XLA
# reference, which is the ground truth, and a fused Pallas kernel for GPU/TPU chosen with
# `implementation=`. This notebook plots
#
# 1. the benchmark tables saved in `benchmarks/results/` (whatever has been recorded there);
# 2. XLA's *compiled* peak memory of the references against dense attention across image sizes,
#    computed live with `jax.jit(f).lower(...).compile().memory_analysis()`: compilation only,
#    nothing runs, so it works on any machine;
# 3. a small live CPU timing of criss-cross against dense attention;
# 4. the bandwidth roofline that GPU timings are judged against.
#
# **GPU timings are absent.** The live measurements run on whatever backend executes the notebook
# (a CPU in CI); GPU numbers can only come from GPU tables in `benchmarks/results/` (the cell
# below lists what it finds), and when this notebook was written none had been recorded because
# no GPU was available. The GPU side is therefore limited to the analytical roofline of section 4.

# %%
# %matplotlib inline
import os
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import flax_attn
from flax_attn.ops import criss_cross_attention, neighborhood_attention

FIG_DIR = os.environ.get("FLAX_ATTN_FIG_DIR", tempfile.mkdtemp())
os.makedirs(FIG_DIR, exist_ok=True)
RESULTS = Path(flax_attn.__file__).resolve().parents[1] / "benchmarks" / "results"
print("backend:", jax.default_backend(), jax.devices()[0].device_kind)

# %% [markdown]
# ## 1. Recorded benchmark tables
#
# `benchmarks/run.py --out benchmarks/results/NAME.md` writes one markdown table per run: JAX
# (jit) against PyTorch eager for every catalogued block, with the device in the first line.
# We read every table there and plot the speed ratios (PyTorch time / JAX time; above 1, JAX is
# faster).


# %%
def read_tables(path):
    """Markdown tables in a file -> (environment line, [list of row dicts])."""
    env, tables, rows, head = "", [], None, None
    for line in path.read_text().splitlines():
        if line.startswith("date ") or "device" in line and not line.startswith("|"):
            env = env or line.strip()
        if not line.startswith("|"):
            if rows:
                tables.append(rows)
            rows, head = None, None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if head is None:
            head, rows = cells, []
        elif not set("".join(cells)) <= set("-: "):
            rows.append(dict(zip(head, cells)))
    if rows:
        tables.append(rows)
    return env, tables


def as_float(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return np.nan


files = sorted(RESULTS.glob("*.md")) if RESULTS.exists() else []
block_tables, gpu_files = [], []
for f in files:
    env, tables = read_tables(f)
    is_gpu = bool(re.search(r"gpu|cuda|H100|H200|A100|tpu", env + f.name, re.I))
    gpu_files += [f.name] if is_gpu else []
    print(f"{f.name}: {len(tables)} table(s); {env or 'no environment line'}")
    block_tables += [(f"{f.name}: {env[:90]}", t) for t in tables if t and "torch/JAX fwd" in t[0]]
print(f"{len(files)} result file(s); GPU tables: {gpu_files or 'none: GPU timings are absent'}")

# %%
if block_tables:
    fig, axes = plt.subplots(
        len(block_tables), 1, figsize=(10, 0.32 * sum(len(t) for _, t in block_tables) + 1.5), squeeze=False
    )
    for ax, (name, rows) in zip(axes[:, 0], block_tables):
        rows = [r for r in rows if not np.isnan(as_float(r.get("torch/JAX fwd")))]
        y = np.arange(len(rows))
        ax.barh(y - 0.2, [as_float(r["torch/JAX fwd"]) for r in rows], 0.4, label="forward (eval)")
        ax.barh(y + 0.2, [as_float(r.get("torch/JAX fwd+bwd")) for r in rows], 0.4, label="forward + backward")
        ax.set_yticks(y, [next(iter(r.values())) for r in rows], fontsize=8)  # "block" or "op" column
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("PyTorch time / JAX time (> 1: JAX faster)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(FIG_DIR, "recorded_block_speed.png"), dpi=70)
else:
    print(
        "No block tables in benchmarks/results/ yet: run `python benchmarks/run.py --out "
        "benchmarks/results/cpu.md` (and the same on a GPU) to fill this section."
    )

# %% [markdown]
# ## 2. Compiled peak memory against image size (live, compile only)
#
# CCNet's point is that criss-cross attention needs `H + W - 1` weights per pixel where a
# non-local (dense) block needs `H W`. The XLA reference keeps that promise: it builds row and
# column logits separately and never forms an `(H W) x (H W)` matrix. Below, `memory_analysis()`
# reports arguments + outputs + temporaries of the compiled program, for the forward pass and
# for forward + backward (gradients of `sum(out)` with respect to q, k, v), batch 1, 8 query/key
# channels, 64 value channels, float32. The dashed line is the size of the dense energy matrix
# alone.


# %%
def size_axes(ax, sizes, ylabel, title, legend_fontsize=8):
    """Log-log axes of a quantity against the image side H = W, ticked at the sizes measured."""
    ax.set(xscale="log", yscale="log", xlabel="H = W", ylabel=ylabel, title=title)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xticks([], minor=True)  # log axes otherwise label minor ticks over the sizes
    ax.legend(fontsize=legend_fontsize)


def compiled_mib(fn, *shapes):
    mem = jax.jit(fn).lower(*shapes).compile().memory_analysis()
    if mem is None:  # some backends do not report it
        return np.nan
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return total / 2**20


def grad_of(fn):
    return jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))


def dense_attention(q, k, v):
    """softmax(q k^T) v over all H*W positions (a non-local block's attention, no scaling)."""
    b, h, w, c = q.shape
    s = jnp.einsum("bnc,bmc->bnm", q.reshape(b, h * w, c), k.reshape(b, h * w, c))
    return jnp.einsum("bnm,bmc->bnc", jax.nn.softmax(s, -1), v.reshape(b, h * w, -1)).reshape(b, h, w, -1)


def criss_cross(q, k, v):
    return criss_cross_attention(q, k, v, implementation="xla")


SIZES = [16, 32, 64, 97]
CQK, CV = 8, 64
mem = {name: {"fwd": [], "fwd+bwd": []} for name in ("criss-cross (XLA)", "dense")}
for s in SIZES:
    qk = jax.ShapeDtypeStruct((1, s, s, CQK), jnp.float32)
    v = jax.ShapeDtypeStruct((1, s, s, CV), jnp.float32)
    for name, fn in (("criss-cross (XLA)", criss_cross), ("dense", dense_attention)):
        mem[name]["fwd"].append(compiled_mib(fn, qk, qk, v))
        mem[name]["fwd+bwd"].append(compiled_mib(grad_of(fn), qk, qk, v))
energy = [s**4 * 4 / 2**20 for s in SIZES]

print(f"{'H = W':>6} " + " ".join(f"{n + ' ' + p:>26}" for n in mem for p in ("fwd", "fwd+bwd")))
for i, s in enumerate(SIZES):
    print(f"{s:>6} " + " ".join(f"{mem[n][p][i]:>22.2f} MiB" for n in mem for p in ("fwd", "fwd+bwd")))

# %% [markdown]
# The same question for ACmix's local window: the neighbourhood-attention reference gathers one
# window row of keys at a time, while ACmix's own PyTorch formulation unfolds all `k^2 = 49`
# shifted copies of keys and values at once (written here in JAX), and dense attention is the
# yardstick. 4 heads of 16 channels, window 7, reflection border.


# %%
def unfold_form(q, k, v, ks=7):
    p = ks // 2
    h, w = q.shape[1:3]
    pad = lambda x: jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0), (0, 0)), mode="reflect")  # noqa: E731
    kp, vp = pad(k), pad(v)
    ku = jnp.stack([kp[:, i : i + h, j : j + w] for i in range(ks) for j in range(ks)], axis=-2)  # (B,H,W,n,k2,D)
    vu = jnp.stack([vp[:, i : i + h, j : j + w] for i in range(ks) for j in range(ks)], axis=-2)
    att = jax.nn.softmax(jnp.einsum("bhwnd,bhwnkd->bhwnk", q, ku) * q.shape[-1] ** -0.5, -1)
    return jnp.einsum("bhwnk,bhwnkd->bhwnd", att, vu)


def neighbourhood(q, k, v):
    return neighborhood_attention(q, k, v, kernel_size=7, implementation="xla")


def dense_heads(q, k, v):
    b, h, w, n, d = q.shape
    flat = lambda x: x.reshape(b, h * w, n, d)  # noqa: E731
    return jax.nn.dot_product_attention(flat(q), flat(k), flat(v)).reshape(q.shape)


NA_SIZES = [16, 32, 56]
na_mem = {name: [] for name in ("neighbourhood (XLA)", "ACmix unfold (JAX)", "dense")}
for s in NA_SIZES:
    x = jax.ShapeDtypeStruct((1, s, s, 4, 16), jnp.float32)
    for name, fn in zip(na_mem, (neighbourhood, unfold_form, dense_heads)):
        na_mem[name].append(compiled_mib(grad_of(fn), x, x, x))
for name, vals in na_mem.items():
    print(f"{name:<22}" + "".join(f"{s:>4}x{s:<3}{m:9.2f} MiB  " for s, m in zip(NA_SIZES, vals)))

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
for (name, passes), colour in zip(mem.items(), ("tab:blue", "tab:red")):
    axes[0].plot(SIZES, passes["fwd"], "o-", color=colour, label=f"{name}, forward")
    axes[0].plot(SIZES, passes["fwd+bwd"], "s--", color=colour, alpha=0.6, label=f"{name}, fwd + bwd")
axes[0].plot(SIZES, energy, "k:", label="dense energy (HW)^2 alone")
size_axes(axes[0], SIZES, "compiled peak MiB", "criss-cross vs dense attention (B=1, C=64, float32)")
for (name, vals), colour in zip(na_mem.items(), ("tab:green", "tab:orange", "tab:red")):
    axes[1].plot(NA_SIZES, vals, "o-", color=colour, label=name)
size_axes(axes[1], NA_SIZES, "compiled peak MiB (fwd + bwd)", "7x7 neighbourhood attention (4 heads x 16)")
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "compiled_memory_vs_size.png"), dpi=70)
ratio = mem["dense"]["fwd+bwd"][-1] / mem["criss-cross (XLA)"]["fwd+bwd"][-1]
print(f"at {SIZES[-1]}x{SIZES[-1]}: dense forward + backward needs {ratio:.0f}x the memory of criss-cross")

# %% [markdown]
# Left: for training (forward + backward, dashed) the dense block must keep its `(H W)^2`
# probabilities for the backward pass, and its memory follows the dotted energy line (slope 4 on
# the log-log plot); criss-cross grows between `H W` (the 64-channel inputs and outputs, which
# dominate at these sizes) and `H W (H + W)`, so the gap widens with the image, to well over an
# order of magnitude at CCNet's 97 x 97 maps. The dense *forward* pass is a caveat worth seeing:
# from 64 x 64 on, XLA's CPU compiler fuses its softmax and second matmul and never stores the
# energy matrix (at a large cost in time, section 3), so inference memory alone would not show
# the difference. Right: ACmix's unfold form pays for 49 copies of keys and values, several times
# the reference at every size; dense attention grows quadratically and passes it at about
# 32 x 32. These are CPU compilations: a GPU compiler fuses differently, so GPU numbers will
# differ in detail.

# %% [markdown]
# ## 3. Time against size on this CPU (live, noisy)
#
# Median of 5 runs of the jitted forward pass, batch 1, same shapes as above. This is whatever
# CPU executes the notebook (in CI a small shared runner), so only the trend means anything.


# %%
def median_ms(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


T_SIZES = [16, 32, 48, 64]
times = {"criss-cross (XLA)": [], "dense": []}
key = jax.random.PRNGKey(0)
for s in T_SIZES:
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, s), 3)
    q, k = jax.random.normal(kq, (1, s, s, CQK)), jax.random.normal(kk, (1, s, s, CQK))
    v = jax.random.normal(kv, (1, s, s, CV))
    for name, fn in (("criss-cross (XLA)", criss_cross), ("dense", dense_attention)):
        times[name].append(median_ms(jax.jit(fn), q, k, v))
for name, ts in times.items():
    print(f"{name:<20}" + "".join(f"{s:>4}: {t:8.2f} ms" for s, t in zip(T_SIZES, ts)))

fig, ax = plt.subplots(figsize=(6.5, 4))
for (name, ts), colour in zip(times.items(), ("tab:blue", "tab:red")):
    ax.plot(T_SIZES, ts, "o-", color=colour, label=name)
platform = jax.devices()[0].platform.upper()
size_axes(ax, T_SIZES, "median ms (forward, jit)", f"this machine's {platform}, batch 1, C = 64 (noisy)", None)
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "cpu_time_vs_size.png"), dpi=70)

# %% [markdown]
# ## 4. The roofline GPU timings are judged against
#
# On a GPU these ops are memory-bound: the fused kernel should read q, k, v once and write the
# output once (the backward pass also reads the output gradient and writes dq, dk, dv).
# `benchmarks/kernels_criss_cross.py` reports achieved bandwidth as a fraction of that lower
# bound at H100 HBM bandwidth (3.35 TB/s). The curve below is that bound, computed, not measured,
# for CCNet's shapes (batch 8, 64 q/k channels, 512 value channels, bfloat16): a GPU table, once
# recorded, is placed against it.

# %%
HBM = 3.35e12
B, CQK_G, CV_G, ITEM = 8, 64, 512, 2
sizes = np.array([32, 48, 64, 97, 128])
fwd_bytes = B * sizes**2 * (2 * CQK_G + 2 * CV_G) * ITEM
bwd_bytes = fwd_bytes + B * sizes**2 * (3 * CV_G + 2 * CQK_G) * ITEM
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.plot(sizes, fwd_bytes / HBM * 1e6, "o-", label="forward: read q, k, v, write out")
ax.plot(sizes, bwd_bytes / HBM * 1e6, "s-", label="fwd + bwd: also dO, out, dq, dk, dv")
gpu_note = "measured GPU points: none recorded" if not gpu_files else f"see {', '.join(gpu_files)}"
size_axes(ax, sizes, "lower bound, microseconds", f"criss-cross H100 roofline (bf16, B=8, C=512)\n{gpu_note}")
fig.tight_layout()
fig.savefig(os.path.join(FIG_DIR, "roofline_bound.png"), dpi=70)
print(f"97 x 97: forward bound {fwd_bytes[3] / HBM * 1e6:.0f} us, fwd + bwd bound {bwd_bytes[3] / HBM * 1e6:.0f} us")
