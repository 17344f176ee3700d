"""python -m flax_attn: blocks, convert, verify, demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax_attn.__main__ import main
from flax_attn.convert import load_variables, save_state_dict

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def _mha_checkpoint(tmp_path):
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(24, 4, kdim=20, vdim=12, add_bias_kv=True, batch_first=True)
    path = tmp_path / "mha.pth"
    torch.save(tm.state_dict(), path)
    return tm, path


def test_blocks_lists_catalogue(capsys):
    assert main(["blocks"]) == 0
    assert "multihead_attention" in capsys.readouterr().out


@pytest.mark.parametrize("out_name", ["mha.msgpack", "mha_orbax"])
def test_convert_writes_loadable_variables(tmp_path, capsys, out_name):
    tm, path = _mha_checkpoint(tmp_path)
    out = tmp_path / out_name
    assert main(["convert", str(path), str(out), "--block", "multihead_attention"]) == 0
    assert "converted" in capsys.readouterr().out
    v = load_variables(out)
    np.testing.assert_array_equal(np.asarray(v["params"]["k_proj"]["kernel"]), tm.k_proj_weight.detach().numpy().T)


def test_verify_passes_on_matching_checkpoint_and_fails_on_wrong_one(tmp_path, capsys):
    _, path = _mha_checkpoint(tmp_path)
    assert main(["verify", "--block", "multihead_attention", "--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "max abs err" in out
    bad = tmp_path / "bad.pth"
    save_state_dict({"in_proj_bias": np.zeros(3, np.float32)}, bad)
    with pytest.raises(RuntimeError, match="Missing key"):
        main(["verify", "--block", "multihead_attention", "--checkpoint", str(bad)])


def test_verify_with_config_override(capsys):
    assert (
        main(["verify", "--block", "multihead_attention", "--config", "kdim=None", "vdim=None", "add_bias_kv=False"])
        == 0
    )


def test_module_entry_point_runs_as_subprocess():
    res = subprocess.run([sys.executable, "-m", "flax_attn", "blocks"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "projected_multi_head_attention" in res.stdout
