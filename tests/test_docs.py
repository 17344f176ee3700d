"""The API reference: one page per block family (and per library module), built strictly by mkdocs."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flax import linen as nn

from flax_attn import catalogue

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("layers", "convert", "catalogue", "ops", "sr_metrics")
FAMILIES = sorted({e.family for e in catalogue.entries()})


def _nav_pages(nav):
    for item in nav:
        for value in item.values():
            if isinstance(value, list):
                yield from _nav_pages(value)
            else:
                yield value


def _public_classes(module_name):
    module = importlib.import_module(f"flax_attn.{module_name}")
    return [n for n in module.__all__ if inspect.isclass(getattr(module, n))]


def _declared_here(cls, field):
    """Whether ``field`` is declared by flax-attn (not inherited from a Flax layer such as nn.GroupNorm)."""
    owner = next(k for k in cls.__mro__ if field in vars(k).get("__annotations__", {}))
    return owner.__module__.startswith("flax_attn")


def test_every_family_and_library_module_has_a_page_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = set(_nav_pages(config["nav"]))
    for name in (*FAMILIES, *LIBRARY):
        page = ROOT / "docs" / "api" / f"{name}.md"
        assert f"api/{name}.md" in pages, f"mkdocs.yml nav lacks api/{name}.md"
        assert f"::: flax_attn.{name}\n" in page.read_text(), f"{page} does not render flax_attn.{name}"


def _build(config_file: Path, site: Path):
    return subprocess.run(
        # Not -q: it hides the warnings, and with them what --strict counts.
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_file), "-d", str(site)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_site_builds_strictly_and_lists_every_public_class(tmp_path):
    pytest.importorskip("mkdocstrings")
    res = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert res.returncode == 0, res.stderr
    for family in (*FAMILIES, *LIBRARY):
        html = (tmp_path / "site" / "api" / family / "index.html").read_text()
        ids = set(re.findall(r'id="(flax_attn\.[\w.]+)"', html))
        missing = [c for c in _public_classes(family) if f"flax_attn.{family}.{c}" not in ids]
        assert not missing, f"api/{family} does not document {missing}"
        module = importlib.import_module(f"flax_attn.{family}")
        for c in _public_classes(family):
            cls = getattr(module, c)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                fields = [
                    f.name
                    for f in dataclasses.fields(cls)
                    if f.name not in ("parent", "name") and _declared_here(cls, f.name)
                ]
                undocumented = [f for f in fields if f"flax_attn.{family}.{c}.{f}" not in ids]
                assert not undocumented, f"api/{family}: {c} does not list the arguments {undocumented}"
    # Arguments are listed (the Attributes section) and so is the call signature.
    cbam = (tmp_path / "site" / "api" / "cbam" / "index.html").read_text()
    assert "reduction_ratio" in cbam and 'id="flax_attn.cbam.CBAM.__call__"' in cbam
    # The `Example:` doctests render as highlighted code, not as nested block quotes.
    assert "<blockquote>" not in cbam and '<span class="gp">&gt;&gt;&gt; </span>' in cbam


def test_a_broken_reference_fails_the_build(tmp_path):
    # Warnings are errors: a page naming a missing object must fail, not render an empty page.
    pytest.importorskip("mkdocstrings")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\n::: flax_attn.cbam.NoSuchBlock\n")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir=str(docs), nav=[{"Home": "index.md"}])
    python = config["plugins"][1]["mkdocstrings"]["handlers"]["python"]
    python["options"]["extensions"] = [str(ROOT / e) for e in python["options"]["extensions"]]
    cfg = tmp_path / "mkdocs.yml"
    cfg.write_text(yaml.safe_dump(config))
    res = _build(cfg, tmp_path / "site")
    assert res.returncode != 0 and "NoSuchBlock" in res.stderr, res.stderr


def test_every_catalogued_block_has_a_runnable_example():
    # Issue 14 finding 7: public classes without an example. The `>>>` lines run in CI
    # (`make doctest`); this makes sure there is one for every block the catalogue shows users.
    missing = set()
    for entry in catalogue.entries():
        cls = entry.flax if isinstance(entry.flax, type) else type(entry.build_flax())
        if ">>>" not in (cls.__doc__ or ""):
            missing.add(f"{cls.__module__}.{cls.__qualname__}")
    assert not missing, f"no `>>>` example in the docstring of {sorted(missing)}"
