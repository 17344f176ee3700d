"""flax_attn blocks as Flax NNX modules.

:class:`Block` wraps any flax_attn (linen) block, catalogued or not, as an ``nnx.Module`` through
``flax.nnx.bridge.ToNNX`` and ``lazy_init``, and handles what the bridge leaves to the user:

* BatchNorm state: in train mode the call passes ``mutable=["batch_stats"]`` and the updated
  running statistics are written back into the module (``nnx.BatchStat`` variables), so a training
  step needs no ``mutable=`` plumbing;
* train/eval: NNX's ``model.train()`` / ``model.eval()`` (they set ``deterministic``), or
  ``train=`` in the call;
* rng streams: ``rngs=<int>`` gives ``params`` and ``dropout`` streams;
* PyTorch weights: :meth:`Block.load_torch` goes through :func:`flax_attn.convert.from_torch`.

Example:
  >>> import jax.numpy as jnp
  >>> import optax
  >>> from flax import nnx
  >>> from flax_attn.cbam import CBAM
  >>> x = jnp.ones((2, 5, 6, 16))
  >>> model = Block(CBAM(16, reduction_ratio=4), x, rngs=0)
  >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  >>> @nnx.jit
  ... def step(model, optimizer, x):
  ...     loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
  ...     optimizer.update(model, grads)
  ...     return loss
  >>> model.train()
  >>> float(step(model, optimizer, x)) >= 0
  True
  >>> model.eval()
  >>> model(x).shape
  (2, 5, 6, 16)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.nnx import bridge
from flax.nnx.bridge import variables as bridge_variables

__all__ = ["Block"]


class Block(nnx.Module):
    """A flax_attn (linen) block as an ``nnx.Module``.

    Args:
      module: the linen block, unbound (``CBAM(64)``, ``catalogue.get("cbam").build_flax()``).
      *example_args, **example_kwargs: example inputs for ``lazy_init`` (their shapes create the
        variables); the same inputs :meth:`load_torch` needs.
      rngs: ``nnx.Rngs``, or an int seed for ``params`` (seed) and ``dropout`` (seed + 1) streams.
      deterministic: start in eval mode (NNX's convention; ``model.train()`` clears it).

    Call: the block's own arguments; ``train=None`` follows ``deterministic``. In train mode the
    block's BatchNorm statistics are updated in place.
    """

    def __init__(
        self,
        module: nn.Module,
        *example_args: Any,
        rngs: nnx.Rngs | int = 0,
        deterministic: bool = True,
        **example_kwargs: Any,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"Block: `module` must be a flax linen Module, got {type(module).__name__}")
        if isinstance(rngs, int):
            rngs = nnx.Rngs(params=rngs, dropout=rngs + 1)
        elif not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"Block: `rngs` must be nnx.Rngs or an int seed, got {type(rngs).__name__}")
        self.block = bridge.ToNNX(module, rngs=rngs)
        bridge.lazy_init(self.block, *example_args, **example_kwargs)
        self.deterministic = deterministic

    @property
    def linen_module(self) -> nn.Module:
        """The wrapped linen block."""
        return self.block.to_nnx__module

    def __call__(self, *args: Any, train: bool | None = None, **kwargs: Any) -> Any:
        train = (not self.deterministic) if train is None else bool(train)
        # Always hand back the batch_stats updates in train mode: ToNNX writes them into the
        # module, so the user's step function never sees `mutable=`.
        return self.block(*args, train=train, mutable=["batch_stats"] if train else False, **kwargs)

    def linen_variables(self) -> dict[str, Any]:
        """The variables as the linen block's ``{"params": ..., "batch_stats": ...}``."""
        attrs = {k: v for k, v in vars(self.block).items() if not k.startswith(("to_nnx__", "_pytree__"))}
        return bridge_variables.nnx_attrs_to_linen_vars(attrs)

    def set_linen_variables(self, variables: Mapping[str, Any]) -> None:
        """Replace the values of every variable with linen-style ``variables`` of the same tree."""
        current = self.linen_variables()
        want = jax.tree_util.tree_structure(current)
        got = jax.tree_util.tree_structure(dict(variables))
        if want != got:
            raise ValueError(f"Block: `variables` must have the module's tree {want}, got {got}")
        for collection, tree in bridge_variables.linen_vars_to_nnx_attrs(dict(variables)).items():
            setattr(self.block, collection, tree)

    def load_torch(
        self,
        state_dict: Any,
        *example_args: Any,
        layout: str | None = None,
        **example_kwargs: Any,
    ) -> None:
        """Load a PyTorch state dict (mapping or file) through :func:`flax_attn.convert.from_torch`.

        Strict: any missing, unexpected or mis-shaped key raises
        :class:`flax_attn.convert.StateDictMismatchError` with the full report, and nothing is loaded.
        """
        from flax_attn.convert import from_torch

        variables = from_torch(self.linen_module, state_dict, *example_args, layout=layout, **example_kwargs)
        self.set_linen_variables(variables)
