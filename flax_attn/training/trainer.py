"""The training loop: jitted, sharded, donated train/eval steps, checkpointing, resumption.

Determinism: the batch of step ``s`` is a pure function of ``(seed, s)``, the step's rng is
``fold_in(key(seed), s)``, and the whole ``TrainState`` (step, params, batch statistics,
optimiser state) goes into every checkpoint. A run killed at any point and restarted in the same
workdir therefore ends with bit-identical parameters and the same metrics as an uninterrupted run.

Failure handling:
  * SIGTERM (preemption): the current step finishes, a checkpoint is written and the run returns
    with ``status="preempted"`` (the CLI exits with 143). With several processes the JAX
    preemption sync point decides the common step to stop at.
  * NaN/Inf loss, gradients or updated parameters/optimiser state: the train step leaves the
    state untouched from that step on (the update is masked on device, so nothing waits for the
    host), the host notices one step later, saves that last good state (checked finite first)
    and raises :class:`NonFiniteLossError`.
  * A corrupt newest checkpoint: resume falls back to the previous one (see :mod:`flax_attn.training.checkpoint`).
  * A workdir written with another config: refused before anything is read or moved
    (:class:`ConfigMismatchError`) unless ``reset=True``, which moves the old run aside to
    ``<workdir>/previous/<time>/`` and starts afresh.
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

from flax_attn.convert import io as _io
from flax_attn.training import sharding as sh
from flax_attn.training.checkpoint import Checkpointer
from flax_attn.training.configs import Config, ConfigError, OptimConfig, validate
from flax_attn.training.metrics import MetricsWriter, Progress
from flax_attn.training.models import build_model
from flax_attn.training.tasks import Task, make_task

__all__ = [
    "RESUMABLE_KEYS",
    "ConfigMismatchError",
    "NonFiniteLossError",
    "RunResult",
    "TrainState",
    "Trainer",
    "build_optimizer",
    "train",
]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradients or the updated state became NaN/Inf; the last good state was checkpointed."""


class ConfigMismatchError(ValueError):
    """The workdir holds a run of another config; ``.keys`` lists the dotted keys that differ."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


# Keys that may change between a run and its resumption: how often it logs, evaluates and saves,
# and how long it runs (extending a finished run is a resume; with a decaying schedule the rate
# then follows the new total, which the resume message says).
RESUMABLE_KEYS = frozenset(
    {"steps", "log_every", "eval_every", "checkpoint.every_steps", "checkpoint.max_to_keep", "checkpoint.async_save"}
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # Set on device by the first non-finite step; from then on steps leave the state unchanged.
    halted: jax.Array
    # Exponential moving average of params when Config.ema_decay > 0, else {} (no arrays).
    ema_params: Any = flax.struct.field(default_factory=dict)


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
    elif cfg.schedule == "step":
        if cfg.decay_every < 1:
            raise ValueError(f"optim.decay_every must be >= 1 with schedule 'step', got {cfg.decay_every}")
        main = optax.exponential_decay(lr, cfg.decay_every, cfg.decay_factor, staircase=True)
    else:
        raise ValueError(f"optim.schedule must be 'constant', 'cosine', 'linear' or 'step', got {cfg.schedule!r}")
    if w <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, w), main], [w])


def _decay_mask(params: Any) -> Any:
    # Kernels decay; biases and normalisation scales (ndim <= 1) do not.
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def build_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``clip_by_global_norm -> (adamw | weight decay + sgd momentum)`` under the configured schedule.

    SGD follows ``torch.optim.SGD``: weight decay is added to the gradient before momentum.
    """
    schedule = _schedule(cfg, total_steps)
    mask = None if cfg.decay_norms_and_biases else _decay_mask
    parts: list[optax.GradientTransformation] = []
    if cfg.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    if cfg.name == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask))
    elif cfg.name == "sgd":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    else:
        raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {cfg.name!r}")
    return optax.chain(*parts), schedule


# --------------------------------------------------------------------------- trainer


_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
_APPLIED = "_update_applied"  # per-step flag from the device; not logged
_SKIPPED = "_data_skipped"  # unreadable images replaced in this step's global batch (folder sources)


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
      reset: when the workdir holds a run of another config, move it aside to
        ``<workdir>/previous/<time>/`` and start afresh instead of raising
        :class:`ConfigMismatchError`.
      profile_steps: ``(a, b)``: a ``jax.profiler`` trace of the steps that take the run from step
        ``a`` to step ``b`` (as logged), written to ``<workdir>/profile`` (TensorBoard's profile
        plugin or Perfetto read it).
    """

    def __init__(
        self,
        config: Config,
        workdir: str | os.PathLike,
        *,
        init_from: str | None = None,
        mesh=None,
        stream=None,
        reset: bool = False,
        profile_steps: tuple[int, int] | None = None,
    ):
        validate(config)
        if profile_steps is not None and not (0 <= profile_steps[0] < profile_steps[1]):
            raise ValueError(f"profile_steps: expected (a, b) with 0 <= a < b, got {profile_steps!r}")
        self.profile_steps = profile_steps
        self.config = config
        self.workdir = Path(workdir).absolute()
        self.init_from = init_from
        self.reset = reset
        self.mesh = mesh or sh.make_mesh(config.model_axis)
        self.stream = stream or sys.stdout
        self.is_main = jax.process_index() == 0
        self.task: Task = make_task(config)
        self.model = build_model(config.model.name, self._model_kwargs(), dtype=_DTYPES[config.precision])
        self.tx, self.schedule = build_optimizer(config.optim, config.steps)
        self.rows = sh.process_rows(self.mesh, config.data.batch_size)
        data_size = self.mesh.shape[sh.DATA]
        sets = []
        for es in self.task.eval_sets or [self.task.eval_set]:
            if es.batch_size % data_size:
                # Evaluation rows are masked, so the eval batch can grow to fit the mesh.
                es = type(es)(es.arrays, -(-es.batch_size // data_size) * data_size)
            sets.append(es)
        self.task.eval_sets, self.task.eval_set = sets, sets[0]
        self.eval_rows = sh.process_rows(self.mesh, sets[0].batch_size)
        key = jax.random.PRNGKey(config.seed)
        self.init_key, self.step_key = jax.random.split(key)
        self._example = self.task.example_input()
        self._build_steps()
        self._terminate = False

    def _model_kwargs(self) -> dict:
        kwargs = dict(self.config.model.kwargs)
        n = self.task.num_classes
        if n is not None and "num_classes" in kwargs:
            if kwargs["num_classes"] is None:
                kwargs["num_classes"] = n  # taken from the data
            elif kwargs["num_classes"] != n:
                raise ConfigError(
                    f"config model.kwargs.num_classes: expected {n} (the classes found in data.root) or None, "
                    f"got {kwargs['num_classes']!r}"
                )
        if kwargs.get("in_chans", 0) is None:
            kwargs["in_chans"] = self.config.data.channels  # taken from the data, like num_classes
        return kwargs

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
            ema_params=jax.tree_util.tree_map(jnp.copy, params) if self.config.ema_decay > 0 else {},
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
        accum, ema_decay = self.config.grad_accum_steps, self.config.ema_decay

        def grads_and_metrics(params, batch_stats, batch, rng):
            def loss_fn(p, bs, b, r):
                return task.loss(model, p, bs, b, r)

            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            if accum == 1:
                (_, (metrics, new_bs)), grads = grad_fn(params, batch_stats, batch, rng)
                return grads, metrics, new_bs
            # Micro-batch j takes rows j, j + k, j + 2k, ...: every device keeps its own rows, so
            # the split moves no data. BatchNorm statistics run through the micro-batches in turn.
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch
            )

            def body(carry, xs):
                g_sum, bs = carry
                mb, j = xs
                (_, (m, bs)), g = grad_fn(params, bs, mb, jax.random.fold_in(rng, j))
                return (jax.tree_util.tree_map(jnp.add, g_sum, g), bs), m

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            (g_sum, new_bs), ms = jax.lax.scan(body, (zeros, batch_stats), (micro, jnp.arange(accum)))
            grads = jax.tree_util.tree_map(lambda g: g / accum, g_sum)
            return grads, jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), ms), new_bs

        def train_step(state: TrainState, batch, key):
            rng = jax.random.fold_in(key, state.step)
            batch = dict(batch)
            skipped = batch.pop("skipped", None)
            grads, metrics, new_bs = grads_and_metrics(state.params, state.batch_stats, batch, rng)
            loss = metrics["loss"]
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state.ema_params
            if ema_decay > 0:
                ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
            grad_norm = optax.tree.norm(grads)
            # A finite loss and gradient can still overflow the parameters (a huge learning rate):
            # the new state must be finite too before it replaces the last good one.
            finite_state = jnp.all(
                jnp.asarray(
                    [
                        jnp.isfinite(x).all()
                        for x in jax.tree_util.tree_leaves((params, opt_state, new_bs, ema))
                        if jnp.issubdtype(x.dtype, jnp.inexact)
                    ]
                    or [True]
                )
            )
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & finite_state & ~state.halted
            new = TrainState(
                step=state.step + 1,
                params=params,
                batch_stats=new_bs,
                opt_state=opt_state,
                halted=state.halted,
                ema_params=ema,
            )
            # A non-finite step (and every step after it) keeps the previous state, so the host
            # can still checkpoint the last good one when it notices.
            out = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, state)
            out = out.replace(halted=~ok)
            metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step), _APPLIED: ok}
            if skipped is not None:
                metrics[_SKIPPED] = jnp.sum(skipped)
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
        variables = from_torch(self.model, load_state_dict(path), *example, layout=self.config.model.torch_layout)
        params = jax.device_put(variables["params"], self.state_sharding.params)
        bs = jax.device_put(variables.get("batch_stats", {}), self.state_sharding.batch_stats)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(params)
        self._print(f"initialised from PyTorch checkpoint {path}")
        return state.replace(params=params, batch_stats=bs, opt_state=opt_state)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Metrics over every evaluation set (of the EMA parameters when ``ema_decay`` > 0)."""
        params = state.ema_params if self.config.ema_decay > 0 else state.params
        totals: dict[str, float] = {}
        for es in self.task.eval_sets:
            rows = sh.process_rows(self.mesh, es.batch_size)
            for i in range(es.num_batches):
                batch = sh.to_global(es.batch(i, rows), self.mesh, es.batch_size)
                sums = jax.device_get(self.eval_step(params, state.batch_stats, batch))
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        return self.task.finalize(totals)

    # ------------------------------------------------------------------ the loop

    def _print(self, msg: str) -> None:
        if self.is_main:
            progress = getattr(self, "_progress", None)
            if progress is not None:
                progress.clear()  # a message never lands in the middle of a redrawn bar
            print(msg, file=self.stream, flush=True)

    def _on_sigterm(self, signum, frame) -> None:
        self._terminate = True

    def _preempted(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._terminate

    # ------------------------------------------------------------------ the workdir

    def _saved_config(self) -> dict | None:
        """The config the workdir's run was started with (``config.json``, else the newest checkpoint's)."""
        import json

        path = self.workdir / "config.json"
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass  # a torn config.json: fall back to what the checkpoints recorded
        steps = sorted(
            (int(p.name) for p in (self.workdir / "checkpoints").glob("*") if p.name.isdigit()), reverse=True
        )
        for step in steps:
            try:
                data = json.loads((self.workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())
                if isinstance(data.get("config"), dict):
                    return data["config"]
            except (OSError, ValueError, AttributeError):
                continue
        return None

    def _mismatch(self, diff: dict, saved: dict, where: str) -> ConfigMismatchError:
        keys = [k for k in diff if k not in RESUMABLE_KEYS]
        shown = "; ".join(f"{k}: {diff[k][0]!r} there, {diff[k][1]!r} now" for k in keys[:4])
        more = f" (and {len(keys) - 4} more)" if len(keys) > 4 else ""
        return ConfigMismatchError(
            f"{self.workdir} holds a run with another config ({where}): {shown}{more}. Nothing was changed; "
            f"rerun with the same config, or pass --reset to move that run to {self.workdir / 'previous'} "
            "and start afresh",
            keys,
        )

    def _check_workdir(self) -> None:
        """Refuse (or, with ``reset``, move aside) a workdir that holds a run of another config."""
        saved = self._saved_config()
        if saved is None:
            return
        diff = _config_diff(saved, _jsonable(self.config.to_dict()))
        if not [k for k in diff if k not in RESUMABLE_KEYS]:
            return
        if not self.reset:
            raise self._mismatch(diff, saved, "config.json")
        self._move_aside()

    def _move_aside(self) -> None:
        import time

        dest = self.workdir / "previous" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        if self.is_main:
            n = 0
            while dest.exists():
                n += 1
                dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
            dest.mkdir(parents=True)
            for name in _RUN_FILES:
                src = self.workdir / name
                if src.exists():
                    os.replace(src, dest / name)
            self._print(f"--reset: the previous run in {self.workdir} was moved to {dest}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("train-reset")

    def run(self) -> RunResult:
        cfg = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_workdir()  # before the checkpointer touches anything
        best_metric = cfg.checkpoint.best_metric
        ckpt = Checkpointer(self.workdir, cfg.checkpoint, best_metric=best_metric, best_mode=cfg.checkpoint.best_mode)
        writer = MetricsWriter(self.workdir, enabled=self.is_main)
        source = self.task.train_source
        # Folder sources are grain iterators whose state travels in the checkpoint; the in-memory
        # ones are random access by step.
        streaming = hasattr(source, "iterator")
        grain_state = None
        skipped_total = 0

        restored = ckpt.restore_latest(self.abstract_state)
        if restored is not None:
            state, data = restored
            start = int(state.step)
            if data.get("position", {}).get("step") != start:
                raise RuntimeError(f"checkpoint step {start} disagrees with its data position {data.get('position')}")
            if streaming:
                grain_state = data.get("grain_state")
                if not isinstance(grain_state, dict):
                    raise RuntimeError(
                        f"checkpoint at step {start} holds no grain iterator state for this folder source"
                    )
                skipped_total = int(data.get("data_skipped", 0))
            saved = data.get("config")
            changed = ""
            if isinstance(saved, dict):
                diff = _config_diff(saved, _jsonable(cfg.to_dict()))
                if [k for k in diff if k not in RESUMABLE_KEYS]:
                    ckpt.close()
                    raise self._mismatch(diff, saved, f"checkpoint at step {start}")
                if diff:
                    changed = "; changed since: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
            self._print(f"resumed from step {start} ({ckpt.directory}){changed}")
        else:
            state, start = self.initial_state(), 0
            if self.is_main:
                _io.atomic_write_bytes(self.workdir / "config.json", _json(cfg.to_dict()).encode())
        writer.truncate_after(start)

        old_handler = None
        if jax.process_count() == 1 and _is_main_thread():
            old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        progress = self._progress = Progress(cfg.steps, cfg.data.batch_size, start, self.stream)
        eval_metrics: dict[str, float] = {}
        pending: tuple[int, Any] | None = None
        step, status = start, "completed"
        iterator = source.iterator(self.rows, grain_state) if streaming else None
        # Iterator state after each of the last few steps (a save may be for a step just behind).
        states = {start: iterator.get_state()} if streaming else {}
        skipped = {start: skipped_total}

        def position(s: int) -> dict:
            out = {"position": source.position(s), "config": _jsonable(cfg.to_dict())}
            if streaming:
                out["grain_state"] = states[s]
                out["data_skipped"] = skipped[s]
            return out

        def check(s: int, metrics: Any) -> None:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            applied = bool(m.pop(_APPLIED, 1.0))
            if _SKIPPED in m:
                n = int(m.pop(_SKIPPED))
                skipped[s] = skipped.get(s - 1, 0) + n
                for old in [k for k in skipped if k < s - 4]:
                    del skipped[old]
                m["data_skipped"] = float(skipped[s])
            finite = all(math.isfinite(m[k]) for k in ("loss", "grad_norm"))
            if not (finite and applied):
                # The state in hand is the last good one (steps after the bad one were masked);
                # it is saved only once checked finite, so a restart can resume from it.
                good = int(state.step)
                ckpt.wait()
                if good not in ckpt.all_steps() and _all_finite(state):
                    ckpt.save(good, state.replace(halted=jnp.zeros((), jnp.bool_)), position(good))
                ckpt.wait()
                saved = sorted(ckpt.all_steps())
                ckpt.close()
                writer.write(s, "error", {"loss": m["loss"], "grad_norm": m["grad_norm"]})
                writer.close()
                what = (
                    "training loss"
                    if not finite
                    else "parameters or optimiser state after the update (the loss and gradients were finite)"
                )
                where = (
                    f"the last good state (step {good}) is checkpointed in {ckpt.directory}"
                    if good in saved
                    else f"no finite state could be checkpointed; the newest checkpoint is "
                    f"{saved[-1] if saved else 'none'}"
                )
                raise NonFiniteLossError(
                    f"non-finite {what} at step {s}: loss={m['loss']}, grad_norm={m['grad_norm']}. "
                    f"Stopped; {where}. Lower the learning rate, enable optim.clip_grad_norm, or check the data."
                )
            if s % cfg.log_every == 0 or s == cfg.steps:
                writer.write(s, "train", m)
                if self.is_main:
                    progress.print(s, {k: m[k] for k in m if k in ("loss", "accuracy", "lr", "data_skipped")})

        profiling = False
        try:
            while step < cfg.steps:
                if self.profile_steps and step == self.profile_steps[0]:
                    jax.profiler.start_trace(str(self.workdir / "profile"))
                    profiling = True
                local = next(iterator) if streaming else source.batch(step, self.rows)
                batch = sh.to_global(local, self.mesh, cfg.data.batch_size)
                state, metrics = self.train_step(state, batch, self.step_key)
                step += 1
                if streaming:
                    states[step] = iterator.get_state()
                    states.pop(step - 5, None)
                if profiling and step >= self.profile_steps[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profiling = False
                    self._print(f"profile of steps {self.profile_steps[0]}..{step} in {self.workdir / 'profile'}")
                if self.is_main:
                    progress.update(step)
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
                    self._print(f"eval @ {step}: " + " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
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
            if profiling:
                jax.profiler.stop_trace()
            if iterator is not None and hasattr(iterator, "close"):
                iterator.close()  # stops grain's worker processes and reader threads
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        if status == "completed" and not eval_metrics:
            eval_metrics = self.evaluate(state)  # resumed a finished run: report its metrics again
        ckpt.close()
        writer.close()
        if status == "completed" and self.is_main:
            _io.atomic_write_bytes(self.workdir / "final_metrics.json", _json({"step": step, **eval_metrics}).encode())
        return RunResult(status, step, state, eval_metrics)


def train(config: Config, workdir: str | os.PathLike, **kwargs) -> RunResult:
    """Build a :class:`Trainer` and run it (``kwargs``: ``init_from``, ``reset``, ``mesh``, ``stream``)."""
    return Trainer(config, workdir, **kwargs).run()


# What a run writes into its workdir (moved aside together by --reset).
_RUN_FILES = ("checkpoints", "corrupt", "metrics.jsonl", "config.json", "final_metrics.json", "tensorboard")


def _all_finite(state: Any) -> bool:
    return all(
        bool(jnp.isfinite(x).all())
        for x in jax.tree_util.tree_leaves(state)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: tree}
    return {prefix[:-1]: tree}


def _field_default(key: str) -> Any:
    """The dataclass default of a dotted config key (``"<absent>"`` when there is none)."""
    cls: Any = Config
    value: Any = "<absent>"
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return "<absent>"
        f = fields[part]
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            return "<absent>"
        cls = type(value)
    return _jsonable(value) if not dataclasses.is_dataclass(value) else "<absent>"


def _config_diff(saved: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every key whose value differs.

    A key the saved config lacks (a field added to the configs since) counts as equal when the
    current value is that field's default, so runs started before the field existed still resume.
    """
    a, b = _flat(saved), _flat(now)
    diff = {}
    for k in sorted(set(a) | set(b)):
        if a.get(k) == b.get(k):
            continue
        if k not in a and k in b and b[k] == _field_default(k):
            continue
        diff[k] = (a.get(k, "<absent>"), b.get(k, "<absent>"))
    return diff


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _jsonable(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x))


def _json(x: Any) -> str:
    import json

    return json.dumps(x, indent=2, sort_keys=True) + "\n"
