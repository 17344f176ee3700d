"""Command line: ``python -m flax_attn {demo,blocks,convert,verify,readme-table}``.

* ``demo``: build a few blocks, convert PyTorch references into them and print the parity errors.
* ``blocks``: list the catalogue: name, family, Flax class with the catalogue's arguments, layouts.
* ``convert IN.pth OUT --block NAME [--layout L] [--config k=v ...] [--prefix P]``: write Flax
  variables (msgpack file, or an Orbax directory when OUT has no suffix).
* ``verify --block NAME --checkpoint IN.pth``: load the checkpoint into the PyTorch reference and
  the Flax block, print max abs/rel errors of outputs and input gradients on random inputs.

``--config`` arguments are merged into the block's catalogue config, and the example inputs follow
them. ``--prefix backbone.layer1.0.se`` takes one submodule's tensors out of a whole-model
checkpoint. Bad input (unknown block, unreadable or mismatching checkpoint) prints one ``error:``
line (a mismatch also prints the report and a hint) and exits with status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys


class UsageError(Exception):
    """A mistake in the command line or its files: printed as one ``error:`` line, exit status 2."""


def _entry(name: str, arg: str = "--block"):
    from flax_attn import catalogue

    try:
        return catalogue.get(name)
    except KeyError as e:
        raise UsageError(f"{arg}: {e.args[0]}") from None


def _parse_config(pairs):
    import ast

    out = {}
    for p in pairs or ():
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise UsageError(f"--config expects key=value pairs, got {p!r}")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _merged_config(entry, pairs) -> dict:
    """The catalogue config with the ``--config`` overrides on top (never replacing it)."""
    return {**entry.config, **_parse_config(pairs)}


def _build(entry, config):
    try:
        return entry.build_flax(config)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise UsageError(f"--config {_fmt_config(config)} does not fit {entry.flax_name}: {e}") from None


def _fmt_config(config) -> str:
    return " ".join(f"{k}={v!r}" for k, v in config.items())


def _int_values(config) -> dict:
    """``{name: int}`` for the integer arguments of ``config``; a tuple of ints counts element-wise."""
    out = {}
    for k, v in config.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            out[k] = v
        elif isinstance(v, tuple) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            out.update({f"{k}[{i}]": x for i, x in enumerate(v)})
    return out


def _resize(a, axis: int, n: int):
    """``a`` with ``axis`` of length ``n``, tiling or cropping its values (keeps masks and int ranges valid)."""
    import numpy as np

    return np.take(a, np.arange(n) % a.shape[axis], axis=axis)


def candidate_inputs(entry, config, seed: int = 0):
    """Example inputs for ``entry`` built with ``config``, most plausible first.

    Catalogue inputs follow the catalogue config. When ``--config`` changes an integer argument
    (``gate_channels=64``, ``size1=(26, 34)``), an input axis whose length equals the argument's
    catalogue value probably depends on it. Each candidate gives all axes of one such length
    either the new value or the old one: the new one first, unless an argument left unchanged
    still has the old value (``reduction=16`` beside ``inplanes=16``), then the old one first.
    Callers take the first candidate that the block (and the checkpoint) accepts. Entries whose
    ``inputs`` take the config are asked directly.
    """
    import itertools

    import numpy as np

    base = entry.make_inputs(np.random.default_rng(seed), config)
    if entry.inputs_follow_config():
        yield base
        return
    old, new = _int_values(entry.config), _int_values(config)
    follow: dict[int, set[int]] = {}
    for k, v in old.items():
        if k in new and new[k] != v and new[k] > 0:
            follow.setdefault(v, set()).add(new[k])
    claimed = {v for k, v in old.items() if new.get(k) == v}
    sizes = {n for a in base.values() for n in np.shape(a)}
    choices = []
    for size in sorted(s for s in follow if s in sizes):
        changes = [(size, n) for n in sorted(follow[size])]
        choices.append([(size, None), *changes] if size in claimed else [*changes, (size, None)])
    # itertools.product keeps each axis' preference order; sort (stably) by how many preferences
    # a candidate gives up.
    combos = sorted(itertools.product(*choices), key=lambda c: sum(ch.index(x) > 0 for ch, x in zip(choices, c)))
    for combo in combos[:64]:
        mapping = {size: n for size, n in combo if n is not None}
        out = {}
        for name, a in base.items():
            a = np.asarray(a)
            for axis, size in enumerate(a.shape):
                if size in mapping:
                    a = _resize(a, axis, mapping[size])
            out[name] = a
        yield out


def _select(sd, prefix: str | None):
    """The tensors under ``prefix`` (``backbone.layer3.1.se``) with the prefix removed."""
    if not prefix:
        return sd
    prefix = prefix.rstrip(".") + "."
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        heads = sorted({k.rsplit(".", 1)[0] for k in sd})
        shown = ", ".join(heads[:12]) + (f", ... ({len(heads)} in all)" if len(heads) > 12 else "")
        raise UsageError(f"--prefix {prefix[:-1]!r} matches no key of the checkpoint; its modules: {shown}")
    return out


def _config_hint(entry, config, report) -> str:
    """Suggest ``--config`` values from the shape mismatches of a conversion report."""
    values = _int_values(config)
    guesses = {}
    for _, _, _, got, want in report.mismatched:
        if len(got) != len(want):
            continue
        for g, w in zip(got, want):
            if g != w:
                for k, v in values.items():
                    if v == w and "[" not in k:
                        guesses.setdefault(k, g)
    hint = (
        f"if the checkpoint was made with other constructor arguments, pass them with --config key=value "
        f"(merged into {entry.name}'s catalogue config: {_fmt_config(entry.config)})"
    )
    if guesses:
        hint += f"; the shapes suggest --config {_fmt_config(guesses)}"
    prefixes = collections.Counter(
        u[: -len(m) - 1] for _, m, _ in report.missing for u, _ in report.unexpected if u.endswith("." + m)
    )
    if prefixes:
        hint += f"; it looks like a bigger model holding the block: try --prefix {prefixes.most_common(1)[0][0]}"
    elif report.unexpected:
        hint += "; if it holds a bigger model, select the block's tensors with --prefix"
    return hint


def _convert_matching(entry, module, config, sd, layout, seed=0):
    """``(variables, inputs)`` for the first candidate inputs that the block and the checkpoint accept."""
    from flax_attn.convert import StateDictMismatchError, from_torch

    mismatch = other = None
    for inputs in candidate_inputs(entry, config, seed):
        try:
            return from_torch(module, sd, layout=layout, **inputs, **entry.flax_kwargs), inputs
        except StateDictMismatchError as e:
            mismatch = mismatch or e
        except (TypeError, ValueError) as e:
            if "unknown layout" in str(e):
                raise UsageError(f"--layout: {e}") from None
            other = other or e
    if mismatch is not None:
        raise UsageError(
            f"the checkpoint does not match {entry.name} ({entry.flax_name}) with config {_fmt_config(config)}\n"
            f"{mismatch.report}\nhint: {_config_hint(entry, config, mismatch.report)}"
        ) from mismatch
    raise UsageError(f"{entry.name} does not run with config {_fmt_config(config)}: {other}") from other


def _load(path, key):
    from flax_attn.convert import load_state_dict

    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    return load_state_dict(path, key=key)


def cmd_blocks(args) -> int:
    from flax_attn import catalogue

    for e in catalogue.entries():
        print(f"{e.name:<34s} {e.family:<14s} {e.flax_signature}")
        print(f"{'':<34s} layouts={','.join(e.layouts)}  {e.paper}")
    return 0


def cmd_convert(args) -> int:
    from flax_attn.convert import save_variables

    entry = _entry(args.block)
    config = _merged_config(entry, args.config)
    module = _build(entry, config)
    sd = _select(_load(args.input, args.key), args.prefix)
    variables, _ = _convert_matching(entry, module, config, sd, args.layout)
    path = save_variables(variables, args.output, format=args.format)
    n = sum(1 for _ in _leaves(variables))
    print(f"converted {len(sd)} torch tensors into {n} Flax variables for {entry.name} -> {path}")
    return 0


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def cmd_verify(args) -> int:
    from flax_attn.testing.parity import run_parity

    entry = _entry(args.block)
    if entry.torch is None:
        raise UsageError(f"--block {entry.name} has no PyTorch reference to verify against")
    config = _merged_config(entry, args.config)
    module = _build(entry, config)
    if args.checkpoint:
        sd = _select(_load(args.checkpoint, args.key), args.prefix)
        _, inputs = _convert_matching(entry, module, config, sd, args.layout, seed=args.seed)
    else:
        sd, inputs = None, _runnable_inputs(entry, module, config, args.seed)
    ok = True
    for train in (False, True) if entry.train_mode else (False,):
        result = run_parity(
            entry, train=train, config=config, inputs=inputs, state_dict=sd, layout=args.layout, seed=args.seed
        )
        print(result)
        ok &= result.passed
    return 0 if ok else 1


def _runnable_inputs(entry, module, config, seed):
    import jax

    first = None
    for inputs in candidate_inputs(entry, config, seed):
        try:
            jax.eval_shape(lambda kw: module.init(jax.random.PRNGKey(0), **kw, **entry.flax_kwargs), inputs)
            return inputs
        except (TypeError, ValueError) as e:
            first = first or e
    raise UsageError(f"{entry.name} does not run with config {_fmt_config(config)}: {first}") from first


# One representative block per family, quick on a CPU; `demo --all` checks the whole catalogue.
DEMO_BLOCKS = (
    "multihead_attention",
    "se_layer",
    "cbam",
    "criss_cross_attention",
    "acmix",
    "non_local_2d_embedded_gaussian",
    "a2n",
    "deform_conv2d",
    "transformer_encoder_layer",
)


def cmd_demo(args) -> int:
    import jax
    import jax.numpy as jnp

    from flax_attn import catalogue
    from flax_attn.testing.parity import run_parity

    print(f"flax-attn demo on {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    print(
        "Each block: PyTorch reference with random weights -> state dict -> flax_attn.convert.from_torch"
        " -> same inputs -> max abs error of outputs and input gradients (float32).\n"
    )
    if args.all:
        names = [e.name for e in catalogue.entries() if e.torch is not None]
    else:
        names = args.blocks or list(DEMO_BLOCKS)
    worst = 0.0
    failed = []
    for name in names:
        entry = _entry(name, arg="demo BLOCKS")
        for train in (False, True) if entry.train_mode else (False,):
            r = run_parity(entry, train=train)
            out_err = max((a for k, (a, _) in r.errors.items() if k.startswith("output")), default=0.0)
            grad_err = max((a for k, (a, _) in r.errors.items() if k.startswith("grad")), default=0.0)
            mode = "train" if train else "eval"
            status = "ok" if r.passed else "FAIL"
            print(f"  {name:<34s} {mode:<5s} output err {out_err:.2e}  grad err {grad_err:.2e}  [{status}]")
            worst = max(worst, r.max_abs)
            if not r.passed:
                failed.append(f"{name} ({mode})")
    from flax_attn import MultiheadAttention

    mha = MultiheadAttention(embed_dim=64, num_heads=8)
    x = jnp.ones((2, 10, 64))
    variables = mha.init(jax.random.PRNGKey(0), x, x, x)
    out, _ = jax.jit(lambda v, x: mha.apply(v, x, x, x))(variables, x)
    print(f"\njit-compiled MultiheadAttention forward: output {out.shape}")
    print(f"worst max abs error across blocks: {worst:.2e}; {len(failed)} failures {failed if failed else ''}")
    return 1 if failed else 0


def cmd_readme_table(args) -> int:
    from flax_attn.catalogue import markdown_table

    print(markdown_table())
    return 0


def _user_errors():
    """Exceptions that mean bad input rather than a bug in flax-attn: one line, exit status 2."""
    from flax_attn.convert import CheckpointError

    return (UsageError, CheckpointError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    p = argparse.ArgumentParser(
        prog="python -m flax_attn",
        description=__doc__,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="parity demo over catalogued blocks", parents=[common])
    d.add_argument("blocks", nargs="*", help="block names (default: one per family)")
    d.add_argument("--all", action="store_true", help="every catalogued block with a PyTorch reference")
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("blocks", help="list the catalogue: name, family, Flax class and arguments", parents=[common])
    b.set_defaults(fn=cmd_blocks)

    c = sub.add_parser("convert", help="PyTorch checkpoint -> Flax variables", parents=[common])
    c.add_argument("input")
    c.add_argument("output", help="OUT.msgpack, or a directory name (Orbax)")
    c.add_argument("--block", required=True)
    c.add_argument("--layout", default=None)
    c.add_argument("--key", default=None, help="entry of a wrapping dict holding the weights")
    c.add_argument("--prefix", default=None, help="take the tensors under this submodule (backbone.layer1.0.se)")
    c.add_argument("--format", choices=["msgpack", "orbax"], default=None)
    c.add_argument("--config", nargs="*", help="constructor arguments key=value, merged into the catalogue config")
    c.set_defaults(fn=cmd_convert)

    v = sub.add_parser("verify", help="compare Flax and PyTorch on a checkpoint (needs torch)", parents=[common])
    v.add_argument("--block", required=True)
    v.add_argument("--checkpoint", default=None, help="state dict to load into both (default: random weights)")
    v.add_argument("--layout", default=None)
    v.add_argument("--key", default=None)
    v.add_argument("--prefix", default=None, help="take the tensors under this submodule of the checkpoint")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--config", nargs="*", help="constructor arguments key=value, merged into the catalogue config")
    v.set_defaults(fn=cmd_verify)

    t = sub.add_parser("readme-table", help="print the README block table from the catalogue", parents=[common])
    t.set_defaults(fn=cmd_readme_table)

    args = p.parse_args(argv)
    if args.debug:
        return args.fn(args)
    try:
        return args.fn(args)
    except _user_errors() as e:
        msg = str(e) if isinstance(e, UsageError) else f"{type(e).__name__}: {e}"
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
