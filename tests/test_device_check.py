"""benchmarks/device_check.py --smoke: the one-shot hardware check runs end to end on a CPU."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_checks_every_kernel(tmp_path):
    device_check = _load()
    assert device_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "device_check.md").read_text()
    rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith("| op ")]
    for op in ("criss_cross", "neighborhood", "window"):
        for dtype in ("float32", "bfloat16"):
            # Every kernel's forward and gradients were compared with XLA, and passed.
            check = [r for r in rows if re.match(rf"\| {op} \| pallas \| {dtype} \| \d\.\de[+-]\d\d \| \d\.\de", r)]
            assert len(check) == 1 and check[0].rstrip().endswith("| pass |"), (op, dtype, check)
            # Pallas and XLA were both timed, forward and forward+backward.
            for form in ("pallas", "xla"):
                timed = [r for r in rows if r.startswith(f"| {op} | {form} | {dtype} |") and r not in check]
                assert len(timed) == 1 and re.search(r"\| [\d,]+ \| [\d,]+ \|", timed[0]), (op, form, timed)
    assert "Nothing: a smoke run interprets the kernels on a CPU." in text


def test_full_run_needs_a_device(tmp_path, capsys):
    device_check = _load()
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("a GPU or TPU is present")
    with pytest.raises(SystemExit):
        device_check.main(["--out", str(tmp_path)])
    assert "the full check needs one (use --smoke on a CPU)" in capsys.readouterr().err
