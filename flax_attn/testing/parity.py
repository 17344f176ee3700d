"""The shared parity check: a PyTorch reference and its Flax port, same weights, same inputs.

``check_parity(entry)`` builds the reference from the catalogue with random weights (including the
parameters the reference initialises to constants, like a zero ``gamma`` or a zero-init last conv,
and non-trivial BatchNorm running statistics), converts its state dict with
:func:`flax_attn.convert.from_torch`, and compares, in float32 with ``highest`` matmul precision:

* the outputs,
* the gradients of ``sum(outputs * cotangent)`` with respect to every floating input,
* in train mode, the updated BatchNorm running statistics.

It raises ``AssertionError`` listing every quantity outside ``atol + rtol * |torch|``.

``dtype="float64"`` runs both sides in double precision (``torch.float64``; ``jax_enable_x64`` with
float64 parameters and inputs). Entries whose float32 agreement is ill-conditioned (deep networks
in train mode amplify float32 rounding, so the agreement depends on the CPU's kernels) compare that
way: the weights and inputs are drawn in float32 and widened exactly, so both runs see the same
numbers, and a tight tolerance then holds on every machine while a wrong formula still fails.
:func:`measure_conditioning` measures how ill-conditioned an entry is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.catalogue import Entry
from flax_attn.convert import from_torch, to_torch
from flax_attn.convert.io import to_numpy

__all__ = [
    "Conditioning",
    "ParityResult",
    "apply_entry",
    "check_parity",
    "from_torch_axes",
    "measure_conditioning",
    "parity_dtype",
    "randomize_torch_module",
    "run_parity",
    "to_torch_axes",
]

# The default float64 parity bound (``Entry.float64_tolerance``): the ill-conditioned entries
# amplify rounding by up to ~1e6 (measured, see ``measure_conditioning``); 1e-9 is ~1e7 x float64
# epsilon and far below any float32 error, and the measured float64 disagreements are <= 3e-10.
FLOAT64_ATOL = 1e-9


def apply_entry(entry: Entry, module, variables, inputs: Mapping, *, train: bool, seed: int = 0):
    """``module.apply`` as the catalogue calls ``entry``'s block: with :attr:`Entry.flax_kwargs`, in
    train mode (BatchNorm statistics mutable, dropout keyed by ``seed``) when ``train`` and the entry
    has a train mode, else in eval mode. Returns ``(outputs, updated state)`` (``{}`` in eval)."""
    kwargs = entry.flax_kwargs
    if train and entry.train_mode:
        return module.apply(
            variables,
            **inputs,
            **kwargs,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(seed)},
        )
    return module.apply(variables, **inputs, **kwargs, train=False), {}


def parity_dtype(entry: Entry, train: bool) -> str:
    """The precision ``entry``'s parity test compares in for this mode (``entry.float64_modes``)."""
    return "float64" if ("train" if train else "eval") in entry.float64_modes else "float32"


@contextlib.contextmanager
def _x64(enabled: bool):
    """``jax_enable_x64`` for the duration (the context manager moved between JAX versions)."""
    if not enabled:
        yield
        return
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:  # pragma: no cover - older JAX
        from jax.experimental import enable_x64 as ctx
    with ctx(True):
        yield


def randomize_torch_module(module, seed: int = 0) -> None:
    """Make every parameter and BatchNorm statistic non-trivial, in place.

    Tensors that the reference initialises to a constant (zero gamma, zero biases, BN weight 1,
    zero-init convs) get that constant plus N(0, 0.2^2) noise, so every parameter influences the
    output; running means get N(0, 0.2^2) and running variances U(0.5, 2).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            if bool(torch.all(flat == flat[0])):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.2 * torch.randn(buf.shape, generator=g, dtype=buf.dtype))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + 1.5 * torch.rand(buf.shape, generator=g, dtype=buf.dtype))
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7)


def to_torch_axes(x: np.ndarray, image: bool) -> np.ndarray:
    """An input as the PyTorch reference takes it: NHWC images (``image``) moved to NCHW."""
    return np.ascontiguousarray(np.moveaxis(x, -1, 1)) if image else x


def from_torch_axes(x: np.ndarray, image: bool) -> np.ndarray:
    """The inverse of :func:`to_torch_axes` (for gradients with respect to the inputs)."""
    return np.moveaxis(x, 1, -1) if image else x


def _torch_outputs_to_flax(entry: Entry, outputs):
    """Torch outputs as a list of torch tensors in Flax layout (differentiable)."""
    if callable(entry.output_layout):
        outputs = entry.output_layout(outputs)
    leaves = [t for t in jax.tree_util.tree_leaves(outputs) if t is not None]
    if entry.output_layout == "nhwc":
        leaves = [t.movedim(1, -1) if t.ndim >= 3 else t for t in leaves]
    return leaves


@dataclasses.dataclass
class ParityResult:
    """Max abs/rel errors per compared quantity, and whether all were within tolerance."""

    block: str
    train: bool
    errors: dict[str, tuple[float, float]]
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs(self) -> float:
        return max((a for a, _ in self.errors.values()), default=0.0)

    def __str__(self) -> str:
        mode = "train" if self.train else "eval"
        lines = [f"{self.block} [{mode}]: {'PASS' if self.passed else 'FAIL'}"]
        for k, (a, r) in self.errors.items():
            lines.append(f"  {k:<40s} max abs err {a:.3e}   max rel err {r:.3e}")
        lines += [f"  FAILED: {f}" for f in self.failures]
        return "\n".join(lines)


def _compare(name, got, want, atol, rtol, errors, failures):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        failures.append(f"{name}: Flax shape {got.shape} vs torch shape {want.shape}")
        errors[name] = (float("inf"), float("inf"))
        return
    diff = np.abs(got - want)
    abs_err = float(diff.max()) if diff.size else 0.0
    rel_err = float((diff / np.maximum(np.abs(want), 1e-12)).max()) if diff.size else 0.0
    errors[name] = (abs_err, rel_err)
    if not np.isfinite(got).all() or not np.isfinite(want).all():
        failures.append(f"{name}: non-finite values (Flax {np.isfinite(got).all()}, torch {np.isfinite(want).all()})")
    elif np.any(diff > atol + rtol * np.abs(want)):
        worst = np.unravel_index(np.argmax(diff - rtol * np.abs(want)), diff.shape)
        failures.append(
            f"{name}: max abs err {abs_err:.3e} exceeds atol={atol:g}, rtol={rtol:g} "
            f"(worst at {tuple(int(i) for i in worst)}: Flax {got[worst]:.7g} vs torch {want[worst]:.7g})"
        )


@dataclasses.dataclass
class _Run:
    """The quantities one run produced on each side, keyed like the parity report."""

    flax: dict[str, np.ndarray]
    torch: dict[str, np.ndarray]
    notes: list[str]


def _run(
    entry: Entry,
    *,
    train: bool,
    seed: int,
    config: Mapping[str, Any] | None,
    inputs: Mapping[str, np.ndarray] | None,
    state_dict: Mapping[str, Any] | None,
    layout: str | None,
    check_grads: bool,
    dtype: str,
) -> _Run:
    import torch

    if dtype not in ("float32", "float64"):
        raise ValueError(f"run_parity: dtype must be 'float32' or 'float64', got {dtype!r}")
    x64 = dtype == "float64"
    np_dtype = np.float64 if x64 else np.float32
    torch.manual_seed(seed)
    tmod = entry.build_torch(config)
    if state_dict is None:
        randomize_torch_module(tmod, seed)
    else:
        tmod.load_state_dict({k: torch.from_numpy(np.array(to_numpy(v))) for k, v in state_dict.items()}, strict=True)
    tmod.train(train)
    # The Flax variables are converted from the float32 weights; widening them afterwards is exact,
    # so the float64 runs of both frameworks see the same numbers as the float32 ones.
    sd = {k: to_numpy(v) for k, v in tmod.state_dict().items()}
    if x64:
        tmod.double()

    rng = np.random.default_rng(seed)
    inputs = dict(entry.make_inputs(rng, config) if inputs is None else inputs)
    float_names = [k for k, v in inputs.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]

    fmod = entry.build_flax(config)
    kwargs = entry.flax_kwargs  # call_kwargs, and method=flax_call when the entry has one
    variables = from_torch(fmod, sd, layout=layout, **inputs, **kwargs)
    inputs = {k: (np.asarray(v, np_dtype) if k in float_names else v) for k, v in inputs.items()}

    def flax_fn(float_inputs):
        out, state = apply_entry(entry, fmod, variables, {**inputs, **float_inputs}, train=train, seed=seed)
        leaves = [o for o in jax.tree_util.tree_leaves(out) if o is not None]
        return leaves, state

    notes: list[str] = []
    with _x64(x64), jax.default_matmul_precision("highest"):
        if x64:
            variables = jax.tree_util.tree_map(
                lambda v: jnp.asarray(v, jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v, variables
            )
        flax_in = {k: jnp.asarray(inputs[k]) for k in float_names}
        out_shapes, _ = jax.eval_shape(flax_fn, flax_in)
        cots = [rng.standard_normal(o.shape).astype(np.float32).astype(np_dtype) for o in out_shapes]
        want_grads = check_grads and bool(float_names)

        # One compiled forward + VJP: op-by-op dispatch of whole networks is many times slower.
        @jax.jit
        def forward_backward(fi, cot):
            out, vjp, state = jax.vjp(flax_fn, fi, has_aux=True)
            return out, state, (vjp([c.astype(o.dtype) for c, o in zip(cot, out)]) if want_grads else None)

        f_out, f_state, f_grads = forward_backward(flax_in, [jnp.asarray(c) for c in cots])
        if x64:
            narrow = sorted(
                {str(o.dtype) for o in f_out if o.dtype != jnp.float64 and jnp.issubdtype(o.dtype, jnp.floating)}
            )
            if narrow:
                notes.append(f"Flax outputs are {narrow} in a float64 run: the block narrows its compute dtype")
        flax_q: dict[str, np.ndarray] = {f"output[{i}]": np.asarray(o) for i, o in enumerate(f_out)}
        if f_grads is not None:
            flax_q.update({f"grad[{k}]": np.asarray(f_grads[0][k]) for k in float_names})
        if train and entry.train_mode and f_state:
            new_vars = {**variables, **f_state}
            flax_sd = to_torch(fmod, new_vars, layout=layout, collections=("batch_stats",), **inputs, **kwargs)
            flax_q.update({f"state[{k}]": np.asarray(v) for k, v in flax_sd.items()})

    t_inputs = {}
    for k, v in inputs.items():
        t = torch.from_numpy(to_torch_axes(np.asarray(v), k in entry.image_inputs))
        if k in float_names and check_grads:
            t.requires_grad_(True)
        t_inputs[k] = t
    t_out = _torch_outputs_to_flax(entry, entry.call_torch(tmod, **t_inputs))

    torch_q: dict[str, np.ndarray] = {f"output[{i}]": to.detach().numpy() for i, to in enumerate(t_out)}
    if len(t_out) != len(f_out):
        notes.append(f"outputs: Flax returned {len(f_out)} arrays, torch {len(t_out)}")
    elif f_grads is not None:
        loss = sum((to * torch.from_numpy(c)).sum() for to, c in zip(t_out, cots))
        wrt = [t_inputs[k] for k in float_names]
        t_grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        for k, tg in zip(float_names, t_grads):
            torch_q[f"grad[{k}]"] = (
                np.zeros(inputs[k].shape, np_dtype)
                if tg is None
                else from_torch_axes(tg.numpy(), k in entry.image_inputs)
            )
    if train and entry.train_mode and f_state:
        t_sd = tmod.state_dict()
        torch_q.update({f"state[{k}]": t_sd[k].numpy() for k in flax_sd})
    return _Run(flax_q, torch_q, notes)


def run_parity(
    entry: Entry,
    *,
    train: bool = False,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    state_dict: Mapping[str, Any] | None = None,
    layout: str | None = None,
    check_grads: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    dtype: str | None = None,
) -> ParityResult:
    """Compare ``entry``'s Flax block with its PyTorch reference; returns a :class:`ParityResult`.

    ``state_dict`` loads given weights into both (``verify`` uses this) instead of random ones.
    ``dtype`` is ``"float32"`` or ``"float64"``; ``None`` takes the entry's choice for this mode
    (:func:`parity_dtype`), and with it the entry's tolerance (``entry.float64_tolerance`` in float64).
    """
    dtype = parity_dtype(entry, train) if dtype is None else dtype
    if dtype == "float64":
        default_atol = default_rtol = entry.float64_tolerance
    else:
        default_atol, default_rtol = entry.atol, entry.rtol
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    run = _run(
        entry,
        train=train,
        seed=seed,
        config=config,
        inputs=inputs,
        state_dict=state_dict,
        layout=layout,
        check_grads=check_grads,
        dtype=dtype,
    )
    errors: dict[str, tuple[float, float]] = {}
    failures: list[str] = list(run.notes)
    for name, want in run.torch.items():
        if name not in run.flax:
            if not name.startswith("output["):
                failures.append(f"{name}: computed by torch only")
            continue
        _compare(name, run.flax[name], want, atol, rtol, errors, failures)
    block = entry.name if dtype == "float32" else f"{entry.name} ({dtype})"
    return ParityResult(block, train, errors, failures)


@dataclasses.dataclass
class Conditioning:
    """How much float32 rounding moves each quantity, per framework, against its own float64 run.

    ``torch_self`` / ``flax_self``: max abs difference between the float32 and float64 runs of the
    same framework (same weights and inputs). ``cross64``: Flax vs torch, both in float64.
    ``tol_ratio``: the larger self-difference as a fraction of the entry's float32 tolerance
    ``atol + rtol * |x|``, elementwise, worst element. A quantity whose ratio approaches 1 cannot
    be compared in float32 on every machine: each framework's own rounding already uses up the
    tolerance, and another CPU's kernels round differently.
    """

    block: str
    train: bool
    torch_self: dict[str, float]
    flax_self: dict[str, float]
    cross64: dict[str, float]
    tol_ratio: dict[str, float]

    @property
    def worst_ratio(self) -> float:
        return max(self.tol_ratio.values(), default=0.0)

    @property
    def worst_quantity(self) -> str:
        return max(self.tol_ratio, key=self.tol_ratio.get) if self.tol_ratio else "-"


def measure_conditioning(
    entry: Entry, *, train: bool = False, seed: int = 0, config: Mapping[str, Any] | None = None
) -> Conditioning:
    """Run ``entry`` in float32 and float64 on both sides and report the differences."""
    kw = dict(train=train, seed=seed, config=config, inputs=None, state_dict=None, layout=None, check_grads=True)
    r32 = _run(entry, dtype="float32", **kw)
    r64 = _run(entry, dtype="float64", **kw)

    def diff(a, b):
        return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))

    keys = [k for k in r64.torch if k in r64.flax and k in r32.torch and k in r32.flax]
    out = Conditioning(entry.name, train, {}, {}, {}, {})
    for k in keys:
        ref = np.abs(np.asarray(r64.torch[k], np.float64))
        d_t, d_f = diff(r32.torch[k], r64.torch[k]), diff(r32.flax[k], r64.flax[k])
        out.torch_self[k] = float(d_t.max(initial=0.0))
        out.flax_self[k] = float(d_f.max(initial=0.0))
        out.cross64[k] = float(diff(r64.flax[k], r64.torch[k]).max(initial=0.0))
        out.tol_ratio[k] = float((np.maximum(d_t, d_f) / (entry.atol + entry.rtol * ref)).max(initial=0.0))
    return out


def check_parity(entry: Entry, **kwargs) -> ParityResult:
    """:func:`run_parity`, raising ``AssertionError`` with the full report on any failure."""
    result = run_parity(entry, **kwargs)
    if not result.passed:
        raise AssertionError(str(result))
    return result
