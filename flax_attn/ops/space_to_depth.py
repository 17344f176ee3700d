"""Space-to-depth with the channel order of SPD-Conv (Sunkara & Luo, arXiv 2208.03641).

SPD-Conv's ``space_to_depth`` layer concatenates the four stride-2 sub-grids of an NCHW tensor as
``cat[x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]]`` along channels:
sub-grid major, input channel minor, with the *row* offset varying fastest. This is not
``torch.nn.PixelUnshuffle(2)``, whose output channel ``c * 4 + 2 * dy + dx`` is channel major with
the *column* offset fastest; weights trained after one do not fit the other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.ops.checks import check_rank

__all__ = ["space_to_depth"]


def space_to_depth(x: jax.Array) -> jax.Array:
    """SPD-Conv's space-to-depth on NHWC: ``(B, H, W, C) -> (B, H/2, W/2, 4C)``.

    Output channel ``k * C + c`` holds input channel ``c`` of sub-grid ``k``, with sub-grids in the
    official order (row offset, column offset) = (0, 0), (1, 0), (0, 1), (1, 1).

    Raises:
      ValueError: if ``x`` is not 4-D or H or W is odd. The official slicing gives sub-grids of
        different sizes for odd sizes and its ``torch.cat`` fails; pad or crop to even sizes first.
    """
    check_rank("space_to_depth", "x", x, 4, "(batch, height, width, channels)")
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"space_to_depth: `x` needs even height and width (the four stride-2 sub-grids must have the "
            f"same size), got shape {x.shape} (H={h}, W={w}); pad or crop to even sizes first"
        )
    # (B, H/2, dy, W/2, dx, C) -> (B, H/2, W/2, dx, dy, C): dx major, dy minor gives the official
    # (0,0), (1,0), (0,1), (1,1) order of (dy, dx).
    y = x.reshape(b, h // 2, 2, w // 2, 2, c)
    y = jnp.transpose(y, (0, 1, 3, 4, 2, 5))
    return y.reshape(b, h // 2, w // 2, 4 * c)
