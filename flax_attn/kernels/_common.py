"""What every Pallas kernel here shares: the backend vocabulary, interpret resolution, tiling
arithmetic and the float32-accumulating 2-D dots. Private: kernels import it, nothing else does.

Backends are named after the Pallas lowering that compiles the kernel, as ``pallas_call`` names
them in newer JAX (``"triton"``: the GPU Triton lowering; ``"mosaic_tpu"``: the TPU Mosaic
lowering). The backend chooses the tiling rules, independently of where the call runs: on a CPU
either backend runs in the Pallas interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("triton", "mosaic_tpu")

# Finite, so that exp(mask - m) is exactly 0 without inf - inf = nan anywhere.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# The JAX platforms that have a Pallas lowering, and the backend each one uses by default.
_PLATFORM_BACKEND = {"gpu": "triton", "tpu": "mosaic_tpu"}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of one Pallas kernel call; ``None`` fields take the kernel's default for the backend.

    Each kernel reads the fields that describe its own grid and rejects the others:

    * ``block_h``: query rows per program (criss-cross: the query tile of a sequence pass;
      neighbourhood: image rows per program, also the key rows per dk/dv program).
    * ``block_w``: key positions per inner step (criss-cross).
    * ``block_c``: value channels per program (criss-cross: bounds the on-chip value block).
    * ``block_windows``: windows per program (Swin window attention).
    """

    block_h: int | None = None
    block_w: int | None = None
    block_c: int | None = None
    block_windows: int | None = None

    def check(self, where: str, allowed: tuple[str, ...]) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name not in allowed:
                raise ValueError(
                    f"{where}: `block_sizes.{f.name}` is not used by this kernel (it tiles with {allowed}), "
                    f"got {f.name}={value!r}"
                )
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: `block_sizes.{f.name}` must be a positive int, got {value!r}")


def local_platform() -> str:
    """The JAX platform of the default device, ``"gpu"`` for CUDA and ROCm alike."""
    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve_backend(where: str, backend: str | None, platform: str | None = None) -> str:
    """``backend`` checked against :data:`BACKENDS`; ``None``: the platform's lowering (Triton
    tiling on platforms without one, where the kernel can only run interpreted)."""
    if backend is None:
        return _PLATFORM_BACKEND.get(platform or local_platform(), "triton")
    if backend not in BACKENDS:
        raise ValueError(f"{where}: `backend` must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_interpret(backend: str, interpret: Any) -> Any:
    """``interpret`` for ``pallas_call``: ``None`` = interpret exactly when the local platform has
    no Pallas lowering (CPU). For ``"mosaic_tpu"``, ``True`` is TPU interpret mode with race
    detection (it models VMEM, DMAs and the grid, and checks that no two programs write the same
    output block); an ``InterpretParams`` is passed through."""
    if interpret is None:
        # The device that runs the call, not the (patchable) platform the defaults are resolved for.
        interpret = jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu")
    if interpret is True and backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams(detect_races=True)
    return interpret


def compiler_params(
    backend: str, n_axes: int, *, num_warps: int = 4, num_stages: int = 2, vmem_limit_bytes: int | None = None
):
    """Compiler parameters for a grid of ``n_axes`` independent axes (``vmem_limit_bytes``: Mosaic
    TPU's scoped VMEM limit, default the compiler's: 16 MiB on v5e, 32 MiB on v6e)."""
    if backend == "triton":
        return _triton_params(num_warps, num_stages)
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_axes, vmem_limit_bytes=vmem_limit_bytes)


# JAX 0.11 deprecated the Pallas Triton lowering ("will be removed in a future JAX version"; it
# warns with DeprecationWarning id "jax-pallas-triton" when a kernel is lowered for a GPU). The
# kernels keep using it on 0.10 and 0.11: nothing picks it by default (VERIFIED is empty), an
# explicit implementation="pallas" on a GPU shows JAX's warning, and a JAX without the lowering
# gets the error below instead of an ImportError. docs/mosaic_gpu.md has the migration plan.
TRITON_DEPRECATED = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)


def _triton_params(num_warps: int, num_stages: int):
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError as e:
        raise ValueError(
            f"backend='triton': this jax ({jax.__version__}) no longer ships the Pallas Triton lowering "
            f"({e}); use implementation='xla' (the default) or, for window attention, backend='mosaic_gpu'"
        ) from None
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def cost_estimate(flops: int, transcendentals: int, args, out_shape):
    """``pl.CostEstimate`` of a call: the work its kernel does (masked and padded work included) and
    the bytes of its operands and results, so that XLA's cost analysis and scheduling see it."""
    from jax.experimental import pallas as pl

    leaves = list(args) + jax.tree_util.tree_leaves(out_shape)
    nbytes = sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=nbytes)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def dot(a, b):
    """``a @ b`` of 2-D blocks with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nt(a, b):
    """``a @ b.T`` of 2-D blocks with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def flash_vjp(forward, backward):
    """``attention(plan, q, k, v, *extra, data)``: a ``jax.custom_vjp`` of a fused attention whose
    backward recomputes from the forward's log-sum-exp, as every flash-style kernel here does.

    ``forward(plan, *args) -> (out, lse)``; ``backward(plan, *args, out, lse, dout)`` returns the
    cotangents of every argument but the last. ``plan`` is static (hashable). The last argument
    is data, not a parameter (a key mask, region codes; ``None`` allowed): its cotangent is zero.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attention(plan, *args):
        return forward(plan, *args)[0]

    def attention_fwd(plan, *args):
        out, lse = forward(plan, *args)
        return out, (args, out, lse)

    def attention_bwd(plan, res, dout):
        args, out, lse = res
        grads = backward(plan, *args, out, lse, dout)
        return (*grads, jax.tree_util.tree_map(jnp.zeros_like, args[-1]))

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
