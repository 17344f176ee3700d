"""Spatial Transformer Networks (Jaderberg et al., NeurIPS 2015, arXiv 1506.02025).

A localisation network regresses an affine ``theta`` from the input, ``affine_grid`` turns it into a
sampling grid and ``grid_sample`` warps the input (:mod:`flax_attn.ops.sampling`, PyTorch-exact).
The localisation network and the classifier of the PyTorch STN tutorial
(``intermediate/spatial_transformer_tutorial``) are given with the tutorial's state-dict names.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.convert.engine import LinearFromNCHW, Rename, sequential_rules
from flax_attn.layers import BlockFields, Conv, Linear, merge_train
from flax_attn.ops.checks import check_rank
from flax_attn.ops.dtypes import compute_dtype, statistics_dtype
from flax_attn.ops.max_pool import max_pool
from flax_attn.ops.sampling import affine_grid, grid_sample

__all__ = [
    "STNTutorialNet",
    "SpatialTransformer",
    "TutorialLocalization",
    "identity_theta_bias_init",
]


_IDENTITY_THETA = np.array([1, 0, 0, 0, 1, 0], np.float32)


def identity_theta_bias_init(key, shape, dtype=jnp.float32):
    """Bias ``[1, 0, 0, 0, 1, 0]`` for the last localisation layer: with a zero kernel, the identity warp."""
    if tuple(shape) != (6,):
        raise ValueError(f"identity_theta_bias_init: the theta layer must have 6 outputs, got bias shape {shape}")
    return jnp.asarray(_IDENTITY_THETA, dtype)


def _accepts_train(module: nn.Module) -> bool:
    try:
        return "train" in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False


def _max_pool2(x):
    # torch MaxPool2d(2): stride 2, floor mode (trailing odd row/column dropped).
    return max_pool(x, 2)


class SpatialTransformer(nn.Module):
    """Spatial transformer: ``grid_sample(x, affine_grid(localization(x)))`` (arXiv 1506.02025).

    Attributes:
      localization: any module mapping ``x`` to ``(N, 6)`` or ``(N, 2, 3)`` affine parameters
        (its ``train`` keyword is forwarded when it takes one). Give its last layer a zero kernel
        and :func:`identity_theta_bias_init` to start from the identity warp, as the paper does.
      output_size: ``(Ho, Wo)`` of the warped output (default: the input's ``H, W``).
      mode, padding_mode, align_corners: as in ``torch.nn.functional.grid_sample``
        (PyTorch defaults: ``"bilinear"``, ``"zeros"``, False).
      dtype: compute dtype of the sampling and of the output (``None``: the input's); the
        localisation network has its own ``dtype``. The grid is float32 whatever it is.

    The localisation network's variables sit under ``localization`` in Flax; its torch keys are
    used as they are (the wrapper adds no prefix), matching the tutorial's flat ``Net``.

    Input ``(N, H, W, C)``; output ``(N, Ho, Wo, C)``. With ``return_theta=True`` the call also
    returns ``theta`` ``(N, 2, 3)``.

    Example:
      >>> stn = SpatialTransformer(localization=TutorialLocalization())
      >>> x = jnp.ones((2, 28, 28, 1))
      >>> variables = stn.init(jax.random.PRNGKey(0), x)
      >>> bool(jnp.allclose(stn.apply(variables, x), x, atol=1e-6))  # identity at init
      True
    """

    localization: nn.Module
    output_size: Sequence[int] | None = None
    mode: str = "bilinear"
    padding_mode: str = "zeros"
    align_corners: bool = False
    dtype: Any = None
    train: bool | None = None

    torch_layouts: ClassVar[tuple[str, ...]] = ("tutorial",)

    @nn.nowrap
    def torch_rules(self, layout):
        return [Rename(r"localization\.(.*)", r"\1")]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None, *, return_theta: bool = False):
        train = merge_train(self, train)
        where = "SpatialTransformer"
        x = x.astype(compute_dtype(where, self.dtype, x=x))
        check_rank(where, "x", x, 4, "(N, H, W, C)")
        theta = self.localization(x, train=train) if _accepts_train(self.localization) else self.localization(x)
        n = x.shape[0]
        if theta.shape not in ((n, 6), (n, 2, 3)):
            raise ValueError(
                f"{where}: the localization network must return (N, 6) or (N, 2, 3) = ({n}, 2, 3), "
                f"got shape {tuple(theta.shape)}"
            )
        # Sampling positions in float32 whatever the compute dtype: bf16 rounding of the grid would
        # move samples by up to ~0.1 pixel on a 28-pixel image.
        theta = theta.reshape(n, 2, 3).astype(jnp.promote_types(theta.dtype, jnp.float32))
        ho, wo = (x.shape[1], x.shape[2]) if self.output_size is None else tuple(self.output_size)
        grid = affine_grid(theta, (n, ho, wo, x.shape[-1]), align_corners=self.align_corners)
        y = grid_sample(x, grid, self.mode, self.padding_mode, self.align_corners).astype(x.dtype)
        return (y, theta) if return_theta else y


def _loc_feature_size(input_size: Sequence[int]) -> tuple[int, int]:
    h, w = (int(s) for s in input_size)
    fh, fw = ((h - 6) // 2 - 4) // 2, ((w - 6) // 2 - 4) // 2
    return fh, fw


class TutorialLocalization(BlockFields):
    """The localisation network of the PyTorch STN tutorial, returning ``theta`` ``(N, 2, 3)``.

    ``localization = Conv2d(in, 8, 7), MaxPool2d(2), ReLU, Conv2d(8, 10, 5), MaxPool2d(2), ReLU``;
    ``fc_loc = Linear(10 * h * w, 32), ReLU, Linear(32, 6)`` with the last layer zero-weight and
    identity-bias initialised. torch keys ``localization.{0,3}.*``, ``fc_loc.{0,2}.*``.

    Attributes:
      in_channels: input channels (tutorial: 1).
      input_size: ``(H, W)`` of the input (tutorial: 28x28, giving the 10x3x3 features); it fixes
        the size of ``fc_loc.0``, whose torch weight reads NCHW-flattened features (converted to
        the NHWC flattening used here by the rename table).
    """

    in_channels: int = 1
    input_size: Sequence[int] = (28, 28)

    @nn.nowrap
    def torch_rules(self, layout):
        fh, fw = _loc_feature_size(self.input_size)
        return [
            Rename(r"fc_loc_0\.weight", "fc_loc.0.weight", LinearFromNCHW(10, fh, fw)),
            *sequential_rules("localization|fc_loc"),
        ]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        where = "TutorialLocalization"
        check_rank(where, "x", x, 4, "(N, H, W, C)")
        expected = (*tuple(self.input_size), self.in_channels)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{where}: `x` must be (N, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(x.shape)}"
            )
        fh, fw = _loc_feature_size(self.input_size)
        if fh <= 0 or fw <= 0:
            raise ValueError(f"{where}: `input_size` {tuple(self.input_size)} is too small (needs at least 20x20)")
        kw = self.precision()
        h = nn.relu(_max_pool2(Conv(8, 7, name="localization_0", **kw)(x)))
        h = nn.relu(_max_pool2(Conv(10, 5, name="localization_3", **kw)(h)))
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(Linear(32, name="fc_loc_0", **kw)(h))
        theta = Linear(6, name="fc_loc_2", kernel_init=nn.initializers.zeros, bias_init=identity_theta_bias_init, **kw)(
            h
        )
        return theta.reshape(-1, 2, 3)


class STNTutorialNet(BlockFields):
    """The whole ``Net`` of the PyTorch STN tutorial: a spatial transformer, then a small MNIST CNN.

    ``stn`` (:class:`TutorialLocalization`, bilinear, zero padding, ``align_corners=False``), then
    ``conv1 = Conv2d(1, 10, 5)``, max-pool, ReLU, ``conv2 = Conv2d(10, 20, 5)``, ``Dropout2d``,
    max-pool, ReLU, ``fc1 = Linear(320, 50)``, ReLU, dropout, ``fc2 = Linear(50, 10)``,
    ``log_softmax``. State-dict keys are the tutorial's (``localization.*``, ``fc_loc.*``,
    ``conv1.*``, ``conv2.*``, ``fc1.*``, ``fc2.*``).

    Input ``(N, 28, 28, 1)``; output log-probabilities ``(N, 10)``. Dropout is active with
    ``train=True`` (rng stream ``dropout``).

    Example:
      >>> net = STNTutorialNet()
      >>> x = jnp.ones((2, 28, 28, 1))
      >>> net.apply(net.init(jax.random.PRNGKey(0), x), x).shape  # log-probabilities of the 10 digits
      (2, 10)
    """

    torch_layouts: ClassVar[tuple[str, ...]] = ("tutorial",)

    @nn.nowrap
    def torch_rules(self, layout):
        return [
            Rename(r"stn_loc\.(.*)", r"\1"),
            Rename(r"fc1\.weight", "fc1.weight", LinearFromNCHW(20, 4, 4)),
        ]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        train = merge_train(self, train)
        x = x.astype(compute_dtype("STNTutorialNet", self.dtype, x=x))
        kw = self.precision()
        theta = TutorialLocalization(name="stn_loc", **kw)(x)
        theta = theta.astype(jnp.promote_types(theta.dtype, jnp.float32))  # float32 sampling positions
        x = grid_sample(x, affine_grid(theta, x.shape)).astype(x.dtype)
        x = nn.relu(_max_pool2(Conv(10, 5, name="conv1", **kw)(x)))
        x = Conv(20, 5, name="conv2", **kw)(x)
        x = nn.Dropout(0.5, broadcast_dims=(1, 2), deterministic=not train)(x)  # Dropout2d: whole channels
        x = nn.relu(_max_pool2(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Linear(50, name="fc1", **kw)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        x = Linear(10, name="fc2", **kw)(x)
        return jax.nn.log_softmax(x.astype(statistics_dtype(x.dtype)), axis=-1).astype(x.dtype)
