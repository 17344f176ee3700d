"""Atomic conversion outputs: a failure or a kill at every step of a save leaves the old or the new
output readable at the target, the next save succeeds and no temporary survives it; modes follow
the umask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flax_attn.convert import io as cio
from flax_attn.convert import load_variables, save_state_dict, save_variables

ROOT = Path(__file__).resolve().parents[1]

OLD, NEW, NEWER = 0.0, 1.0, 2.0

# (scenario, old output format or None, new format, exchange supported, kill points)
# Points: "mid" = inside the write of the temporary; the others are named by io._fault.
CASES = [
    ("none-dir", None, "orbax", True, ["mid", "save:written", "install:renamed"]),
    ("file-file", "msgpack", "msgpack", True, ["mid", "save:written", "install:renamed"]),
    ("dir-dir", "orbax", "orbax", True, ["mid", "save:written", "install:exchanged"]),
    ("dir-dir", "orbax", "orbax", False, ["save:written", "install:parked", "install:renamed"]),
    ("file-dir", "msgpack", "orbax", True, ["save:written", "install:exchanged"]),
    ("file-dir", "msgpack", "orbax", False, ["save:written", "install:parked", "install:renamed"]),
    ("dir-file", "orbax", "msgpack", True, ["save:written", "install:exchanged"]),
    ("dir-file", "orbax", "msgpack", False, ["install:parked", "install:renamed"]),
]
# What a reader must find after a kill at each point.
AFTER_KILL = {"mid": OLD, "save:written": OLD, "install:parked": OLD, "install:exchanged": NEW, "install:renamed": NEW}

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import numpy as np
    from flax_attn.convert import io as cio, save_variables

    cases = json.loads(sys.argv[1])
    for i, (scenario, old, new, exchange, point) in enumerate(cases):
        pid = os.fork()
        if pid == 0:
            d = Path(sys.argv[2]) / str(i)
            d.mkdir()
            target = d / "ckpt"
            if old is not None:
                save_variables({"w": np.full(4, 0.0, np.float32)}, target, format=old)
            def die(*a, **k):
                os._exit(9)
            if not exchange:
                cio._exchange = lambda a, b: False
            if point == "mid":
                if new == "orbax":
                    os.rename = die  # Orbax renames its own temporary when it finishes writing
                else:
                    os.fsync = die
            else:
                cio._fault = lambda p: die() if p == point else None
            save_variables({"w": np.full(4, 1.0, np.float32)}, target, format=new)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(i, os.waitstatus_to_exitcode(status), flush=True)
    """
)


def _value(target: Path):
    """What a reader finds at ``target`` (None: nothing)."""
    try:
        return float(np.asarray(load_variables(target)["w"])[0])
    except FileNotFoundError:
        return None


def test_a_kill_at_every_step_leaves_old_or_new_and_the_next_save_succeeds(tmp_path):
    runs = [(s, old, new, ex, p) for s, old, new, ex, points in CASES for p in points]
    res = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(runs), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    codes = dict(line.split() for line in res.stdout.splitlines())
    for i, (scenario, old, new, exchange, point) in enumerate(runs):
        label = f"{scenario} exchange={exchange} killed at {point}"
        assert codes[str(i)] == "9", f"{label}: the writer was not killed there (exit {codes[str(i)]})"
        target = tmp_path / str(i) / "ckpt"
        want = AFTER_KILL[point] if old is not None or AFTER_KILL[point] == NEW else None
        assert _value(target) == want, label
        # The next run succeeds and leaves nothing but its output.
        save_variables({"w": np.full(4, NEWER, np.float32)}, target, format=new)
        assert _value(target) == NEWER, label
        assert [p.name for p in target.parent.iterdir()] == ["ckpt"], label


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("point", ["save:written", "install:parked", "install:exchanged", "install:renamed"])
@pytest.mark.parametrize("old,new", [("msgpack", "msgpack"), ("orbax", "orbax"), ("msgpack", "orbax")])
def test_a_failure_at_every_step_keeps_a_readable_output(tmp_path, monkeypatch, exchange, point, old, new):
    target = tmp_path / "ckpt"
    save_variables({"w": np.full(4, OLD, np.float32)}, target, format=old)
    if not exchange:
        monkeypatch.setattr(cio, "_exchange", lambda a, b: False)

    def fail(p):
        if p == point:
            raise OSError(f"injected failure at {p}")

    monkeypatch.setattr(cio, "_fault", fail)
    try:
        save_variables({"w": np.full(4, NEW, np.float32)}, target, format=new)
        reached = False
    except OSError as e:
        assert "injected" in str(e)
        reached = True
    value = _value(target)
    assert value == (NEW if not reached or point in ("install:exchanged", "install:renamed") else OLD)
    monkeypatch.setattr(cio, "_fault", lambda p: None)
    save_variables({"w": np.full(4, NEWER, np.float32)}, target, format=new)
    assert _value(target) == NEWER
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_leftovers_of_earlier_versions_do_not_block_a_save(tmp_path):
    target = tmp_path / "out"
    save_variables({"w": np.zeros(2, np.float32)}, target)
    (tmp_path / ".out.old").mkdir()  # what a crashed 0.1 save left behind
    (tmp_path / ".out.old" / "x").write_text("stale")
    (tmp_path / ".out.tmp").mkdir()
    (tmp_path / ".out.999999999.abc.tmp").write_text("stale")  # a writer that no longer exists
    save_variables({"w": np.ones(2, np.float32)}, target)
    assert _value(target) == 1.0 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_parked_output_is_restored_when_the_writer_died_between_renames(tmp_path):
    target = tmp_path / "out"
    save_variables({"w": np.full(2, 5.0, np.float32)}, target)
    os.rename(target, tmp_path / ".out.999999999.old")  # the state a kill between the renames leaves
    assert _value(target) == 5.0  # load_variables puts it back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    target = tmp_path / "v.msgpack"
    live = tmp_path / f".v.msgpack.{os.getppid()}.x.tmp"  # the test runner's parent is alive
    live.write_bytes(b"in progress")
    save_variables({"w": np.ones(2, np.float32)}, target)
    assert live.exists()


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_output_modes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        files = []
        for name, fmt in (("v.msgpack", None), ("orb", "orbax")):
            save_variables({"w": np.ones(2, np.float32)}, tmp_path / name, format=fmt)
        save_state_dict({"w": np.ones(2, np.float32)}, tmp_path / "w.npz")
        save_state_dict({"w": np.ones(2, np.float32)}, tmp_path / "w.safetensors")
        cio.atomic_write_bytes(tmp_path / "raw.bin", b"x")
        for p in tmp_path.rglob("*"):
            files.append(p)
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode & 0o777), oct(want))
        assert len(files) > 5
    finally:
        os.umask(old)
