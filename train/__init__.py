"""Training library for flax-attn blocks: one CPU to a TPU pod, Optax optimisers, Orbax checkpoints.

``python -m train --config classify --workdir /tmp/run`` is the thin CLI over :func:`train.train`.
Configs are data (:mod:`train.configs`); models are named by import string and built lazily
(:mod:`train.models`); tasks define data, loss and metrics (:mod:`train.tasks`); the loop
(:mod:`train.trainer`) jits sharded, donated steps over a ``(data, model)`` mesh
(:mod:`train.sharding`) and checkpoints with Orbax (:mod:`train.checkpoint`).
"""

from train.configs import CONFIGS, Config, apply_overrides, get_config
from train.models import build_model
from train.sharding import initialize_distributed, make_mesh
from train.tasks import TASKS, Task
from train.trainer import NonFiniteLossError, RunResult, Trainer, TrainState, build_optimizer, train

__all__ = [
    "CONFIGS",
    "TASKS",
    "Config",
    "NonFiniteLossError",
    "RunResult",
    "Task",
    "TrainState",
    "Trainer",
    "apply_overrides",
    "build_model",
    "build_optimizer",
    "get_config",
    "initialize_distributed",
    "make_mesh",
    "train",
]
