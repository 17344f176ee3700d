"""How ill-conditioned is each catalogue entry's float32 parity? One table, every entry, both modes.

For each entry and mode, both frameworks run the same weights and inputs in float32 and in float64.
Each framework's own float32-vs-float64 difference is what float32 rounding alone moves a quantity;
as a fraction of the entry's float32 tolerance (``ratio``), it says how much of the tolerance is
used up before the two ports are even compared. Another CPU (ISA, thread count, oneDNN path) rounds
differently, so an entry whose ratio is a sizeable fraction of 1 passes or fails by machine: its
parity test compares in float64 instead (``Entry.float64_modes``). ``cross64`` is Flax vs torch
in float64: near float64 epsilon times the conditioning when the formulas agree.

    python benchmarks/parity_conditioning.py [--out benchmarks/results/parity_conditioning.md] [names...]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax
import torch

from flax_attn import catalogue
from flax_attn.testing.parity import measure_conditioning, parity_dtype


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="catalogue entries (default: all with a torch reference)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--skip-slow", action="store_true", help="leave out entries marked slow")
    args = ap.parse_args(argv)
    entries = (
        [catalogue.get(n) for n in args.names]
        if args.names
        else [e for e in catalogue.entries() if e.torch is not None and not (args.skip_slow and e.slow)]
    )
    lines = [
        "# Parity conditioning: float32 rounding against each entry's float32 tolerance",
        "",
        f"Machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__} "
        f"(CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads), "
        f"jax {jax.__version__}. Command: `python benchmarks/parity_conditioning.py`.",
        "",
        "ratio = max over elements of max(|torch32 - torch64|, |flax32 - flax64|) / (atol + rtol |x|), worst",
        "quantity shown; `self` columns are max abs differences; `cross64` is Flax vs torch, both float64.",
        "",
        "| entry | mode | tolerance | ratio | worst quantity | torch self | flax self | cross64 | parity in |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        for train in (False, True):
            if train and not e.train_mode:
                continue
            t0 = time.perf_counter()
            c = measure_conditioning(e, train=train)
            q = c.worst_quantity
            row = (
                f"| {e.name} | {'train' if train else 'eval'} | {e.atol:g}/{e.rtol:g} | {c.worst_ratio:.3g} | "
                f"{q} | {c.torch_self.get(q, 0):.2e} | {c.flax_self.get(q, 0):.2e} | "
                f"{max(c.cross64.values(), default=0):.2e} | {parity_dtype(e, train)} |"
            )
            lines.append(row)
            print(row, f"({time.perf_counter() - t0:.1f} s)", flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
