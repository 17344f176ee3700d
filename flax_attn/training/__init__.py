"""Training library for flax-attn blocks: one CPU to a TPU pod, Optax optimisers, Orbax checkpoints.

``flax-attn-train --config classify --workdir /tmp/run`` (or ``python -m train`` from a checkout) is the
thin CLI (:mod:`flax_attn.training.cli`) over :func:`flax_attn.training.train`.
Configs are data (:mod:`flax_attn.training.configs`); models are named by import string and built lazily
(:mod:`flax_attn.training.models`); tasks define data, loss and metrics (:mod:`flax_attn.training.tasks`); the loop
(:mod:`flax_attn.training.trainer`) jits sharded, donated steps over a ``(data, model)`` mesh
(:mod:`flax_attn.training.sharding`) and checkpoints with Orbax (:mod:`flax_attn.training.checkpoint`).
"""

from flax_attn.training.configs import CONFIGS, Config, apply_overrides, get_config
from flax_attn.training.models import build_model
from flax_attn.training.sharding import initialize_distributed, make_mesh
from flax_attn.training.tasks import TASKS, Task
from flax_attn.training.trainer import NonFiniteLossError, RunResult, Trainer, TrainState, build_optimizer, train

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
