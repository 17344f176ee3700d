"""The training library across devices and processes, in subprocesses.

* 8 fake CPU devices give the same losses, parameters and BatchNorm statistics as 1 device for
  the same global batch (so BatchNorm statistics are global under jit).
* 2 processes x 2 fake devices (jax.distributed on localhost, gloo collectives) give the same
  losses as 1 process x 4 devices.
* A run killed with SIGKILL mid-training and restarted ends bit-identical to an uninterrupted run;
  SIGTERM checkpoints the current step and exits with 143.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from flax_attn.training import configs as cfg_lib
from flax_attn.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

# Runs a config in a fresh process (devices from XLA_FLAGS, distributed from JAX_* variables),
# optionally slowed down so a test can interrupt it, and dumps the final parameters.
WORKER = r"""
import json, sys, time
args = json.loads(sys.argv[1])
from flax_attn.training.sharding import initialize_distributed
initialize_distributed()
import jax, numpy as np
from flax_attn.training import data as data_lib
from flax_attn.training.configs import get_config
from flax_attn.training.trainer import Trainer
if args.get("delay"):
    orig = data_lib.DigitsSource.batch
    def slow(self, step, rows=None):
        time.sleep(args["delay"])
        return orig(self, step, rows)
    data_lib.DigitsSource.batch = slow
cfg = get_config(args["config"], args["overrides"])
res = Trainer(cfg, args["workdir"]).run()
if jax.process_index() == 0:
    tree = {"params": res.state.params, "batch_stats": res.state.batch_stats}
    flat = jax.tree_util.tree_leaves_with_path(tree)
    np.savez(args["workdir"] + "/final_vars.npz",
             **{jax.tree_util.keystr(p): np.asarray(x.addressable_data(0)) for p, x in flat})
print("devices", jax.device_count(), "processes", jax.process_count(), "status", res.status, flush=True)
sys.exit(143 if res.status == "preempted" else 0)
"""

SMALL = [
    "model.kwargs.widths=(8, 16)",
    "data.batch_size=32",
    "steps=6",
    "log_every=1",
    "eval_every=0",
    "checkpoint.every_steps=0",
    "checkpoint.async_save=False",
    "optim.warmup_steps=1",
    "data.eval_batch_size=64",
]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        # Extend, not replace, the caller's flags: a run under a non-native CPU setting
        # (--xla_cpu_max_isa) must compile its children the same way as the in-process reference,
        # or the bit-exact comparisons would compare two ISAs' rounding.
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip(),
        **extra,
    )
    return env


def _start(workdir: Path, overrides, devices: int, delay: float = 0.0, **env) -> subprocess.Popen:
    args = json.dumps({"config": "classify", "overrides": list(overrides), "workdir": str(workdir), "delay": delay})
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, args],
        env=_env(devices, **env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(p: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def _losses(workdir: Path) -> list[float]:
    lines = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [ln["loss"] for ln in lines if ln["kind"] == "train"]


def _vars(workdir: Path) -> dict:
    with np.load(workdir / "final_vars.npz") as z:
        return {k: z[k] for k in z.files}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_device_and_multi_host_match_single_device(tmp_path):
    # All runs start at once: their start-up (imports, compilation) overlaps.
    port = _free_port()
    coord = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    procs = {
        "d8": _start(tmp_path / "d8", SMALL, 8),
        "d4": _start(tmp_path / "d4", SMALL, 4),
        "h0": _start(tmp_path / "h2x2", SMALL, 2, JAX_PROCESS_ID="0", **coord),
        "h1": _start(tmp_path / "h2x2", SMALL, 2, JAX_PROCESS_ID="1", **coord),
    }
    one = Trainer(cfg_lib.get_config("classify", SMALL), tmp_path / "d1").run()
    outs = {k: _finish(p) for k, p in procs.items()}
    for k, (rc, out) in outs.items():
        assert rc == 0, f"{k} failed:\n{out[-3000:]}"
    assert "devices 8 processes 1" in outs["d8"][1]
    assert "devices 4 processes 2" in outs["h0"][1]

    ref_losses = _losses(tmp_path / "d1")
    assert len(ref_losses) == 6
    # Same global batch, different reduction trees across devices: float32 round-off only.
    np.testing.assert_allclose(_losses(tmp_path / "d8"), ref_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_losses(tmp_path / "h2x2"), _losses(tmp_path / "d4"), rtol=1e-5, atol=1e-6)

    ref_vars = {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(
            {"params": one.state.params, "batch_stats": one.state.batch_stats}
        )
    }
    d8, h22, d4 = _vars(tmp_path / "d8"), _vars(tmp_path / "h2x2"), _vars(tmp_path / "d4")
    assert set(d8) == set(ref_vars) and any("batch_stats" in k for k in d8)
    for k in ref_vars:
        # BatchNorm running statistics after 6 steps equal the single-device ones: the batch
        # mean/variance under jit over a sharded batch are global.
        np.testing.assert_allclose(d8[k], ref_vars[k], rtol=1e-4, atol=1e-5, err_msg=k)
        np.testing.assert_allclose(h22[k], d4[k], rtol=1e-4, atol=1e-5, err_msg=k)
    final = {k: json.loads((tmp_path / k / "final_metrics.json").read_text()) for k in ("d1", "d8", "h2x2")}
    np.testing.assert_allclose(final["d8"]["loss"], final["d1"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(final["h2x2"]["loss"], final["d1"]["loss"], rtol=1e-5)


INTERRUPT = [
    "model.kwargs.widths=(8, 16)",
    "data.batch_size=16",
    "steps=40",
    "log_every=1",
    "eval_every=20",
    "checkpoint.every_steps=5",
    "checkpoint.max_to_keep=2",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    res = Trainer(cfg_lib.get_config("classify", INTERRUPT), work).run()
    return work, res


def _wait_for_step(workdir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> int:
    t0 = time.time()
    path = workdir / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"worker ended early:\n{proc.communicate()[0][-3000:]}")
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.endswith("}")]
            if lines and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        time.sleep(0.02)
    raise AssertionError("worker too slow")


def test_sigkill_and_restart_is_bit_identical(tmp_path, uninterrupted):
    ref_dir, ref = uninterrupted
    work = tmp_path / "run"
    p = _start(work, INTERRUPT, 1, delay=0.15)
    reached = _wait_for_step(work, p, 13)
    p.send_signal(signal.SIGKILL)  # possibly in the middle of an async checkpoint write
    p.wait()
    assert reached < 40 and not (work / "final_metrics.json").exists()
    rc, out = _finish(_start(work, INTERRUPT, 1))
    assert rc == 0, out[-3000:]
    assert "resumed from step" in out
    got = _vars(work)
    for p_, x in jax.tree_util.tree_leaves_with_path(ref.state.params):
        np.testing.assert_array_equal(got["['params']" + jax.tree_util.keystr(p_)], np.asarray(x))
    assert (work / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text()
    assert (work / "final_metrics.json").read_text() == (ref_dir / "final_metrics.json").read_text()


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path, uninterrupted):
    ref_dir, ref = uninterrupted
    work = tmp_path / "run"
    p = _start(work, INTERRUPT, 1, delay=0.15)
    _wait_for_step(work, p, 7)
    p.send_signal(signal.SIGTERM)
    rc, out = _finish(p)
    assert rc == 143, out[-3000:]
    stopped = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    steps = sorted(int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit())
    assert steps[-1] == stopped and stopped < 40, (steps, stopped, out[-2000:])
    assert f"preempted: checkpoint saved at step {stopped}" in out
    res = Trainer(cfg_lib.get_config("classify", INTERRUPT), work).run()  # resume in this process
    assert res.step == 40
    for (p_, x), (_, y) in zip(
        jax.tree_util.tree_leaves_with_path(res.state.params),
        jax.tree_util.tree_leaves_with_path(ref.state.params),
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p_))
    assert (work / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text()
