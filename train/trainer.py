"""The training loop: jitted, sharded, donated train/eval steps, checkpointing, resumption.

Determinism: the batch of step ``s`` is a pure function of ``(seed, s)``, the step's rng is
``fold_in(key(seed), s)``, and the whole ``TrainState`` (step, params, batch statistics,
optimiser state) goes into every checkpoint. A run killed at any point and restarted in the same
workdir therefore ends with bit-identical parameters and the same metrics as an uninterrupted run.

Failure handling:
  * SIGTERM (preemption): the current step finishes, a checkpoint is written and the run returns
    with ``status="preempted"`` (the CLI exits with 143). With several processes the JAX
    preemption sync point decides the common step to stop at.
  * NaN/Inf loss or gradients: the train step leaves the state untouched from that step on (the
    update is masked on device, so nothing waits for the host), the host notices one step later,
    saves that last good state and raises :class:`NonFiniteLossError`.
  * A corrupt newest checkpoint: resume falls back to the previous one (see :mod:`train.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from train import sharding as sh
from train.checkpoint import Checkpointer
from train.configs import Config, OptimConfig
from train.metrics import MetricsWriter, Progress
from train.models import build_model
from train.tasks import Task, make_task

__all__ = ["NonFiniteLossError", "RunResult", "TrainState", "Trainer", "build_optimizer", "train"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN/Inf; the last good state was checkpointed."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # Set on device by the first non-finite step; from then on steps leave the state unchanged.
    halted: jax.Array


@dataclasses.dataclass
class RunResult:
    status: str  # "completed" | "preempted"
    step: int
    state: TrainState
    eval_metrics: dict[str, float]


# --------------------------------------------------------------------------- optimiser


def _schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    lr, w = cfg.learning_rate, cfg.warmup_steps
    decay_steps = max(total_steps - w, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_factor)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(lr, lr * cfg.end_lr_factor, decay_steps)
    else:
        raise ValueError(f"optim.schedule must be 'constant', 'cosine' or 'linear', got {cfg.schedule!r}")
    if w <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, w), main], [w])


def _decay_mask(params: Any) -> Any:
    # Kernels decay; biases and normalisation scales (ndim <= 1) do not.
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def build_optimizer(
    cfg: OptimConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``clip_by_global_norm -> (adamw | weight decay + sgd momentum)`` under the configured schedule.

    SGD follows ``torch.optim.SGD``: weight decay is added to the gradient before momentum.
    """
    schedule = _schedule(cfg, total_steps)
    mask = None if cfg.decay_norms_and_biases else _decay_mask
    parts: list[optax.GradientTransformation] = []
    if cfg.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    if cfg.name == "adamw":
        parts.append(
            optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
        )
    elif cfg.name == "sgd":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    else:
        raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {cfg.name!r}")
    return optax.chain(*parts), schedule


# --------------------------------------------------------------------------- trainer


_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


class Trainer:
    """Builds everything a run needs from a :class:`Config`; :meth:`run` trains (and resumes).

    Args:
      config: the run.
      workdir: checkpoints, ``metrics.jsonl`` and ``config.json`` go here; an existing checkpoint
        in it is resumed from.
      init_from: a PyTorch checkpoint (``.pth``/``.safetensors``/``.npz``) to initialise the
        parameters and BatchNorm statistics from, via :func:`flax_attn.convert.from_torch` with
        ``config.model.torch_layout``. Ignored when resuming.
      mesh: defaults to all devices, ``(data, model)`` with ``config.model_axis``.
      stream: where the progress line goes (process 0 only).
    """

    def __init__(
        self,
        config: Config,
        workdir: str | os.PathLike,
        *,
        init_from: str | None = None,
        mesh=None,
        stream=None,
    ):
        if config.precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {config.precision!r}")
        self.config = config
        self.workdir = Path(workdir).absolute()
        self.init_from = init_from
        self.mesh = mesh or sh.make_mesh(config.model_axis)
        self.stream = stream or sys.stdout
        self.is_main = jax.process_index() == 0
        self.task: Task = make_task(config)
        self.model = build_model(config.model.name, config.model.kwargs, dtype=_DTYPES[config.precision])
        self.tx, self.schedule = build_optimizer(config.optim, config.steps)
        self.rows = sh.process_rows(self.mesh, config.data.batch_size)
        es = self.task.eval_set
        data_size = self.mesh.shape[sh.DATA]
        if es.batch_size % data_size:
            # Evaluation rows are masked, so the eval batch can grow to fit the mesh.
            es = self.task.eval_set = type(es)(es.arrays, -(-es.batch_size // data_size) * data_size)
        self.eval_rows = sh.process_rows(self.mesh, es.batch_size)
        key = jax.random.PRNGKey(config.seed)
        self.init_key, self.step_key = jax.random.split(key)
        self._example = self.task.example_input()
        self._build_steps()
        self._terminate = False

    # ------------------------------------------------------------------ state and steps

    def _init_state(self, rng) -> TrainState:
        args = self.task.init_args(self.model, self._example)
        variables = self.model.init({"params": rng, "dropout": rng}, *args, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=self.tx.init(params),
            halted=jnp.zeros((), jnp.bool_),
        )

    def _build_steps(self) -> None:
        repl = sh.replicated(self.mesh)
        abstract = jax.eval_shape(self._init_state, self.init_key)
        # Parameters and optimiser state are replicated; a rule sharding large kernels over the
        # 'model' axis would go here.
        self.state_sharding = jax.tree_util.tree_map(lambda _: repl, abstract)
        self.abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_sharding
        )
        batch_sh = sh.batch_sharding(self.mesh)
        task, model, tx, schedule = self.task, self.model, self.tx, self.schedule

        def train_step(state: TrainState, batch, key):
            rng = jax.random.fold_in(key, state.step)

            def loss_fn(params):
                return task.loss(model, params, state.batch_stats, batch, rng)

            (loss, (metrics, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            grad_norm = optax.tree.norm(grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~state.halted
            new = TrainState(
                step=state.step + 1,
                params=params,
                batch_stats=new_bs,
                opt_state=opt_state,
                halted=state.halted,
            )
            # A non-finite step (and every step after it) keeps the previous state, so the host
            # can still checkpoint the last good one when it notices.
            out = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, state)
            out = out.replace(halted=~ok)
            metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step)}
            return out, metrics

        def eval_step(params, batch_stats, batch):
            return task.eval_sums(model, {"params": params, "batch_stats": batch_stats}, batch)

        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.state_sharding, batch_sh, repl),
            out_shardings=(self.state_sharding, repl),
            donate_argnums=(0,),
        )
        self.eval_step = jax.jit(
            eval_step,
            in_shardings=(self.state_sharding.params, self.state_sharding.batch_stats, batch_sh),
            out_shardings=repl,
        )
        self.init_fn = jax.jit(self._init_state, out_shardings=self.state_sharding)

    def initial_state(self) -> TrainState:
        state = self.init_fn(self.init_key)
        if self.init_from:
            state = self._load_torch(state, self.init_from)
        return state

    def _load_torch(self, state: TrainState, path: str) -> TrainState:
        from flax_attn.convert import from_torch, load_state_dict

        # A concrete example: from_torch traces module.init inside a closure, where abstract
        # ShapeDtypeStruct inputs are not turned into tracers.
        example = [jnp.zeros(a.shape, a.dtype) for a in self.task.init_args(self.model, self._example)]
        variables = from_torch(
            self.model, load_state_dict(path), *example, layout=self.config.model.torch_layout
        )
        params = jax.device_put(variables["params"], self.state_sharding.params)
        bs = jax.device_put(variables.get("batch_stats", {}), self.state_sharding.batch_stats)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(params)
        self._print(f"initialised from PyTorch checkpoint {path}")
        return state.replace(params=params, batch_stats=bs, opt_state=opt_state)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, state: TrainState) -> dict[str, float]:
        es = self.task.eval_set
        totals: dict[str, float] = {}
        for i in range(es.num_batches):
            batch = sh.to_global(es.batch(i, self.eval_rows), self.mesh, es.batch_size)
            sums = jax.device_get(self.eval_step(state.params, state.batch_stats, batch))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return self.task.finalize(totals)

    # ------------------------------------------------------------------ the loop

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=self.stream, flush=True)

    def _on_sigterm(self, signum, frame) -> None:
        self._terminate = True

    def _preempted(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._terminate

    def run(self) -> RunResult:
        cfg = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        best_metric = cfg.checkpoint.best_metric
        ckpt = Checkpointer(
            self.workdir, cfg.checkpoint, best_metric=best_metric, best_mode=cfg.checkpoint.best_mode
        )
        writer = MetricsWriter(self.workdir, enabled=self.is_main)
        source = self.task.train_source

        restored = ckpt.restore_latest(self.abstract_state)
        if restored is not None:
            state, data = restored
            start = int(state.step)
            if data.get("position", {}).get("step") != start:
                raise RuntimeError(
                    f"checkpoint step {start} disagrees with its data position {data.get('position')}"
                )
            if data.get("config") != _jsonable(cfg.to_dict()):
                self._print(
                    "warning: the config differs from the one saved in the checkpoint; using the new one"
                )
            self._print(f"resumed from step {start} ({ckpt.directory})")
        else:
            state, start = self.initial_state(), 0
            if self.is_main:
                (self.workdir / "config.json").write_text(_json(cfg.to_dict()))
        writer.truncate_after(start)

        old_handler = None
        if jax.process_count() == 1 and _is_main_thread():
            old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        progress = Progress(cfg.steps, cfg.data.batch_size, start, self.stream)
        eval_metrics: dict[str, float] = {}
        pending: tuple[int, Any] | None = None
        step, status = start, "completed"

        def position(s: int) -> dict:
            return {"position": source.position(s), "config": _jsonable(cfg.to_dict())}

        def check(s: int, metrics: Any) -> None:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm")):
                # The state in hand is the last good one (steps after the bad one were masked).
                good = int(state.step)
                ckpt.wait()
                if good not in ckpt.all_steps():
                    ckpt.save(good, state.replace(halted=jnp.zeros((), jnp.bool_)), position(good))
                ckpt.close()
                writer.write(s, "error", {"loss": m["loss"], "grad_norm": m["grad_norm"]})
                writer.close()
                raise NonFiniteLossError(
                    f"non-finite training loss at step {s}: loss={m['loss']}, grad_norm={m['grad_norm']}. "
                    f"Stopped; the last good state (step {good}) is checkpointed in {ckpt.directory}. "
                    f"Lower the learning rate, enable optim.clip_grad_norm, or check the data."
                )
            if s % cfg.log_every == 0 or s == cfg.steps:
                writer.write(s, "train", m)
                if self.is_main:
                    progress.print(s, {k: m[k] for k in m if k in ("loss", "accuracy", "lr")})

        try:
            while step < cfg.steps:
                batch = sh.to_global(source.batch(step, self.rows), self.mesh, cfg.data.batch_size)
                state, metrics = self.train_step(state, batch, self.step_key)
                step += 1
                if pending is not None:
                    check(*pending)
                pending = (step, metrics)
                if step == start + 1:
                    jax.block_until_ready(metrics)
                    progress.reset(step)  # the first step includes compilation
                do_eval = step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)
                preempt = self._preempted(step)
                do_save = (
                    do_eval
                    or preempt
                    or step == cfg.steps
                    or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
                )
                if do_eval or do_save:
                    check(*pending)  # never evaluate or save a state that saw a NaN
                    pending = None
                if do_eval:
                    eval_metrics = self.evaluate(state)
                    writer.write(step, "eval", eval_metrics)
                    self._print(
                        f"eval @ {step}: " + " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
                    )
                if do_save:
                    ckpt.save(step, state, position(step), metrics=eval_metrics if do_eval else None)
                if preempt:
                    status = "preempted"
                    self._print(f"preempted: checkpoint saved at step {step} in {ckpt.directory}")
                    break
            if pending is not None:
                check(*pending)
            ckpt.wait()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        if status == "completed" and not eval_metrics:
            eval_metrics = self.evaluate(state)  # resumed a finished run: report its metrics again
        ckpt.close()
        writer.close()
        if status == "completed" and self.is_main:
            (self.workdir / "final_metrics.json").write_text(_json({"step": step, **eval_metrics}))
        return RunResult(status, step, state, eval_metrics)


def train(config: Config, workdir: str | os.PathLike, **kwargs) -> RunResult:
    """Build a :class:`Trainer` and run it."""
    return Trainer(config, workdir, **kwargs).run()


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _jsonable(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x))


def _json(x: Any) -> str:
    import json

    return json.dumps(x, indent=2, sort_keys=True) + "\n"
