"""Training never discards a readable checkpoint: config mismatches are refused (or --reset keeps the
old run aside), flipped bits are caught by the checkpoint digest, the last good state is finite,
torn metrics lines are tolerated, and bad overrides are one-line exit-2 errors before any work."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from flax_attn.training import configs as cfg_lib
from flax_attn.training.checkpoint import Checkpointer, CheckpointMismatchError, CorruptCheckpointWarning
from flax_attn.training.cli import main
from flax_attn.training.trainer import ConfigMismatchError, NonFiniteLossError, Trainer

TINY = [
    "model.kwargs.widths=(8, 16)",
    "data.batch_size=16",
    "steps=4",
    "log_every=1",
    "eval_every=0",
    "checkpoint.every_steps=2",
    "checkpoint.max_to_keep=3",
    "checkpoint.async_save=False",
    "optim.warmup_steps=1",
]


def _cli(workdir: Path, overrides, *extra) -> int:
    args = ["--config", "classify", "--workdir", str(workdir), *extra]
    for o in overrides:
        args += ["--override", o]
    return main(args)


def _snapshot(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (checkpoints at steps 2 and 4) and its final state."""
    work = tmp_path_factory.mktemp("finished") / "run"
    result = Trainer(cfg_lib.get_config("classify", TINY), work).run()
    assert result.step == 4
    return work, jax.device_get(result.state)


def _copy(finished, tmp_path) -> Path:
    work = tmp_path / "run"
    shutil.copytree(finished[0], work)
    return work


# --------------------------------------------------------------------------- config mismatch


def test_a_changed_model_is_refused_before_anything_moves(finished, tmp_path, capsys):
    work = _copy(finished, tmp_path)
    before = _snapshot(work)
    changed = [*TINY, "model.kwargs.widths=(8, 32)"]
    with pytest.raises(ConfigMismatchError, match=r"model\.kwargs\.widths: \[8, 16\] there, \[8, 32\] now") as e:
        Trainer(cfg_lib.get_config("classify", changed), work).run()
    assert e.value.keys == ["model.kwargs.widths"]
    capsys.readouterr()
    assert _cli(work, changed) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--reset" in err and "widths" in err, err
    assert _snapshot(work) == before  # nothing moved, quarantined, truncated or rewritten
    assert not (work / "corrupt").exists()


def test_reset_keeps_the_old_run_aside_and_starts_afresh(finished, tmp_path, capsys):
    work = _copy(finished, tmp_path)
    before = _snapshot(work)
    assert _cli(work, [*TINY, "model.kwargs.widths=(8, 32)", "steps=2"], "--reset") == 0
    assert "moved to" in capsys.readouterr().out
    (previous,) = (work / "previous").iterdir()
    assert {k: v for k, v in _snapshot(previous).items()} == before  # the old run, intact
    assert json.loads((work / "config.json").read_text())["model"]["kwargs"]["widths"] == [8, 32]
    assert json.loads((work / "final_metrics.json").read_text())["step"] == 2


def test_cadence_and_length_may_change_on_resume(finished, tmp_path, capsys):
    work = _copy(finished, tmp_path)
    config = cfg_lib.get_config("classify", [*TINY, "log_every=2", "checkpoint.max_to_keep=2", "steps=6"])
    res = Trainer(config, work).run()
    assert res.step == 6  # extending a finished run is a resume, not a new run
    assert "resumed from step 4" in capsys.readouterr().out and not (work / "previous").exists()


def test_a_readable_checkpoint_of_another_structure_is_not_quarantined(finished, tmp_path):
    work = _copy(finished, tmp_path)
    other = Trainer(cfg_lib.get_config("classify", [*TINY, "model.kwargs.widths=(8, 32)"]), tmp_path / "x")
    ck = Checkpointer(work, other.config.checkpoint)
    with pytest.raises(CheckpointMismatchError, match="holds another model.*nothing was moved"):
        ck.restore_latest(other.abstract_state)
    ck.close()
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert not (work / "corrupt").exists()


# --------------------------------------------------------------------------- integrity


def _data_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


def test_flipped_bits_in_orbax_data_never_restore_silently(finished, tmp_path):
    work0, final_state = finished
    config = cfg_lib.get_config("classify", TINY)
    abstract = Trainer(config, tmp_path / "abs").abstract_state
    rng = np.random.default_rng(0)
    outcomes = {"fell back": 0, "restored intact": 0}
    for i in range(8):
        work = tmp_path / f"flip{i}"
        shutil.copytree(work0, work)
        files = _data_files(work / "checkpoints" / "4")
        sizes = np.array([f.stat().st_size for f in files], float)
        f = files[rng.choice(len(files), p=sizes / sizes.sum())]
        data = bytearray(f.read_bytes())
        at = int(rng.integers(len(data)))
        data[at] ^= 1 << int(rng.integers(8))
        f.write_bytes(bytes(data))
        ck = Checkpointer(work, config.checkpoint)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state, _ = ck.restore_latest(abstract)
        ck.close()
        if int(state.step) == 4:
            # Only a flip that changed nothing the arrays hold may restore step 4, and then exactly
            # (parameters, batch statistics and optimiser moments alike).
            assert not caught
            for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(final_state)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            outcomes["restored intact"] += 1
        else:
            assert int(state.step) == 2
            assert any(issubclass(w.category, CorruptCheckpointWarning) for w in caught)
            outcomes["fell back"] += 1
    assert outcomes["fell back"] >= 1, outcomes
    print(outcomes)


def test_a_value_changed_behind_orbax_is_caught_by_the_digest(finished, tmp_path):
    # Rewrite step 4 with other values but keep the digest of the originals: what a flipped bit
    # in an uncompressed chunk amounts to. Orbax reads it without complaint; the digest does not.
    work = _copy(finished, tmp_path)
    config = cfg_lib.get_config("classify", TINY)
    t = Trainer(config, tmp_path / "abs")
    ck = Checkpointer(work, config.checkpoint)
    state, data = ck.restore(4, t.abstract_state)
    leaf = jax.tree_util.tree_leaves(state.params)[0]
    tampered = state.replace(params=jax.tree_util.tree_map(lambda x: x, state.params))
    tampered = jax.tree_util.tree_map(lambda x: x + 1.0 if x is leaf else x, tampered)
    shutil.rmtree(work / "checkpoints" / "4")
    ck.manager.reload()
    ck.save(4, tampered, {k: v for k, v in data.items() if k != "state_sha256"})
    ck.wait()
    meta = work / "checkpoints" / "4" / "data" / "metadata"
    rec = json.loads(meta.read_text())
    rec["state_sha256"] = data["state_sha256"]
    meta.write_text(json.dumps(rec))
    ck.close()
    ck = Checkpointer(work, config.checkpoint)
    with pytest.warns(CorruptCheckpointWarning, match="SHA-256"):
        restored, _ = ck.restore_latest(t.abstract_state)
    ck.close()
    assert int(restored.step) == 2 and (work / "corrupt").is_dir()


def test_a_huge_learning_rate_leaves_a_finite_last_good_checkpoint(tmp_path):
    config = cfg_lib.get_config("classify", [*TINY, "optim.learning_rate=1e300", "optim.warmup_steps=0"])
    with pytest.raises(NonFiniteLossError, match=r"last good state \(step (\d+)\) is checkpointed") as e:
        Trainer(config, tmp_path).run()
    assert "parameters or optimiser state after the update" in str(e.value)
    ck = Checkpointer(tmp_path, config.checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCheckpointWarning)  # it must restore, not be rejected
        state, _ = ck.restore_latest(Trainer(config, tmp_path / "abs").abstract_state)
    ck.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_a_torn_last_metrics_line_does_not_stop_a_restart(finished, tmp_path):
    work = _copy(finished, tmp_path)
    full = (work / "metrics.jsonl").read_text()
    (work / "final_metrics.json").unlink()
    shutil.rmtree(work / "checkpoints" / "4")  # resume from step 2, as after a kill
    lines = full.splitlines()
    keep = [ln for ln in lines if json.loads(ln)["step"] <= 3]
    (work / "metrics.jsonl").write_text("\n".join(keep) + "\n" + keep[-1][:17])  # killed mid-line
    res = Trainer(cfg_lib.get_config("classify", TINY), work).run()
    assert res.step == 4
    assert (work / "metrics.jsonl").read_text() == full


# --------------------------------------------------------------------------- overrides and the CLI

BAD_OVERRIDES = [
    ("log_every=0", "log_every: expected >= 1, got 0"),
    ("data.batch_size=0", "data.batch_size: expected >= 1, got 0"),
    ("optim.learning_rate=abc", "optim.learning_rate: expected a number, got 'abc'"),
    ("optim.learning_rate=nan", "optim.learning_rate: expected a number, got 'nan'"),
    ("optim.learning_rate=1e999", "optim.learning_rate: expected a finite number, got inf"),
    ("optim.learning_rate=-1", "optim.learning_rate: expected > 0, got -1.0"),
    ("steps=-5", "steps: expected >= 1, got -5"),
    ("steps=2.5", "steps: expected int, got 2.5"),
    ("optim.b2=1.0", "optim.b2: expected >= 0 and < 1, got 1.0"),
    ("data.test_fraction=1", "data.test_fraction: expected > 0 and < 1, got 1.0"),
    ("optim.name=lion", "optim.name: expected one of ['adamw', 'sgd'], got 'lion'"),
    ("precision=float16", "precision: expected one of ['float32', 'bfloat16'], got 'float16'"),
    ("lrate=3", "has no field 'lrate'"),
    ("steps", "must look like key=value"),
    ("steps.x=3", "steps is 800, which has no fields"),
    # an optional field says why the value fits none of its types
    ("optim.clip_grad_norm=fast", "does not fit float | None (override optim.clip_grad_norm: expected a number"),
]


@pytest.mark.parametrize("override,message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_overrides_are_one_line_exit_2_before_any_work(tmp_path, capsys, override, message):
    with pytest.raises(cfg_lib.ConfigError) as e:
        cfg_lib.get_config("classify", [override])
    assert message in str(e.value)
    work = tmp_path / "never"
    assert _cli(work, [override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not work.exists()


def test_cli_unknown_config_and_unreadable_init_from_are_exit_2(tmp_path, capsys):
    assert main(["--config", "nope", "--workdir", str(tmp_path / "w")]) == 2
    assert "unknown config 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert _cli(tmp_path / "w", [*TINY, "steps=1"], "--init-from", str(bad)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too short for a safetensors file" in err, err
