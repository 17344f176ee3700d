"""PyTorch checkpoints in and out: the one place that knows PyTorch's names and layouts.

* :func:`load_state_dict` / :func:`save_state_dict`: files <-> ``{name: numpy array}``, never
  executing code from a checkpoint; every malformed file is a :class:`CheckpointError`.
* :func:`from_torch` / :func:`to_torch`: state dict <-> Flax variables for any module, driven by
  the generic rules of :mod:`flax_attn.convert.engine` and each block's small rename table.
* :func:`save_variables` / :func:`load_variables`: Flax variables as msgpack or Orbax, both written
  atomically (a crash leaves the old output or the new one).

Importing this package does not import torch.
"""

from flax_attn.convert.engine import (
    ConversionReport,
    Ignore,
    LinearFromNCHW,
    Permute,
    Rename,
    Reshape,
    StateDictMismatchError,
    Transform,
    from_torch,
    mapping,
    sequential_rules,
    to_torch,
)
from flax_attn.convert.io import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointIntegrityError,
    CheckpointTooLargeError,
    UnsafeCheckpointError,
    load_state_dict,
    save_state_dict,
)
from flax_attn.convert.variables import load_variables, save_variables

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointIntegrityError",
    "CheckpointTooLargeError",
    "ConversionReport",
    "Ignore",
    "LinearFromNCHW",
    "Permute",
    "Rename",
    "Reshape",
    "StateDictMismatchError",
    "Transform",
    "UnsafeCheckpointError",
    "from_torch",
    "load_state_dict",
    "load_variables",
    "mapping",
    "save_state_dict",
    "save_variables",
    "sequential_rules",
    "to_torch",
]
