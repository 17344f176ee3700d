"""Checks an installed flax-attn wheel from outside the source tree (run by ``make wheel-check``).

Usage: ``python check_wheel.py dist/flax_attn-*.whl`` with the wheel installed in a fresh venv
that has no torch. Exits non-zero, naming the problem, when:

* the wheel lacks ``LICENSE`` (in its dist-info) or ``flax_attn/py.typed``;
* ``flax_attn`` is imported from anywhere but that venv's site-packages (a stray checkout on the path);
* ``import flax_attn`` imports torch;
* any module of ``flax_attn`` (``flax_attn.training`` included) fails to import, except for a missing optional
  dependency declared in an extra (torch, the training extras);
* one catalogued block does not run under ``jit``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import sysconfig
import zipfile
from pathlib import Path

# Top-level names of the packages in the optional extras (pyproject's [project.optional-dependencies]).
OPTIONAL = {"torch", "sklearn", "skimage", "PIL", "timm", "torchvision", "grain", "tensorboardX"}


def fail(msg: str) -> None:
    print(f"wheel check FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def check_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names):
        fail(f"{wheel.name} has no LICENSE in its dist-info; members: {sorted(n for n in names if 'dist-info' in n)}")
    if "flax_attn/py.typed" not in names:
        fail(f"{wheel.name} has no flax_attn/py.typed")
    # Only flax_attn at the top level: a `train` package would shadow (or be shadowed by) a user's train.py.
    tops = {n.split("/")[0] for n in names if "/" in n and ".dist-info/" not in n}
    if tops != {"flax_attn"}:
        fail(f"{wheel.name} installs top-level packages {sorted(tops)}, expected only ['flax_attn']")
    print(f"{wheel.name}: {len(names)} files, LICENSE and py.typed present")


def import_everything() -> None:
    import flax_attn

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    where = Path(flax_attn.__file__).resolve()
    if site not in where.parents:
        fail(f"flax_attn imported from {where}, expected the installed wheel under {site}")
    if "torch" in sys.modules:
        fail("`import flax_attn` imported torch")
    imported, skipped = [], []
    for top in ("flax_attn",):
        pkg = importlib.import_module(top)
        names = [top] + [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{top}.")]
        for name in names:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:
                if (err.name or "").split(".")[0] not in OPTIONAL:
                    fail(f"import {name}: {err!r}")
                skipped.append(f"{name} (needs {err.name})")
            else:
                imported.append(name)
    print(f"imported {len(imported)} modules; skipped {len(skipped)} needing optional extras: {', '.join(skipped)}")


def run_one_block() -> None:
    import jax
    import numpy as np

    from flax_attn import catalogue

    entry = catalogue.get("cbam")
    inputs = entry.make_inputs(np.random.default_rng(0))
    module = entry.build_flax()
    variables = module.init(jax.random.PRNGKey(0), **inputs)
    out = jax.jit(lambda v, kw: module.apply(v, **kw))(variables, inputs)
    out = np.asarray(out)
    if out.shape != inputs["x"].shape or not np.isfinite(out).all():
        fail(f"cbam gave shape {out.shape} (expected {inputs['x'].shape}), finite={np.isfinite(out).all()}")
    print(f"cbam ran under jit on {jax.default_backend()}: {inputs['x'].shape} -> {out.shape}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: check_wheel.py WHEEL")
    check_contents(Path(sys.argv[1]))
    import_everything()
    run_one_block()
    print("wheel check passed")
