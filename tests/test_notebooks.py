"""Notebooks: each .ipynb is paired with its jupytext .py, stored without outputs, and runs end to end."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("torch")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def _sources(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("script", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_paired_and_stripped(script):
    ipynb = script.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `jupytext --to ipynb {script.name}`"
    nb = jupytext.read(ipynb)
    assert _sources(nb) == _sources(jupytext.read(script)), f"{ipynb.name} out of sync: `jupytext --sync`"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, (
                f"{ipynb.name} has stored outputs: strip them before committing"
            )


def _images(nb):
    """The PNG images among the executed cells' outputs (what Jupyter shows inline)."""
    return [
        out["data"]["image/png"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]


@pytest.mark.parametrize("script", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_renders_figures(script, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAX_ATTN_FIG_DIR", str(tmp_path))
    # No MPLBACKEND here: the kernel must pick the inline backend itself, as in Jupyter.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = jupytext.read(script.with_suffix(".ipynb"))
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(script.parent)}}
    )
    client.execute()  # raises CellExecutionError with the traceback on any failing cell
    figures = sorted(tmp_path.glob("*.png"))
    assert figures, f"{script.name} rendered no figure"
    for fig in figures:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 2000, fig.name
    # Every saved figure is also shown inline (the notebooks used to draw on Agg only: no output).
    images = _images(nb)
    assert len(images) >= len(figures), (
        f"{script.name}: {len(images)} inline images for {len(figures)} saved figures {[f.name for f in figures]}"
    )
    for img in images:
        assert base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n"
