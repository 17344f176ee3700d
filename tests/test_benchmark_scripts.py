"""Every script in benchmarks/ imports and parses its arguments (`--help`), so a moved helper cannot
break one silently: no timed work runs here, the benchmarks themselves are run by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_the_scripts_are_found():
    assert {"run.py", "neighborhood_nd.py", "train_throughput.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_and_shows_its_help(script):
    if script == "parity_conditioning.py":
        pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script} --help exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "usage:" in proc.stdout, proc.stdout[-2000:]
