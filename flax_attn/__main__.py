"""Command line: ``python -m flax_attn {demo,blocks,convert,verify,readme-table}``.

* ``demo``: build a few blocks, convert PyTorch references into them and print the parity errors.
* ``blocks``: list the catalogue.
* ``convert IN.pth OUT --block NAME [--layout L]``: write Flax variables (msgpack file, or an Orbax
  directory when OUT has no suffix).
* ``verify --block NAME --checkpoint IN.pth``: load the checkpoint into the PyTorch reference and
  the Flax block, print max abs/rel errors of outputs and input gradients on random inputs.
"""

from __future__ import annotations

import argparse
import sys


def _entry(name: str):
    from flax_attn import catalogue

    return catalogue.get(name)


def _example_inputs(entry, seed: int, config=None):
    import numpy as np

    return entry.make_inputs(np.random.default_rng(seed), config)


def cmd_blocks(args) -> int:
    from flax_attn import catalogue

    for e in catalogue.entries():
        print(f"{e.name:<34s} {e.family:<20s} layouts={','.join(e.layouts):<24s} {e.paper}")
    return 0


def cmd_convert(args) -> int:
    from flax_attn.convert import from_torch, load_state_dict, save_variables

    entry = _entry(args.block)
    config = _parse_config(args.config)
    module = entry.build_flax(config or None)
    sd = load_state_dict(args.input, key=args.key)
    variables = from_torch(module, sd, layout=args.layout, **_example_inputs(entry, 0, config or None),
                           **entry.call_kwargs)
    path = save_variables(variables, args.output, format=args.format)
    n = sum(1 for _ in _leaves(variables))
    print(f"converted {len(sd)} torch tensors into {n} Flax variables for {entry.name} -> {path}")
    return 0


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def _parse_config(pairs):
    import ast

    out = {}
    for p in pairs or ():
        k, sep, v = p.partition("=")
        if not sep:
            raise SystemExit(f"--config expects key=value, got {p!r}")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def cmd_verify(args) -> int:
    from flax_attn.convert import load_state_dict
    from flax_attn.testing.parity import run_parity

    entry = _entry(args.block)
    config = {**entry.config, **_parse_config(args.config)}
    sd = load_state_dict(args.checkpoint, key=args.key) if args.checkpoint else None
    ok = True
    for train in (False, True) if entry.train_mode else (False,):
        result = run_parity(entry, train=train, config=config, state_dict=sd, layout=args.layout, seed=args.seed)
        print(result)
        ok &= result.passed
    return 0 if ok else 1


# One representative block per family, quick on a CPU; `demo --all` checks the whole catalogue.
DEMO_BLOCKS = ("multihead_attention", "se_layer", "cbam", "criss_cross_attention", "acmix",
               "non_local_2d_embedded_gaussian", "a2n", "deform_conv2d", "transformer_encoder_layer")


def cmd_demo(args) -> int:
    import jax
    import jax.numpy as jnp

    from flax_attn import catalogue
    from flax_attn.testing.parity import run_parity

    print(f"flax-attn demo on {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    print("Each block: PyTorch reference with random weights -> state dict -> flax_attn.convert.from_torch"
          " -> same inputs -> max abs error of outputs and input gradients (float32).\n")
    if args.all:
        names = [e.name for e in catalogue.entries() if e.torch is not None]
    else:
        names = args.blocks or list(DEMO_BLOCKS)
    worst = 0.0
    failed = []
    for name in names:
        entry = catalogue.get(name)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flax_attn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="parity demo over catalogued blocks")
    d.add_argument("blocks", nargs="*", help="block names (default: one per family)")
    d.add_argument("--all", action="store_true", help="every catalogued block with a PyTorch reference")
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("blocks", help="list the catalogue")
    b.set_defaults(fn=cmd_blocks)

    c = sub.add_parser("convert", help="PyTorch checkpoint -> Flax variables")
    c.add_argument("input")
    c.add_argument("output", help="OUT.msgpack, or a directory name (Orbax)")
    c.add_argument("--block", required=True)
    c.add_argument("--layout", default=None)
    c.add_argument("--key", default=None, help="entry of a wrapping dict holding the weights")
    c.add_argument("--format", choices=["msgpack", "orbax"], default=None)
    c.add_argument("--config", nargs="*", help="constructor overrides key=value")
    c.set_defaults(fn=cmd_convert)

    v = sub.add_parser("verify", help="compare Flax and PyTorch on a checkpoint (needs torch)")
    v.add_argument("--block", required=True)
    v.add_argument("--checkpoint", default=None, help="state dict to load into both (default: random weights)")
    v.add_argument("--layout", default=None)
    v.add_argument("--key", default=None)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--config", nargs="*", help="constructor overrides key=value")
    v.set_defaults(fn=cmd_verify)

    t = sub.add_parser("readme-table", help="print the README block table from the catalogue")
    t.set_defaults(fn=cmd_readme_table)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
