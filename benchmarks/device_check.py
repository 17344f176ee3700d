"""One-shot hardware check of the Pallas kernels: correctness against XLA, speed, and the tests.

On a GPU (one command, within 8 minutes on one H200 with jax, flax, optax, orbax, chex and torch):

    python benchmarks/device_check.py --out benchmarks/results/device_<name>

1. runs the GPU-marked tests (``pytest -m gpu``; ``--skip-tests`` to leave them out);
2. compiles every kernel and checks it against the XLA reference at the benchmark geometries,
   forward and gradients (a random output cotangent), float32 and bfloat16: CCNet
   ``[8, 512, 97, 97]`` (q/k 64), NA 7x7 ``[32, 56, 56, 8 heads x 32]``, Swin-T stage 1
   ``[32, 56, 56, 3 heads x 32]`` (window 7, shift 3, bias table), ``na2d`` (NATTEN's semantics) at
   NAT-Tiny stage 1 ``[32, 56, 56, 2 heads x 32]`` (7x7, causal rows, stride (1, 2), dilation
   (1, 2), rpb and a key mask; against ``flax_attn.ops.na2d`` where it exists, else against dense
   masked attention with NATTEN's window, which then also stands in as "xla"); and the fused
   ``jax.nn.dot_product_attention`` route where an op has one;
3. times the Pallas kernel, the XLA reference, ``jax.nn.dot_product_attention`` and PyTorch on
   the same device, with the achieved bandwidth of the unavoidable HBM traffic against the
   roofline bound of the device;
4. writes ``device_check.md`` (device, jax version, date, tables) to ``--out DIR`` and lists the
   ``(op, platform)`` pairs the run proved (correct in both dtypes and faster than XLA forward and
   backward): the only candidates for :data:`flax_attn.kernels.VERIFIED`.

``--smoke`` runs the same code on a CPU in minutes: tiny shapes, kernels in interpret mode, the
tests left out. It checks the script, not the hardware; CI runs it (``make device-smoke``).
Exit status 1 when a Pallas kernel fails its correctness check.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flax_attn import ops as _ops  # noqa: E402
from flax_attn.kernels import window_attention_pallas  # noqa: E402
from flax_attn.kernels.neighborhood import na2d_pallas  # noqa: E402
from flax_attn.ops import (  # noqa: E402
    criss_cross_attention,
    neighborhood_attention,
    window_attention,
)
from flax_attn.testing.neighborhood_ref import dense_neighborhood_attention  # noqa: E402
from flax_attn.testing.timing import time_jax, time_torch  # noqa: E402

# HBM bandwidth by device kind (bytes/s), for the roofline bound; "-" for devices not listed.
BANDWIDTH = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H200": 4.8e12,
    "TPU v5 lite": 8.19e11,
    "TPU v6 lite": 1.64e12,
}

GEOMETRY = {
    # op: (full, smoke)
    "criss_cross": (dict(b=8, h=97, w=97, cqk=64, cv=512), dict(b=1, h=5, w=7, cqk=4, cv=6)),
    "neighborhood": (dict(b=32, h=56, w=56, n=8, d=32, k=7), dict(b=1, h=6, w=7, n=2, d=4, k=3)),
    "window": (dict(b=32, h=56, w=56, n=3, d=32, ws=7, shift=3), dict(b=1, h=6, w=6, n=2, d=4, ws=3, shift=1)),
    "na2d": (dict(b=32, h=56, w=56, n=2, d=32, k=7), dict(b=2, h=9, w=11, n=2, d=4, k=3)),
}

# na2d's options in the check: every feature of the kernel at once.
NA2D_OPTIONS = dict(stride=(1, 2), dilation=(1, 2), is_causal=(True, False))


def na2d_key_mask(g) -> jnp.ndarray:
    """The check's key mask: odd images padded on the right (their last quarter of columns masked)."""
    m = np.ones((g["b"], g["h"], g["w"]), bool)
    m[1::2, :, g["w"] - g["w"] // 4 :] = False
    return jnp.asarray(m)


# --------------------------------------------------------------------------- the ops and their forms


def _inputs(op, g, dtype, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    if op == "criss_cross":
        return [arr(g["b"], g["h"], g["w"], g["cqk"]), arr(g["b"], g["h"], g["w"], g["cqk"]),
                arr(g["b"], g["h"], g["w"], g["cv"])]  # fmt: skip
    x = [arr(g["b"], g["h"], g["w"], g["n"], g["d"]) for _ in range(3)]
    if op == "window":
        x.append(jnp.asarray(rng.standard_normal(((2 * g["ws"] - 1) ** 2, g["n"])), jnp.float32))
    if op == "na2d":
        x.append(jnp.asarray(rng.standard_normal((g["n"], 2 * g["k"] - 1, 2 * g["k"] - 1)), jnp.float32))
    return x


def _criss_cross_dpa(q, k, v):
    """Criss-cross as two jax.nn.dot_product_attention passes merged by their log-sum-exps."""
    b, h, w, c = q.shape
    rows = lambda x: x.reshape(b * h, w, 1, x.shape[-1])  # noqa: E731
    cols = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * w, h, 1, x.shape[-1])  # noqa: E731
    # The values are padded to the query channels' multiple when they differ (dot_product_attention
    # needs equal head dims): split v into chunks of the q/k width.
    cv = v.shape[-1]
    reps = -(-cv // c)
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, reps * c - cv)))
    outs = []
    for part in range(2):
        qq, kk = (rows(q), rows(k)) if part == 0 else (cols(q), cols(k))
        mask = None if part == 0 else ~jnp.eye(h, dtype=bool)[None, None]
        o_parts, lse = [], None
        for i in range(reps):
            vv = vp[..., i * c : (i + 1) * c]
            vv = rows(vv) if part == 0 else cols(vv)
            o, lse = jax.nn.dot_product_attention(qq, kk, vv, mask=mask, scale=1.0, return_residual=True)
            o_parts.append(o)
        outs.append((jnp.concatenate(o_parts, -1)[..., 0, :cv].astype(jnp.float32), lse[..., 0]))
    (o_r, l_r), (o_c, l_c) = outs
    o_r, l_r = o_r.reshape(b, h, w, cv), l_r.reshape(b, h, w)
    o_c, l_c = jnp.swapaxes(o_c.reshape(b, w, h, cv), 1, 2), jnp.swapaxes(l_c.reshape(b, w, h), 1, 2)
    lse = jnp.logaddexp(l_r, l_c)
    return (jnp.exp(l_r - lse)[..., None] * o_r + jnp.exp(l_c - lse)[..., None] * o_c).astype(q.dtype)


def _forms(op, g, on_gpu, dtype=None):
    """name -> function of the op's inputs. "pallas" and "xla" always; fused routes where they exist."""
    if op == "criss_cross":
        forms = {
            "pallas": lambda q, k, v: criss_cross_attention(q, k, v, implementation="pallas"),
            "xla": lambda q, k, v: criss_cross_attention(q, k, v, implementation="xla"),
            # Forward only: in this jax, the log-sum-exp that dot_product_attention returns carries
            # no gradient, so the merge cannot be differentiated through it.
            "jax.nn.dot_product_attention row + column, lse merge (fwd only)": _criss_cross_dpa,
        }
    elif op == "neighborhood":
        kw = dict(kernel_size=g["k"])

        def dense(q, k, v):
            b, h, w, n, d = q.shape
            flat = lambda x: x.reshape(b, h * w, n, d)  # noqa: E731
            return jax.nn.dot_product_attention(flat(q), flat(k), flat(v)).reshape(q.shape)

        forms = {
            "pallas": lambda q, k, v: neighborhood_attention(q, k, v, implementation="pallas", **kw),
            "xla": lambda q, k, v: neighborhood_attention(q, k, v, implementation="xla", **kw),
            "jax.nn.dot_product_attention dense (yardstick, not NA)": dense,
        }
    elif op == "na2d":
        kw = dict(kernel_size=g["k"], **NA2D_OPTIONS)
        mask = na2d_key_mask(g)

        def dense(q, k, v, rpb):
            return dense_neighborhood_attention(q, k, v, **kw, rpb=rpb, key_mask=mask).astype(q.dtype)

        forms = {"pallas": lambda q, k, v, rpb: na2d_pallas(q, k, v, rpb=rpb, key_mask=mask, **kw)}
        if hasattr(_ops, "na2d"):  # issue 13's XLA op
            forms["xla"] = lambda q, k, v, rpb: _ops.na2d(q, k, v, rpb=rpb, key_mask=mask, **kw)
            forms["dense masked attention (XLA, same mask)"] = dense
        else:
            forms["xla"] = dense
    else:
        kw = dict(window_size=g["ws"], shift_size=g["shift"])
        forms = {
            "pallas": lambda q, k, v, t: window_attention(q, k, v, bias_table=t, implementation="pallas", **kw),
            "xla": lambda q, k, v, t: window_attention(q, k, v, bias_table=t, implementation="xla", **kw),
        }
        if on_gpu:
            forms["jax.nn.dot_product_attention cudnn"] = lambda q, k, v, t: window_attention(
                q, k, v, bias_table=t, implementation="cudnn", **kw
            )
            if jnp.dtype(dtype) == jnp.bfloat16:  # the Mosaic GPU port takes 16-bit operands only
                forms["pallas mosaic_gpu (port; XLA backward)"] = lambda q, k, v, t: window_attention_pallas(
                    q, k, v, bias_table=t, backend="mosaic_gpu", **kw
                )
    return forms


def _torch_form(op, g, dtype_name, device):
    """(name, forward closure over fresh torch inputs) or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen).to(device, dt).requires_grad_()  # noqa: E731
    if op == "criss_cross":  # CCNet's pure-PyTorch cc.py form, NCHW
        b, h, w = g["b"], g["h"], g["w"]
        q, k, v = rand(b, g["cqk"], h, w), rand(b, g["cqk"], h, w), rand(b, g["cv"], h, w)
        eye = torch.eye(h, dtype=torch.bool, device=device)[:, None, :]

        def fwd():
            e_h = torch.einsum("bcyx,bcjx->byxj", q, k).float().masked_fill(eye, float("-inf"))
            e_w = torch.einsum("bcyx,bcyi->byxi", q, k).float()
            att = torch.softmax(torch.cat([e_h, e_w], 3), 3).to(dt)
            return torch.einsum("byxj,bcjx->bcyx", att[..., :h], v) + torch.einsum("byxi,bcyi->bcyx", att[..., h:], v)

        return "torch (CCNet cc.py form)", fwd
    if op == "na2d":  # natten.na2d (no rpb, no mask: NATTEN has neither), where natten is installed
        try:
            import natten
        except ImportError:
            return None
        q, k, v = (rand(g["b"], g["h"], g["w"], g["n"], g["d"]) for _ in range(3))
        kw = dict(kernel_size=g["k"], **NA2D_OPTIONS)
        return "natten.na2d (no rpb, no mask)", lambda: natten.na2d(q, k, v, **kw)
    if op == "neighborhood":  # ACmix's reflection pad + unfold form, (B * heads, D, H, W)
        bn, d, h, w, ks = g["b"] * g["n"], g["d"], g["h"], g["w"], g["k"]
        q, k, v = (rand(bn, d, h, w) for _ in range(3))
        pad, unfold = torch.nn.ReflectionPad2d(ks // 2), torch.nn.Unfold(ks)

        def fwd():
            uk = unfold(pad(k)).view(bn, d, ks * ks, h, w)
            uv = unfold(pad(v)).view(bn, d, ks * ks, h, w)
            att = torch.softmax((q.unsqueeze(2) * d**-0.5 * uk).sum(1), dim=1)
            return (att.unsqueeze(1) * uv).sum(2)

        return "torch (ACmix unfold form)", fwd
    # Swin: windows are pre-partitioned (the roll and partition are data movement both sides do).
    nw = g["b"] * (g["h"] // g["ws"]) * (g["w"] // g["ws"])
    n = g["ws"] ** 2
    q, k, v = (rand(nw, g["n"], n, g["d"]) for _ in range(3))
    bias = torch.randn(nw, g["n"], n, n, generator=gen).to(device, dt)

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    return "torch SDPA per window (float mask)", fwd


# --------------------------------------------------------------------------- measuring


def _vjp_fn(fn):
    def run(args, ct):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct.astype(out.dtype))

    return jax.jit(run)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(1e-6, float(np.max(np.abs(want)))))


def _min_bytes(args, out_nbytes, backward) -> int:
    """Unavoidable HBM traffic: read the inputs, write the output; backward also reads the output
    and its cotangent and writes one gradient per input."""
    inputs = sum(x.nbytes for x in args)
    return inputs + out_nbytes if not backward else 2 * inputs + 3 * out_nbytes


def check_op(op, g, dtype, on_gpu, smoke, reps):
    dtype_name = jnp.dtype(dtype).name
    args = _inputs(op, g, dtype)
    forms = _forms(op, g, on_gpu, dtype)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(forms["xla"](*args).shape), jnp.float32)
    f32 = [a.astype(jnp.float32) for a in args]
    with jax.default_matmul_precision("highest"):
        ref_out, ref_grads = _vjp_fn(forms["xla"])(f32, ct)
    # float32 on the device runs matmuls at the default precision (TF32 on GPU, bf16 passes on TPU).
    tol = 5e-2 if dtype_name == "bfloat16" else (1e-4 if smoke else 2e-2)
    correctness, timings = [], []
    for name, fn in forms.items():
        if name == "xla" or "yardstick" in name:
            continue
        try:
            if "fwd only" in name:
                errs = [_rel_err(jax.jit(fn)(*args), ref_out)]
            else:
                out, grads = _vjp_fn(fn)(args, ct)
                errs = [_rel_err(out, ref_out)] + [_rel_err(a, b) for a, b in zip(grads, ref_grads)]
            correctness.append(dict(op=op, form=name, dtype=dtype_name, errs=errs, tol=tol, ok=max(errs) <= tol))
        except Exception as e:  # a form that does not run is a failed check, with the reason
            correctness.append(dict(op=op, form=name, dtype=dtype_name, errs=None, tol=tol, ok=False, error=str(e)))
    out_nbytes = ref_out.size * jnp.dtype(dtype).itemsize
    for name, fn in forms.items():
        row = dict(op=op, form=name, dtype=dtype_name)
        try:
            fwd = jax.jit(fn)
            fb = _vjp_fn(fn)
            row["fwd"] = time_jax(fwd, *args, repeats=reps)
            if "fwd only" not in name:
                row["fwd_bwd"] = time_jax(fb, args, ct, repeats=reps)
        except Exception as e:
            row["error"] = " ".join(str(e).split())[:160]
        row["bytes_fwd"] = _min_bytes(args, out_nbytes, False)
        row["bytes_fwd_bwd"] = _min_bytes(args, out_nbytes, True)
        timings.append(row)
    torch_form = _torch_form(op, g, dtype_name, "cuda" if on_gpu else "cpu")
    if torch_form is not None:
        name, fwd = torch_form
        row = dict(op=op, form=name, dtype=dtype_name, bytes_fwd=timings[0]["bytes_fwd"],
                   bytes_fwd_bwd=timings[0]["bytes_fwd_bwd"])  # fmt: skip
        try:
            import torch

            with torch.no_grad():
                row["fwd"] = time_torch(fwd, repeats=reps, device="cuda" if on_gpu else "cpu")
            row["fwd_bwd"] = time_torch(
                lambda: fwd().float().sum().backward(), repeats=reps, device="cuda" if on_gpu else "cpu"
            )
        except Exception as e:
            row["error"] = " ".join(str(e).split())[:160]
        timings.append(row)
    return correctness, timings


def run_gpu_tests(timeout_s=180) -> str:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s} s"
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith("FAILED")]
    return "; ".join(failed + lines[-1:]) if lines else f"pytest exited {res.returncode}: {res.stderr[-300:]}"


# --------------------------------------------------------------------------- report


def _us(t):
    return "-" if t is None else f"{t * 1e6:,.0f}"


def report(device, platform, smoke, tests, correctness, timings, proved) -> str:
    bw = BANDWIDTH.get(device)
    lines = [
        f"# Device check: {device}",
        "",
        f"platform {platform}, jax {jax.__version__}, {datetime.date.today().isoformat()}, "
        f"`benchmarks/device_check.py{' --smoke' if smoke else ''}`"
        + (" (smoke: tiny shapes, kernels interpreted on CPU; says nothing about hardware)" if smoke else ""),
        "",
        f"GPU-marked tests: {tests}",
        "",
        "## Correctness against the XLA reference (float32, highest precision)",
        "",
        "Relative error = max |got - ref| / max |ref|, for the output and each input gradient.",
        "",
        "| op | form | dtype | out | grads | tol | result |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for c in correctness:
        if c["errs"] is None:
            lines.append(f"| {c['op']} | {c['form']} | {c['dtype']} | | | {c['tol']:g} | **error**: "
                         f"{' '.join(c['error'].split())[:160].replace('|', '/')} |")  # fmt: skip
            continue
        grads = ", ".join(f"{e:.1e}" for e in c["errs"][1:]) or "- (forward only)"
        result = "pass" if c["ok"] else "**FAIL**"
        lines.append(
            f"| {c['op']} | {c['form']} | {c['dtype']} | {c['errs'][0]:.1e} | {grads} | {c['tol']:g} | {result} |"
        )
    lines += [
        "",
        "## Timings (median) and achieved bandwidth",
        "",
        "Bytes: the unavoidable HBM traffic (forward: read the inputs, write the output; forward+backward: "
        "also read the output and its cotangent, write the input gradients). "
        + (
            f"Roofline: those bytes at {bw / 1e12:.2f} TB/s."
            if bw
            else "No bandwidth figure for this device: no roofline."
        ),
        "",
        "| op | form | dtype | fwd us | fwd+bwd us | fwd GB/s | fwd+bwd GB/s | fwd roof | fwd+bwd roof | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in timings:
        f, fb = t.get("fwd"), t.get("fwd_bwd")
        gbs = lambda b, s: "-" if s is None else f"{b / s / 1e9:,.1f}"  # noqa: E731
        roof = lambda b, s: "-" if s is None or not bw else f"{b / bw / s:.2f}"  # noqa: E731
        lines.append(
            f"| {t['op']} | {t['form']} | {t['dtype']} | {_us(f)} | {_us(fb)} | {gbs(t['bytes_fwd'], f)} | "
            f"{gbs(t['bytes_fwd_bwd'], fb)} | {roof(t['bytes_fwd'], f)} | {roof(t['bytes_fwd_bwd'], fb)} | "
            f"{t.get('error', '').replace('|', '/')} |"
        )
    lines += ["", "## What this run proved (candidates for `flax_attn.kernels.VERIFIED`)", ""]
    if smoke:
        lines.append("Nothing: a smoke run interprets the kernels on a CPU.")
    elif not proved:
        lines.append("Nothing: no kernel was both correct in float32 and bfloat16 and faster than XLA here.")
    for op in proved:
        lines.append(f"- `({op!r}, {platform!r})`: VerifiedRecord(device={device!r}, jax_version={jax.__version__!r}, "
                     f"date={datetime.date.today().isoformat()!r})")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for device_check.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode: runs on a CPU")
    p.add_argument("--skip-tests", action="store_true", help="do not run the GPU-marked tests")
    p.add_argument("--ops", default="criss_cross,neighborhood,window,na2d", help="comma-separated subset")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20, smoke 1)")
    args = p.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in ops if o not in GEOMETRY]
    if bad:
        p.error(f"--ops: unknown {bad}; expected a subset of {sorted(GEOMETRY)}")
    platform = jax.default_backend()
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if platform == "cpu" and not args.smoke:
        p.error("no GPU or TPU here: the full check needs one (use --smoke on a CPU)")
    device = jax.devices()[0].device_kind
    on_gpu = platform == "gpu"
    reps = args.reps or (1 if args.smoke else 20)
    tests = "skipped" if (args.smoke or args.skip_tests) else run_gpu_tests()
    correctness, timings = [], []
    for op in ops:
        g = GEOMETRY[op][1 if args.smoke else 0]
        for dtype in (jnp.float32, jnp.bfloat16):
            c, t = check_op(op, g, dtype, on_gpu, args.smoke, reps)
            correctness += c
            timings += t
            print(f"{op:13} {jnp.dtype(dtype).name:9} " + ", ".join(
                f"{r['form'][:24]}: {'pass' if r['ok'] else 'FAIL'}" for r in c), flush=True)  # fmt: skip
    proved = []
    for op in ops:
        ok = all(c["ok"] for c in correctness if c["op"] == op and c["form"] == "pallas")
        faster = all(
            all((pal.get(k) or np.inf) < (xla.get(k) or 0) for k in ("fwd", "fwd_bwd"))
            for pal in timings if pal["op"] == op and pal["form"] == "pallas"
            for xla in timings if xla["op"] == op and xla["form"] == "xla" and xla["dtype"] == pal["dtype"]
        )  # fmt: skip
        # na2d proves nothing against its dense stand-in: only against the library's XLA op.
        if ok and faster and not args.smoke and (op != "na2d" or hasattr(_ops, "na2d")):
            proved.append(op)
    text = report(device, platform, args.smoke, tests, correctness, timings, proved)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.md").write_text(text)
    print(text)
    # The kernels decide the exit status; the fused routes' rows are information (cuDNN refuses
    # some shapes, e.g. head dims it does not support).
    return 0 if all(c["ok"] for c in correctness if c["form"].startswith("pallas")) else 1


if __name__ == "__main__":
    sys.exit(main())
