"""The hard-attention training task: RAM on digits with REINFORCE (train.tasks.HardAttentionTask)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn.training import configs as cfg_lib
from flax_attn.training.tasks import HardAttentionTask, make_task
from flax_attn.training.trainer import Trainer

# A run small enough for a few seconds on a loaded CPU.
TINY = [
    "model.kwargs={'g': 4, 'k': 2, 's': 2, 'c': 1, 'h_g': 8, 'h_l': 8, 'std': 0.17, "
    "'hidden_size': 16, 'num_classes': 10, 'num_glimpses': 2}",
    "data.image_size=8",
    "data.canvas_size=12",
    "data.batch_size=8",
    "data.eval_batch_size=128",
    "steps=4",
    "eval_every=2",
    "log_every=1",
    "checkpoint.every_steps=2",
    "checkpoint.async_save=False",
]


def _lines(workdir):
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(state):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(state.params))


def test_config_and_task_data():
    config = cfg_lib.get_config("hard_attention")
    assert config.task == "hard_attention" and config.model.name == "flax_attn.hard_attention:RecurrentAttention"
    task = make_task(cfg_lib.get_config("hard_attention", TINY))
    assert isinstance(task, HardAttentionTask)
    x = task.train_source.batch(0)["image"]
    assert x.shape == (8, 12, 12, 1)
    # The 8x8 digit sits in the centre; the 2-pixel border is empty.
    assert x[:, :2].max() == 0 and x[:, -2:].max() == 0 and x[:, :, :2].max() == 0 and x[:, 2:10, 2:10].max() > 0
    with pytest.raises(ValueError, match="canvas_size"):
        make_task(cfg_lib.get_config("hard_attention", [*TINY, "data.canvas_size=6"]))


def test_few_steps_write_finite_metrics_and_are_deterministic(tmp_path):
    config = cfg_lib.get_config("hard_attention", TINY)
    first = Trainer(config, tmp_path / "a").run()
    lines = _lines(tmp_path / "a")
    train = [ln for ln in lines if ln["kind"] == "train"]
    evals = [ln for ln in lines if ln["kind"] == "eval"]
    assert [ln["step"] for ln in train] == [1, 2, 3, 4] and [ln["step"] for ln in evals] == [2, 4]
    for ln in train:
        assert {"loss", "loss_action", "loss_baseline", "loss_reinforce", "accuracy", "grad_norm"} <= set(ln)
        assert all(np.isfinite(ln[k]) for k in ("loss", "loss_action", "loss_baseline", "loss_reinforce"))
    for ln in evals:
        assert 0.0 <= ln["accuracy"] <= 1.0 and 0.0 <= ln["accuracy_mean"] <= 1.0 and np.isfinite(ln["loss"])
    final = json.loads((tmp_path / "a" / "final_metrics.json").read_text())
    assert final["step"] == 4 and final["accuracy"] == first.eval_metrics["accuracy"]

    # Same config, fresh workdir: identical losses and parameters (noise comes from (seed, step)).
    second = Trainer(config, tmp_path / "b").run()
    assert [ln["loss"] for ln in _lines(tmp_path / "b") if ln["kind"] == "train"] == [ln["loss"] for ln in train]
    assert second.eval_metrics == first.eval_metrics
    jax.tree_util.tree_map(np.testing.assert_array_equal, _params(first.state), _params(second.state))

    # Killed after step 2 and resumed: the same end state as the uninterrupted run.
    Trainer(cfg_lib.get_config("hard_attention", [*TINY, "steps=2"]), tmp_path / "c").run()
    resumed = Trainer(config, tmp_path / "c").run()
    jax.tree_util.tree_map(np.testing.assert_array_equal, _params(first.state), _params(resumed.state))


def test_reinforce_gradient_reaches_the_locator(tmp_path):
    config = cfg_lib.get_config("hard_attention", TINY)
    trainer = Trainer(config, tmp_path / "g")
    state = trainer.initial_state()
    task, model = trainer.task, trainer.model
    batch = jax.tree_util.tree_map(jnp.asarray, task.train_source.batch(0))
    rng = jax.random.fold_in(trainer.step_key, 0)

    def grads(pick):
        def f(params):
            loss, (metrics, _) = task.loss(model, params, state.batch_stats, batch, rng)
            return metrics[pick] if pick else loss

        return jax.grad(f)(state.params)

    total = grads(None)
    reinforce = grads("loss_reinforce")
    action = grads("loss_action")
    for g in (total, reinforce):
        assert float(jnp.abs(g["locator"]["fc"]["kernel"]).sum()) > 0
        assert float(jnp.abs(g["locator"]["fc"]["bias"]).sum()) > 0
    # The sampled locations are stop-gradients: only REINFORCE trains the policy.
    assert float(jnp.abs(action["locator"]["fc"]["kernel"]).sum()) == 0
    np.testing.assert_allclose(
        np.asarray(total["locator"]["fc"]["kernel"]), np.asarray(reinforce["locator"]["fc"]["kernel"]), rtol=1e-6
    )
    # The step's draws are a pure function of its rng: the same rng gives the same loss.
    a = task.loss(model, state.params, state.batch_stats, batch, rng)[0]
    b = task.loss(model, state.params, state.batch_stats, batch, rng)[0]
    c = task.loss(model, state.params, state.batch_stats, batch, jax.random.fold_in(trainer.step_key, 1))[0]
    assert float(a) == float(b) and float(a) != float(c)
