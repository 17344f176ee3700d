"""The training library in one process: configs, data, metrics, a few steps of each task,
recompilation, NaN handling, checkpoint fallback and --init-from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn.training import configs as cfg_lib
from flax_attn.training import data as data_lib
from flax_attn.training.checkpoint import CorruptCheckpointWarning
from flax_attn.training.metrics import psnr_y, ssim_y
from flax_attn.training.models import SmallSECNN, TinySR, build_model, pixel_shuffle, resolve
from flax_attn.training.trainer import NonFiniteLossError, Trainer, build_optimizer

# A classify run small enough for a few seconds on a loaded CPU.
TINY_CLASSIFY = [
    "model.kwargs.widths=(8, 16)",
    "data.batch_size=16",
    "steps=12",
    "log_every=1",
    "eval_every=6",
    "checkpoint.every_steps=4",
    "checkpoint.max_to_keep=3",
    "checkpoint.async_save=False",
    "optim.warmup_steps=2",
]
TINY_SUPERRES = [  # the default model (A2N), shrunk
    "model.kwargs.nf=8",
    "model.kwargs.unf=6",
    "model.kwargs.nb=1",
    "data.batch_size=4",
    "data.patch_size=12",
    "data.eval_size=48",
    "data.eval_batch_size=2",
    "data.train_images=('astronaut', 'coffee')",
    "data.eval_images=('camera', 'coins', 'clock')",
    "steps=6",
    "eval_every=3",
    "log_every=1",
    "checkpoint.every_steps=3",
    "optim.warmup_steps=1",
]


def _params(state):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(state.params))


def _assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


# --------------------------------------------------------------------------- configs


def test_overrides_parse_and_validate():
    c = cfg_lib.get_config(
        "classify",
        [
            "optim.learning_rate=1e-2",
            "steps=7",
            "model.kwargs.widths=(4, 8)",
            "model.name=flax_attn.se:SEResNet",
            "optim.clip_grad_norm=None",
        ],
    )
    assert c.optim.learning_rate == 1e-2 and c.steps == 7 and c.model.kwargs["widths"] == (4, 8)
    assert c.model.name == "flax_attn.se:SEResNet" and c.optim.clip_grad_norm is None
    assert cfg_lib.get_config("classify").steps == 800  # overrides never leak into the registry
    with pytest.raises(KeyError, match="no field 'lrate'"):
        cfg_lib.get_config("classify", ["optim.lrate=1"])
    with pytest.raises(ValueError, match="expected int"):
        cfg_lib.get_config("classify", ["steps=abc"])
    with pytest.raises(ValueError, match="key=value"):
        cfg_lib.get_config("classify", ["steps"])
    with pytest.raises(KeyError, match="known configs"):
        cfg_lib.get_config("nope")


def test_every_config_documents_its_command():
    for name, fn in cfg_lib.CONFIGS.items():
        assert f"flax-attn-train --config {name}" in fn.__doc__


@pytest.mark.parametrize("command", ["console_script", "checkout"])
def test_both_commands_reach_the_cli(command, tmp_path):
    """`flax-attn-train` (installed) and `python -m train` (a checkout) are one CLI: a bad config name is
    the same one-line user error (exit 2) from both, before any JAX work."""
    root = Path(__file__).resolve().parents[1]
    if command == "console_script":
        exe = Path(sys.executable).parent / "flax-attn-train"
        if not exe.exists():
            pytest.skip(f"no console script at {exe} (package not pip-installed into this venv)")
        argv = [str(exe)]
    else:
        argv = [sys.executable, "-m", "train"]
    res = subprocess.run(
        [*argv, "--config", "nope", "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=root
    )
    assert res.returncode == 2, res.stderr
    assert "known configs" in res.stderr and "Traceback" not in res.stderr
    help_text = subprocess.run([*argv, "--help"], capture_output=True, text=True, cwd=root).stdout
    assert ("python -m train" if command == "checkout" else "flax-attn-train") in help_text


def test_model_registry_resolves_lazily():
    assert resolve("small_se_cnn") is SmallSECNN
    with pytest.raises(ValueError, match="package.module:Class"):
        resolve("SmallSECNN")
    with pytest.raises(ImportError, match="no attribute 'Nope'"):
        resolve("flax_attn.training.models:Nope")
    with pytest.raises(ImportError, match="cannot import"):
        resolve("flax_attn.not_a_family:Model")
    m = build_model("flax_attn.training.models:TinySR", {"num_feat": 4}, dtype=jnp.bfloat16)
    assert m.dtype == jnp.bfloat16 and m.num_feat == 4


# --------------------------------------------------------------------------- data


def test_digits_split_is_fixed_and_disjoint():
    x_tr, y_tr, x_te, y_te = data_lib.digits_split(8, 0.2, 0)
    assert x_tr.shape == (1437, 8, 8, 1) and x_te.shape == (360, 8, 8, 1)
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    # every test image differs from every training image
    assert not (x_te.reshape(360, 1, -1) == x_tr.reshape(1, 1437, -1)).all(-1).any()
    src = data_lib.DigitsSource(x_tr, y_tr, 32, seed=3)
    a, b = src.batch(50), src.batch(50)
    np.testing.assert_array_equal(a["image"], b["image"])
    # rows of the global batch (what one process loads) equal the slice of the whole batch
    np.testing.assert_array_equal(src.batch(50, slice(8, 24))["image"], a["image"][8:24])
    assert src.position(50) == {"step": 50, "epoch": 50 // 44, "index": 50 % 44}
    assert not np.array_equal(src.batch(0)["label"], data_lib.DigitsSource(x_tr, y_tr, 32, seed=4).batch(0)["label"])


def test_superres_crops_are_aligned():
    src = data_lib.superres_train_source(("astronaut",), batch_size=4, patch_size=16, scale=2, seed=0)
    b = src.batch(7)
    assert b["lr"].shape == (4, 16, 16, 3) and b["hr"].shape == (4, 32, 32, 3)
    # the LR crop is the bicubic downscale of the HR crop's source region: close to a 2x2 box mean
    box = b["hr"].reshape(4, 16, 2, 16, 2, 3).mean((2, 4))
    assert np.abs(box - b["lr"]).mean() < 0.03
    np.testing.assert_array_equal(src.batch(7, slice(1, 3))["hr"], b["hr"][1:3])


def test_eval_set_pads_with_mask():
    es = data_lib.EvalSet({"x": np.arange(5, dtype=np.float32)}, batch_size=4)
    assert es.num_batches == 2
    np.testing.assert_array_equal(es.batch(1)["mask"], [1, 0, 0, 0])
    np.testing.assert_array_equal(es.batch(1, slice(0, 2))["x"], [4, 0])


# --------------------------------------------------------------------------- metrics and models


def test_psnr_ssim_match_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 30, 37, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).round().astype(np.float32)
    y = lambda im: 16 + (65.738 * im[..., 0] + 129.057 * im[..., 1] + 25.064 * im[..., 2]) / 256  # noqa: E731
    for i in range(2):
        ya, yb = y(a[i])[2:-2, 2:-2].astype(np.float64), y(b[i])[2:-2, 2:-2].astype(np.float64)
        ref_psnr = metrics.peak_signal_noise_ratio(ya, yb, data_range=255)
        ref_ssim = metrics.structural_similarity(
            ya, yb, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        np.testing.assert_allclose(float(psnr_y(a, b, 2)[i]), ref_psnr, rtol=1e-5)
        np.testing.assert_allclose(float(ssim_y(a, b, 2)[i]), ref_ssim, rtol=1e-4)


def test_pixel_shuffle_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 12)).astype(np.float32)
    ref = torch.nn.functional.pixel_shuffle(torch.from_numpy(x.transpose(0, 3, 1, 2)), 2).numpy()
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), 2)), ref.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="divisible by r\\*r"):
        pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)


def test_models_reject_bad_input():
    with pytest.raises(ValueError, match="SmallSECNN: `x` must have 1 channels"):
        SmallSECNN(widths=(4,)).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="TinySR: `x` must be 4-D"):
        TinySR(num_feat=4).init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 3)))


def test_conv_mha_trains():
    import optax

    from flax_attn.training.models import ConvMHA

    model = ConvMHA(num_classes=3, embed_dim=8, num_heads=2)
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(6, 5, 7, 1)), jnp.float32), jnp.asarray([0, 1, 2, 0, 1, 2])
    v = model.init(jax.random.PRNGKey(0), x)
    tx = optax.adam(3e-2)

    def loss(p, bs):
        logits, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

    p, bs, opt = v["params"], v["batch_stats"], tx.init(v["params"])
    first = None
    for _ in range(8):
        (val, bs), g = jax.value_and_grad(loss, has_aux=True)(p, bs)
        first = val if first is None else first
        u, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, u)
    assert float(val) < 0.7 * float(first)
    assert "attn" in p and not np.allclose(bs["bn1"]["mean"], 0.0)


def test_optimizer_masks_norms_and_biases():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones((2,))},
        "bn": {"scale": jnp.ones((2,))},
    }
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    for name in ("adamw", "sgd"):
        oc = cfg_lib.OptimConfig(name=name, learning_rate=0.1, weight_decay=0.5, schedule="constant")
        tx, _ = build_optimizer(oc, 10)
        upd, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(upd["conv"]["kernel"], -0.05)  # lr * wd * p
        np.testing.assert_array_equal(upd["conv"]["bias"], 0.0)
        np.testing.assert_array_equal(upd["bn"]["scale"], 0.0)
    oc = cfg_lib.OptimConfig(schedule="cosine", warmup_steps=4, learning_rate=1.0)
    _, sched = build_optimizer(oc, 12)
    np.testing.assert_allclose([sched(0), sched(2), sched(4), sched(12)], [0.0, 0.5, 1.0, 0.0], atol=1e-6)


# --------------------------------------------------------------------------- runs


def test_classify_run_resume_and_no_recompilation(tmp_path):
    config = cfg_lib.get_config("classify", TINY_CLASSIFY)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
    trainer = Trainer(config, tmp_path / "run")
    state = trainer.initial_state()
    src, mesh = trainer.task.train_source, trainer.mesh
    from flax_attn.training import sharding as sh

    batch = sh.to_global(src.batch(0), mesh, 16)
    state, m = trainer.train_step(state, batch, trainer.step_key)
    jax.block_until_ready(m)
    n_after_first = len(compiles)
    for s in range(1, 4):
        state, m = trainer.train_step(state, sh.to_global(src.batch(s), mesh, 16), trainer.step_key)
    jax.block_until_ready(m)
    assert len(compiles) == n_after_first, f"recompiled after the first step: {compiles[n_after_first:]}"
    assert int(state.step) == 4

    result = trainer.run()
    assert result.status == "completed" and result.step == 12
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if ln["kind"] == "train"] == list(range(1, 13))
    assert {"loss", "accuracy", "lr", "grad_norm"} <= set(lines[0])
    assert [ln["step"] for ln in lines if ln["kind"] == "eval"] == [6, 12]
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["step"] == 12 and 0.0 <= final["accuracy"] <= 1.0
    assert lines[-1]["loss"] < lines[0]["loss"]
    # saves at 4, 6 (eval), 8, 12 (eval): the latest 3 plus the best eval are kept
    steps = trainer_steps(tmp_path / "run")
    assert steps[-3:] == [6, 8, 12] and len(steps) == 3

    # Re-running a finished workdir resumes at the end and changes nothing.
    again = Trainer(config, tmp_path / "run").run()
    assert again.step == 12 and again.eval_metrics == result.eval_metrics
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text()) == final
    _assert_trees_equal(_params(again.state), _params(result.state))


def test_superres_few_steps_and_bicubic_baseline(tmp_path):
    config = cfg_lib.get_config("superres", TINY_SUPERRES)
    result = Trainer(config, tmp_path).run()
    m = result.eval_metrics
    assert result.step == 6
    assert set(m) >= {"psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "psnr_gain", "l1"}
    # The baseline is computed independently here, with skimage's reference metrics.
    ev = data_lib.superres_eval_set(("camera", "coins", "clock"), 48, 2)
    from skimage.metrics import peak_signal_noise_ratio

    y = lambda im: 16 + (65.738 * im[..., 0] + 129.057 * im[..., 1] + 25.064 * im[..., 2]) / 256  # noqa: E731
    ref = np.mean(
        [
            peak_signal_noise_ratio(
                y((h * 255).round())[2:-2, 2:-2], y(b.astype(np.float64))[2:-2, 2:-2], data_range=255
            )
            for h, b in zip(ev["hr"], ev["bicubic"])
        ]
    )
    np.testing.assert_allclose(m["bicubic_psnr"], ref, rtol=1e-5)
    assert 20 < m["psnr"] < 60 and 0 < m["ssim"] <= 1


def test_superres_bfloat16_runs(tmp_path):
    config = cfg_lib.get_config("superres", [*TINY_SUPERRES, "precision='bfloat16'", "steps=2", "eval_every=0"])
    trainer = Trainer(config, tmp_path)
    result = trainer.run()
    leaves = jax.tree_util.tree_leaves(result.state.params)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)  # f32 master weights
    assert np.isfinite(result.eval_metrics["psnr"])


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    config = cfg_lib.get_config("classify", [*TINY_CLASSIFY, "checkpoint.every_steps=0", "eval_every=0"])
    trainer = Trainer(config, tmp_path)
    orig = trainer.task.train_source.batch

    def poisoned(step, rows=None):
        b = orig(step, rows)
        if step >= 5:  # the 6th step sees a NaN image
            b["image"] = b["image"] * np.nan
        return b

    monkeypatch.setattr(trainer.task.train_source, "batch", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss at step 6.*last good state \\(step 5\\)"):
        trainer.run()
    steps = trainer_steps(tmp_path)
    assert steps == [5]
    # The checkpoint holds the state after 5 clean steps, bit for bit.
    from flax_attn.training import sharding as sh

    ref = Trainer(config, tmp_path / "ref")
    state = ref.initial_state()
    for s in range(5):
        state, _ = ref.train_step(state, sh.to_global(orig(s), ref.mesh, 16), ref.step_key)
    restored, data = _restore(config, tmp_path)
    _assert_trees_equal(_params(restored), _params(state))
    assert not bool(restored.halted)
    assert data["position"]["step"] == 5


def trainer_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _restore(config, workdir):
    from flax_attn.training.checkpoint import Checkpointer

    t = Trainer(config, workdir)
    ck = Checkpointer(workdir, config.checkpoint)
    out = ck.restore_latest(t.abstract_state)
    ck.close()
    return out


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    full = Trainer(cfg_lib.get_config("classify", TINY_CLASSIFY), tmp_path / "full").run()
    # Damage the newest checkpoint of a finished run: resuming must fall back to step 8 and
    # redo steps 9..12 to the same result.
    work = tmp_path / "damaged"
    shutil.copytree(tmp_path / "full", work)
    (work / "final_metrics.json").unlink()
    latest = work / "checkpoints" / "12"
    for f in (latest / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name and f.suffix != ".json":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated data files
    # An interrupted write elsewhere (an orbax temporary) must be ignored too.
    (work / "checkpoints" / "14.orbax-checkpoint-tmp-1").mkdir()
    with pytest.warns(CorruptCheckpointWarning, match="step 12"):
        resumed = Trainer(cfg_lib.get_config("classify", TINY_CLASSIFY), work).run()
    assert resumed.step == 12
    assert (work / "corrupt").is_dir()
    _assert_trees_equal(_params(resumed.state), _params(full.state))
    assert (work / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()


def test_init_from_converted_pytorch_checkpoint(tmp_path):
    from flax_attn.convert import save_state_dict, to_torch

    config = cfg_lib.get_config("classify", [*TINY_CLASSIFY, "steps=1"])
    trainer = Trainer(config, tmp_path / "a")
    model = trainer.model
    x = jnp.zeros((1, 8, 8, 1))
    other = model.init(jax.random.PRNGKey(42), x)
    other = jax.tree_util.tree_map(lambda v: v + 0.25, other)  # distinct from any fresh init
    sd = to_torch(model, other, x)
    assert "layer1.0.se.fc.0.weight" in sd and "layer2.0.downsample.1.running_var" in sd
    save_state_dict(sd, tmp_path / "model.npz")
    t2 = Trainer(config, tmp_path / "b", init_from=str(tmp_path / "model.npz"))
    state = t2.initial_state()
    _assert_trees_equal(_params(state), jax.device_get(other["params"]))
    _assert_trees_equal(jax.device_get(state.batch_stats), jax.device_get(other["batch_stats"]))


def test_cli_runs_a_config(tmp_path, capsys):
    from flax_attn.training.cli import main

    overrides = [a for o in [*TINY_CLASSIFY, "steps=3", "eval_every=0"] for a in ("--override", o)]
    assert main(["--config", "classify", "--workdir", str(tmp_path), *overrides]) == 0
    out = capsys.readouterr().out
    assert "step 3/3 (100%)" in out and "steps/s" in out and "ETA" in out
    assert json.loads((tmp_path / "final_metrics.json").read_text())["step"] == 3
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 3
    with pytest.raises(SystemExit):
        main(["--workdir", str(tmp_path)])  # --config is required
