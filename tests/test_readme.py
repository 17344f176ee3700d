"""The README's block table is generated from the catalogue, and importing flax_attn needs no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flax_attn.catalogue import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_block_table_is_in_sync_with_the_catalogue():
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- BEGIN BLOCK TABLE -->") + len("<!-- BEGIN BLOCK TABLE -->")
    end = text.index("<!-- END BLOCK TABLE -->")
    assert text[start:end].strip() == markdown_table().strip(), (
        "README block table is stale: regenerate it with `python -m flax_attn readme-table`"
    )


def test_import_does_not_import_torch():
    code = (
        "import sys, flax_attn, flax_attn.convert, flax_attn.catalogue; "
        "flax_attn.catalogue.entries(); print('torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
