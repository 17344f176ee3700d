"""The shared parity check: a PyTorch reference and its Flax port, same weights, same inputs.

``check_parity(entry)`` builds the reference from the catalogue with random weights (including the
parameters the reference initialises to constants, like a zero ``gamma`` or a zero-init last conv,
and non-trivial BatchNorm running statistics), converts its state dict with
:func:`flax_attn.convert.from_torch`, and compares, in float32 with ``highest`` matmul precision:

* the outputs,
* the gradients of ``sum(outputs * cotangent)`` with respect to every floating input,
* in train mode, the updated BatchNorm running statistics.

It raises ``AssertionError`` listing every quantity outside ``atol + rtol * |torch|``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.catalogue import Entry
from flax_attn.convert import from_torch, to_torch
from flax_attn.convert.io import to_numpy

__all__ = ["ParityResult", "check_parity", "randomize_torch_module", "run_parity"]


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


def _to_torch_layout(x: np.ndarray, image: bool) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, -1, 1)) if image else x


def _from_torch_layout(x: np.ndarray, image: bool) -> np.ndarray:
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
) -> ParityResult:
    """Compare ``entry``'s Flax block with its PyTorch reference; returns a :class:`ParityResult`.

    ``state_dict`` loads given weights into both (``verify`` uses this) instead of random ones.
    """
    import torch

    atol = entry.atol if atol is None else atol
    rtol = entry.rtol if rtol is None else rtol
    torch.manual_seed(seed)
    tmod = entry.build_torch(config)
    if state_dict is None:
        randomize_torch_module(tmod, seed)
    else:
        tmod.load_state_dict({k: torch.from_numpy(np.array(to_numpy(v))) for k, v in state_dict.items()},
                             strict=True)
    tmod.train(train)
    sd = {k: to_numpy(v) for k, v in tmod.state_dict().items()}

    rng = np.random.default_rng(seed)
    inputs = dict(entry.make_inputs(rng, config) if inputs is None else inputs)
    float_names = [k for k, v in inputs.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]

    fmod = entry.build_flax(config)
    kwargs = dict(entry.call_kwargs)
    variables = from_torch(fmod, sd, layout=layout, **inputs, **kwargs)

    def flax_fn(float_inputs):
        all_inputs = {**inputs, **float_inputs}
        if train and entry.train_mode:
            out, state = fmod.apply(variables, **all_inputs, **kwargs, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": jax.random.PRNGKey(seed)})
        else:
            out, state = fmod.apply(variables, **all_inputs, **kwargs, train=False), {}
        leaves = [o for o in jax.tree_util.tree_leaves(out) if o is not None]
        return leaves, state

    with jax.default_matmul_precision("highest"):
        flax_in = {k: jnp.asarray(inputs[k]) for k in float_names}
        out_shapes, _ = jax.eval_shape(flax_fn, flax_in)
        cots = [rng.standard_normal(o.shape).astype(np.float32) for o in out_shapes]
        want_grads = check_grads and bool(float_names)

        # One compiled forward + VJP: op-by-op dispatch of whole networks is many times slower.
        @jax.jit
        def forward_backward(fi, cot):
            out, vjp, state = jax.vjp(flax_fn, fi, has_aux=True)
            return out, state, (vjp([c.astype(o.dtype) for c, o in zip(cot, out)]) if want_grads else None)

        f_out, f_state, f_grads = forward_backward(flax_in, [jnp.asarray(c) for c in cots])

    t_inputs = {}
    for k, v in inputs.items():
        t = torch.from_numpy(_to_torch_layout(np.asarray(v), k in entry.image_inputs))
        if k in float_names and check_grads:
            t.requires_grad_(True)
        t_inputs[k] = t
    call = entry.torch_call or (lambda m, **kw: m(**kw))
    t_out = _torch_outputs_to_flax(entry, call(tmod, **t_inputs, **kwargs))

    errors: dict[str, tuple[float, float]] = {}
    failures: list[str] = []
    if len(t_out) != len(f_out):
        failures.append(f"outputs: Flax returned {len(f_out)} arrays, torch {len(t_out)}")
    for i, (fo, to) in enumerate(zip(f_out, t_out)):
        _compare(f"output[{i}]", fo, to.detach().numpy(), atol, rtol, errors, failures)
    if f_grads is not None and len(t_out) == len(f_out):
        loss = sum((to * torch.from_numpy(c)).sum() for to, c in zip(t_out, cots))
        wrt = [t_inputs[k] for k in float_names]
        t_grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        for k, tg in zip(float_names, t_grads):
            want = np.zeros(inputs[k].shape, np.float32) if tg is None else _from_torch_layout(
                tg.numpy(), k in entry.image_inputs)
            _compare(f"grad[{k}]", f_grads[0][k], want, atol, rtol, errors, failures)
    if train and entry.train_mode and f_state:
        new_vars = {**variables, **f_state}
        flax_sd = to_torch(fmod, new_vars, layout=layout, collections=("batch_stats",), **inputs, **kwargs)
        t_sd = tmod.state_dict()
        for k, v in flax_sd.items():
            _compare(f"state[{k}]", v, t_sd[k].numpy(), atol, rtol, errors, failures)
    return ParityResult(entry.name, train, errors, failures)


def check_parity(entry: Entry, **kwargs) -> ParityResult:
    """:func:`run_parity`, raising ``AssertionError`` with the full report on any failure."""
    result = run_parity(entry, **kwargs)
    if not result.passed:
        raise AssertionError(str(result))
    return result

