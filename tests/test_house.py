"""The shape of the package, checked from its source: where torch may be imported, that imports run
one way (no cycle), that block files hold no catalogue data, and that what the README table names is
public. Each check is also run on a small made-up package so that it is seen to fail."""

from __future__ import annotations

import ast
import importlib
import re
import textwrap
from pathlib import Path

import pytest

from flax_attn import catalogue

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flax_attn"
TORCH_MODULES = {"torch", "torchvision", "timm"}
# The only places that know PyTorch: the converter, the parity harness and its references, and
# the catalogue (its torch adapters reshape reference tensors at the boundary).
TORCH_ALLOWED = ("flax_attn.convert", "flax_attn.testing", "flax_attn.catalogue")


def _modules(package_dir: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``package_dir``."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _is_package(name: str, path: Path) -> bool:
    return path.name == "__init__.py"


def _absolute(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (resolving ``from . import x``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(module: str, is_pkg: bool, nodes, known: set[str]) -> set[str]:
    """Modules named by the import statements ``nodes`` (``from pkg import sub`` names ``pkg.sub``)."""
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, is_pkg, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    return out


def _all_imports(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _top_level_imports(tree: ast.Module):
    """Imports that run when the module is imported: module level, including inside top-level
    ``if``/``try`` blocks, but not under ``if TYPE_CHECKING:`` and not inside functions."""
    out = []

    def visit(stmts):
        for s in stmts:
            if isinstance(s, (ast.Import, ast.ImportFrom)):
                out.append(s)
            elif isinstance(s, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(s.test):
                    visit(s.body)
                visit(s.orelse)
            elif isinstance(s, ast.Try):
                visit(s.body)
                for h in s.handlers:
                    visit(h.body)
                visit(s.orelse)
                visit(s.finalbody)

    visit(tree.body)
    return out


def torch_importers(package_dir: Path, package: str, allowed=TORCH_ALLOWED) -> dict[str, list[str]]:
    """``{module: [torch imports]}`` for modules outside ``allowed`` that import torch anywhere
    (module level or inside a function)."""
    mods = _modules(package_dir, package)
    bad = {}
    for name, path in mods.items():
        if any(name == a or name.startswith(a + ".") for a in allowed):
            continue
        tree = ast.parse(path.read_text(), str(path))
        hits = sorted(
            m
            for m in _imported(name, _is_package(name, path), _all_imports(tree), set(mods))
            if m.split(".")[0] in TORCH_MODULES
        )
        # importlib.import_module("torch") and __import__("torch") count too.
        for call in ast.walk(tree):
            if (
                isinstance(call, ast.Call)
                and call.args
                and isinstance(call.args[0], ast.Constant)
                and isinstance(call.args[0].value, str)
                and call.args[0].value.split(".")[0] in TORCH_MODULES
                and ast.unparse(call.func) in ("importlib.import_module", "import_module", "__import__")
            ):
                hits.append(call.args[0].value)
        if hits:
            bad[name] = hits
    return bad


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports at import time}``."""
    mods = _modules(package_dir, package)
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = _imported(name, _is_package(name, path), _top_level_imports(tree), set(mods))
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in sccs:
        # Walk from the smallest member until a module repeats: that walk closes a cycle.
        start = min(comp)
        path, seen = [start], {start: 0}
        while True:
            nxt = min(w for w in graph[path[-1]] if w in comp)
            if nxt in seen:
                cycles.append(path[seen[nxt] :] + [nxt])
                break
            seen[nxt] = len(path)
            path.append(nxt)
    return cycles


def catalogue_registrations(package_dir: Path, package: str) -> dict[str, list[str]]:
    """``{module: [what]}`` for modules outside ``<package>.catalogue`` that register or build
    catalogue entries, or (block files: modules directly in the package) import the catalogue."""
    mods = _modules(package_dir, package)
    out = {}
    for name, path in mods.items():
        if name == f"{package}.catalogue" or name.startswith(f"{package}.catalogue."):
            continue
        tree = ast.parse(path.read_text(), str(path))
        hits = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if re.fullmatch(r"(\w+\.)*(catalogue\.)?(register|Entry)", func) and (
                    func.split(".")[-1] == "Entry" or "catalogue" in func or func == "register"
                ):
                    hits.append(f"line {node.lineno}: {func}(...)")
        block_file = name.count(".") == 1 and path.name not in ("__init__.py", "__main__.py")
        if block_file:
            for m in _imported(name, False, _all_imports(tree), set(mods)):
                if m == f"{package}.catalogue" or m.startswith(f"{package}.catalogue."):
                    hits.append(f"imports {m}")
        if hits:
            out[name] = hits
    return out


# --------------------------------------------------------------------------- the checks themselves


def _write(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


def test_torch_scan_sees_function_level_and_dynamic_imports(tmp_path):
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "block.py": "def f():\n    import torch.nn as tnn\n    return tnn\n",
            "other.py": "import importlib\nT = importlib.import_module('torchvision.ops')\n",
            "clean.py": "import numpy as np\nfrom . import block\n",
            "convert/__init__.py": "import torch\n",
        },
    )
    bad = torch_importers(root, "pkg", allowed=("pkg.convert",))
    assert bad == {"pkg.block": ["torch.nn"], "pkg.other": ["torchvision.ops"]}


def test_cycle_scan_finds_a_cycle_through_a_package_init(tmp_path):
    root = _write(
        tmp_path,
        {
            "__init__.py": "from pkg import a\n",
            "a.py": "from pkg.sub import b\n",
            "sub/__init__.py": "",
            "sub/b.py": (
                "from .. import c\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n"
            ),
            "c.py": "import pkg.a\ndef late():\n    import pkg.d\n",
            "d.py": "from pkg import c\n",
        },
    )
    graph = import_graph(root, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.c"}  # the TYPE_CHECKING import does not run
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_registration_scan_sees_entries_in_block_files(tmp_path):
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "block.py": "from pkg import catalogue\ncatalogue.register(catalogue.Entry(name='x'))\n",
            "quiet.py": "from pkg.catalogue import image_batch\n",
            "catalogue/__init__.py": "def register(e): pass\nclass Entry: pass\n",
            "catalogue/block.py": "from pkg.catalogue import Entry, register\nregister(Entry())\n",
        },
    )
    found = catalogue_registrations(root, "pkg")
    assert set(found) == {"pkg.block", "pkg.quiet"}
    assert "line 2: catalogue.register(...)" in found["pkg.block"]
    assert "imports pkg.catalogue" in found["pkg.quiet"]


# --------------------------------------------------------------------------- the package


def test_only_convert_testing_and_catalogue_import_torch():
    bad = torch_importers(PACKAGE, "flax_attn")
    assert not bad, f"modules outside {TORCH_ALLOWED} import torch: {bad}"


def test_no_import_cycle_in_the_package():
    cycles = import_cycles(import_graph(PACKAGE, "flax_attn"))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_block_files_hold_no_catalogue_entries():
    found = catalogue_registrations(PACKAGE, "flax_attn")
    assert not found, f"catalogue entries belong in flax_attn/catalogue/<family>.py: {found}"


def test_every_family_has_its_catalogue_file():
    for e in catalogue.entries():
        assert importlib.util.find_spec(f"flax_attn.{e.family}") is not None, e.name
        assert e.family in catalogue.families(), f"{e.name}: no flax_attn/catalogue/{e.family}.py"


def _readme_names() -> list[str]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("<!-- BEGIN BLOCK TABLE -->") : text.index("<!-- END BLOCK TABLE -->")]
    rows = [r.split("|") for r in table.splitlines() if r.startswith("| `")]
    names = [re.fullmatch(r" `([\w.]+)\(.*\)` ", r[3]).group(1) for r in rows]
    assert len(names) == len(catalogue.entries())
    return names


def test_every_readme_class_is_public_and_importable():
    for dotted in _readme_names():
        module, _, name = dotted.rpartition(".")
        assert not any(part.startswith("_") for part in dotted.split(".")), dotted
        family = importlib.import_module(module)
        assert module.count(".") == 1 and not module.startswith("flax_attn.catalogue"), f"{dotted}: not in a block file"
        obj = getattr(family, name)
        assert (
            name in getattr(family, "__all__", ()) or getattr(importlib.import_module("flax_attn"), name, None) is obj
        )


def test_readme_names_what_each_entry_builds():
    # The named object is the entry's own factory, or the class it builds.
    for e, dotted in zip(sorted(catalogue.entries(), key=lambda e: (e.family, e.name)), _readme_names()):
        module, _, name = dotted.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        assert obj is e.flax or obj is e.flax_class, (e.name, dotted)


# --------------------------------------------------------------------------- one source per fact


def test_entry_layouts_are_read_from_the_class():
    for e in catalogue.entries():
        assert e.layouts == tuple(e.flax_class.torch_layouts), e.name


def test_entry_refuses_layouts_its_class_does_not_list_in_order():
    from flax_attn.se import SELayer, se_resnet18

    base = dict(name="x", family="se", paper="p", inputs=catalogue.image_batch(1, 8, 8, 16))
    with pytest.raises(ValueError, match=r"expected a subsequence of \('timm', 'senet'\), got \('senet', 'timm'\)"):
        catalogue.Entry(flax=se_resnet18, layouts=("senet", "timm"), **base)
    with pytest.raises(ValueError, match="SELayer.torch_layouts"):
        catalogue.Entry(flax=SELayer, config=dict(channel=16), layouts=("senet",), **base)
    assert catalogue.Entry(flax=SELayer, config=dict(channel=16), layouts=("timm",), **base).layouts == ("timm",)


def test_family_states_the_shared_facts_once(monkeypatch):
    from flax_attn.se import SEBasicBlock, SELayer

    monkeypatch.setattr(catalogue, "_REGISTRY", {})
    add = catalogue.family("se", paper="p", arxiv="1", train_mode=False)
    inputs = catalogue.image_batch(1, 8, 8, 16)
    plain = add(name="a", flax=SELayer, config=dict(channel=16), inputs=inputs)
    assert (plain.family, plain.paper, plain.arxiv, plain.train_mode) == ("se", "p", "1", False)
    assert plain.torch == "flax_attn.testing.torch_ref.se:SELayer"  # named like `flax` by default
    own = add(name="b", flax=SEBasicBlock, torch="se_basic_block", paper="q", train_mode=True, inputs=inputs)
    assert (own.torch, own.paper, own.train_mode) == ("flax_attn.testing.torch_ref.se:se_basic_block", "q", True)
    assert add(name="c", flax=SELayer, torch=None, inputs=inputs).torch is None
    assert sorted(catalogue._REGISTRY) == ["a", "b", "c"]
    with pytest.raises(
        TypeError, match=r"catalogue.family\('se'\): `shared` must name Entry fields .*\['trian_mode'\]"
    ):
        catalogue.family("se", paper="p", trian_mode=False)
    with pytest.raises(TypeError, match=r"other than \['family', 'flax', 'name', 'torch'\], got \['torch'\]"):
        catalogue.family("se", paper="p", torch="x")


@pytest.mark.parametrize("name", ["SELayer", "SEBasicBlock", "SEBottleneck", "SEResNet"])
def test_se_default_layout_is_the_first_torch_layout(name):
    """``layout=None`` converts as the class's first ``torch_layouts`` entry, and the other
    layouts name other keys (or are refused for the default style): the first is the default."""
    import jax.numpy as jnp

    from flax_attn import se
    from flax_attn.convert import mapping

    cls = getattr(se, name)
    args = {
        "SELayer": dict(channel=32),
        "SEBasicBlock": dict(inplanes=32, planes=32),
        "SEBottleneck": dict(inplanes=32, planes=8),
        "SEResNet": dict(layers=(1, 1, 1, 1), num_classes=3),
    }[name]
    module = cls(**args)
    x = jnp.zeros((1, 33, 29, 3 if name == "SEResNet" else 32))
    default = mapping(module, x)
    first, *others = cls.torch_layouts
    assert mapping(module, x, layout=first) == default
    for other in others:
        try:
            assert mapping(module, x, layout=other) != default, other
        except ValueError as e:  # SEResNet: a layout of the other style is refused
            assert f"layout {other!r} does not match se_style" in str(e)
