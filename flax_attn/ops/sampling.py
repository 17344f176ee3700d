"""PyTorch-exact ``affine_grid`` and ``grid_sample`` for NHWC images (Spatial Transformer sampling).

Layout: images are ``(N, H, W, C)``; a sampling grid is ``(N, Ho, Wo, 2)`` holding normalised
``(x, y)`` coordinates in ``[-1, 1]`` (x indexes width, y height), exactly like PyTorch's grid, so a
grid produced by ``torch.nn.functional.affine_grid`` can be used unchanged. ``affine_grid`` takes
its ``size`` in NHWC order, ``(N, H, W, C)``.

The index arithmetic follows PyTorch's CPU kernel: unnormalisation
``(c + 1) * (size - 1) / 2`` (``align_corners=True``) or ``(c + 1) * size / 2 - 0.5``, then the
padding rule (border = clamp, reflection = reflect about the borders then clamp), then bilinear
weights with out-of-range corners contributing zero, or nearest with round-half-to-even. The
clamp and reflection carry PyTorch's gradients (zero outside the open interval of the clamp,
sign flips of the reflection), so gradients with respect to the grid match as well as the values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.ops.checks import check_rank
from flax_attn.ops.dtypes import statistics_dtype

__all__ = ["affine_grid", "foveate", "grid_sample"]

_MODES = ("bilinear", "nearest")
_PADDING = ("zeros", "border", "reflection")


def _linspace_from_neg_one(steps: int, align_corners: bool, dtype=np.float32) -> np.ndarray:
    """PyTorch's ``linspace(-1, 1, steps)`` (symmetric two-sided evaluation), scaled when not aligned.

    Evaluated in ``dtype`` as torch does in theta's dtype (float32 for 16- and 32-bit thetas).
    """
    f = np.dtype(dtype).type
    if steps <= 1:
        return np.zeros((max(steps, 0),), dtype)
    step = f(2.0) / f(steps - 1)
    i = np.arange(steps)
    half = steps // 2
    r = np.where(
        i < half,
        f(-1.0) + step * i.astype(dtype),
        f(1.0) - step * (steps - i - 1).astype(dtype),
    ).astype(dtype)
    if not align_corners:
        r = (r * f(steps - 1) / f(steps)).astype(dtype)
    return r


def affine_grid(theta: jax.Array, size, align_corners: bool = False) -> jax.Array:
    """``torch.nn.functional.affine_grid`` for 2-D, with ``size`` in NHWC order.

    Args:
      theta: ``(N, 2, 3)`` affine matrices mapping output coordinates ``(x, y, 1)`` to input
        coordinates, all normalised to ``[-1, 1]``.
      size: output size ``(N, H, W, C)`` (NHWC; ``C`` is not used).
      align_corners: PyTorch's meaning (default False: -1 and 1 are the outer pixel edges).

    Returns:
      ``(N, H, W, 2)`` grid of ``(x, y)`` in the dtype of ``theta``.
    """
    check_rank("affine_grid", "theta", theta, 3, "(N, 2, 3)")
    if tuple(theta.shape[1:]) != (2, 3):
        raise ValueError(f"affine_grid: `theta` must have shape (N, 2, 3), got {tuple(theta.shape)}")
    size = tuple(int(s) for s in size)
    if len(size) != 4:
        raise ValueError(f"affine_grid: `size` must be (N, H, W, C) (NHWC), got {size}")
    n, h, w, _ = size
    if n != theta.shape[0]:
        raise ValueError(f"affine_grid: batch of `size` ({n}) does not match `theta` {tuple(theta.shape)}")
    if h <= 0 or w <= 0:
        raise ValueError(f"affine_grid: `size` must have positive H and W, got {size}")
    ldt = statistics_dtype(theta.dtype)  # torch evaluates the base grid in theta's float32-or-wider type
    xs = _linspace_from_neg_one(w, align_corners, ldt)
    ys = _linspace_from_neg_one(h, align_corners, ldt)
    base = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None], np.ones((h, w), ldt)), axis=-1)
    base = jnp.asarray(base.reshape(h * w, 3), dtype=theta.dtype)
    grid = jnp.einsum("pk,njk->npj", base, theta, precision=jax.lax.Precision.HIGHEST)
    return grid.reshape(n, h, w, 2)


def _clip(c: jax.Array, size: int) -> jax.Array:
    # PyTorch: clamp to [0, size - 1] with gradient 1 only strictly inside the interval.
    inside = (c > 0) & (c < size - 1)
    return jnp.where(inside, c, jax.lax.stop_gradient(jnp.clip(c, 0, size - 1)))


def _reflect(c: jax.Array, twice_low: int, twice_high: int) -> jax.Array:
    if twice_low == twice_high:
        return jnp.zeros_like(c) * jax.lax.stop_gradient(c)
    lo = twice_low / 2.0
    span = (twice_high - twice_low) / 2.0
    d = c - lo
    # |d| with gradient sign(d) and +1 at 0, as PyTorch's reflect_coordinates_set_grad.
    sign = jnp.where(d < 0, -1.0, 1.0).astype(c.dtype)
    a = d * sign
    flips = jnp.floor(jax.lax.stop_gradient(a) / span)
    extra = a - jax.lax.stop_gradient(flips * span)
    odd = jnp.mod(flips, 2.0) == 1.0
    return jnp.where(odd, span - extra + lo, extra + lo)


def _source_coords(c: jax.Array, size: int, padding_mode: str, align_corners: bool) -> jax.Array:
    if align_corners:
        c = (c + 1) * ((size - 1) / 2.0)
    else:
        c = (c + 1) * (size / 2.0) - 0.5
    if padding_mode == "border":
        c = _clip(c, size)
    elif padding_mode == "reflection":
        c = _reflect(c, 0, 2 * (size - 1)) if align_corners else _reflect(c, -1, 2 * size - 1)
        c = _clip(c, size)
    return c


def _gather(flat: jax.Array, iy: jax.Array, ix: jax.Array, w: int, valid: jax.Array) -> jax.Array:
    """Pixels ``flat[n, iy * w + ix]`` (zero where not ``valid``): ``(N, P, C)``."""
    idx = jnp.where(valid, iy * w + ix, 0)
    vals = jnp.take_along_axis(flat, idx[..., None], axis=1)
    return vals * valid[..., None].astype(flat.dtype)


def corner_pack(x: jax.Array) -> jax.Array:
    """The 2x2 neighbourhood of every pixel as one row: ``(N, H, W, C) -> (N, (H + 1) * (W + 1), 4, C)``.

    Row ``(y + 1) * (W + 1) + (x + 1)`` holds pixels ``(y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1)``
    for ``-1 <= y < H`` and ``-1 <= x < W``, zero where a corner lies outside the image. Bilinear
    sampling then reads all four corners with *one* gather (the way scenic packs them); its
    gradient is one scatter-add of rows four times as wide instead of four scatters, and the
    transpose of the packing itself is pads and adds. Built from a pad and four static slices.
    """
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    corners = [xp[:, dy : dy + h + 1, dx : dx + w + 1] for dy in (0, 1) for dx in (0, 1)]
    return jnp.stack(corners, axis=3).reshape(n, (h + 1) * (w + 1), 4, c)


def grid_sample(
    x: jax.Array,
    grid: jax.Array,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> jax.Array:
    """``torch.nn.functional.grid_sample`` (2-D) on NHWC images; differentiable in ``x`` and ``grid``.

    Args:
      x: ``(N, H, W, C)``.
      grid: ``(N, Ho, Wo, 2)`` normalised ``(x, y)`` sampling positions (PyTorch's convention).
      mode: ``"bilinear"`` or ``"nearest"`` (round half to even, like PyTorch; zero gradient
        with respect to the grid).
      padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.
      align_corners: PyTorch's meaning; default False as in PyTorch.

    Returns:
      ``(N, Ho, Wo, C)`` in the dtype of ``x``.

    Example:
      >>> x = jnp.arange(12.0).reshape(1, 3, 4, 1)
      >>> theta = jnp.array([[[1.0, 0, 0], [0, 1.0, 0]]])
      >>> y = grid_sample(x, affine_grid(theta, x.shape))  # identity warp
      >>> bool(jnp.allclose(y, x))
      True
    """
    check_rank("grid_sample", "x", x, 4, "(N, H, W, C)")
    check_rank("grid_sample", "grid", grid, 4, "(N, Ho, Wo, 2)")
    if grid.shape[-1] != 2:
        raise ValueError(f"grid_sample: `grid` must end in 2 (x, y) coordinates, got shape {tuple(grid.shape)}")
    if grid.shape[0] != x.shape[0]:
        raise ValueError(f"grid_sample: batch of `grid` {tuple(grid.shape)} does not match `x` {tuple(x.shape)}")
    if mode not in _MODES:
        raise ValueError(f"grid_sample: `mode` must be one of {_MODES}, got {mode!r}")
    if padding_mode not in _PADDING:
        raise ValueError(f"grid_sample: `padding_mode` must be one of {_PADDING}, got {padding_mode!r}")
    n, h, w, c = x.shape
    _, ho, wo, _ = grid.shape
    grid = grid.astype(jnp.promote_types(grid.dtype, jnp.float32))
    gx = _source_coords(grid[..., 0].reshape(n, -1), w, padding_mode, align_corners)
    gy = _source_coords(grid[..., 1].reshape(n, -1), h, padding_mode, align_corners)
    flat = x.reshape(n, h * w, c)

    def inb(iy, ix):
        return (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)

    if mode == "nearest":
        ix = jnp.round(gx).astype(jnp.int32)
        iy = jnp.round(gy).astype(jnp.int32)
        out = _gather(flat, iy, ix, w, inb(iy, ix))
        return out.reshape(n, ho, wo, c)

    x0f = jnp.floor(jax.lax.stop_gradient(gx))
    y0f = jnp.floor(jax.lax.stop_gradient(gy))
    x0 = x0f.astype(jnp.int32)
    y0 = y0f.astype(jnp.int32)
    # Weights as PyTorch writes them: distances to the opposite corner.
    wx1 = gx - x0f
    wx0 = (x0f + 1) - gx
    wy1 = gy - y0f
    wy0 = (y0f + 1) - gy
    # Every corner of a cell with -1 <= y0 < H and -1 <= x0 < W is in the packed table (zeros for
    # the ones outside the image); a cell further out has all four corners outside.
    valid = (y0 >= -1) & (y0 < h) & (x0 >= -1) & (x0 < w)
    idx = jnp.where(valid, (y0 + 1) * (w + 1) + (x0 + 1), 0)
    packed = corner_pack(x).reshape(n, (h + 1) * (w + 1), 4 * c)
    vals = jnp.take_along_axis(packed, idx[..., None], axis=1).reshape(n, -1, 4, c)
    vals = vals * valid[..., None, None].astype(x.dtype)
    out = 0
    for corner, (wy, wx) in enumerate(((wy0, wx0), (wy0, wx1), (wy1, wx0), (wy1, wx1))):
        out = out + vals[:, :, corner] * (wy * wx).astype(x.dtype)[..., None]
    return out.reshape(n, ho, wo, c).astype(x.dtype)


def foveate(x: jax.Array, l: jax.Array, g: int, k: int, s: float) -> jax.Array:
    """The glimpse sensor (retina) of the recurrent attention model (Mnih et al., arXiv 1406.6247).

    Follows kevinzakka/recurrent-visual-attention (``retina.foveate``/``extract_patch``): the
    centre is ``trunc(0.5 * (l + 1) * H)`` for both coordinates (the official ``denormalize``
    uses the image height for x and y), patch ``i`` has side ``size_i`` (``size_0 = g``,
    ``size_{i+1} = int(s * size_i)``) and covers rows ``[cy - size_i // 2, cy - size_i // 2 + size_i)``
    and the same columns around ``cx``, with zeros outside the image (the official code zero-pads
    when a patch crosses the border). Patches after the first are average-pooled with kernel and
    stride ``size_i // g`` back to ``g x g``.

    Args:
      x: ``(B, H, W, C)``.
      l: ``(B, 2)`` glimpse centres ``(x, y)`` in ``[-1, 1]`` (``(-1, -1)`` is the top-left corner).
      g, k, s: patch size, number of patches, scale between successive patches.

    Returns:
      ``(B, g, g, k * C)``: the ``k`` patches concatenated along channels (patch-major, as
      PyTorch's ``torch.cat(phi, 1)`` on NCHW patches).
    """
    where = "foveate"
    check_rank(where, "x", x, 4, "(B, H, W, C)")
    check_rank(where, "l", l, 2, "(B, 2)")
    b, h, w, c = x.shape
    if tuple(l.shape) != (b, 2):
        raise ValueError(f"{where}: `l` must be ({b}, 2) (x, y) locations, got {tuple(l.shape)}")
    sizes = [int(g)]
    for _ in range(int(k) - 1):
        sizes.append(int(s * sizes[-1]))
    for size in sizes[1:]:
        if (size // (size // g)) != g or size % (size // g):
            raise ValueError(f"{where}: patch of size {size} does not pool to {g}x{g} (g={g}, s={s})")
    # Each patch, average-pooled to g x g, is separable: out[b, i, j] = sum_{h, w} A[b, i, h] x[b, h, w]
    # B[b, j, w] with A (g, H) averaging rows [start + i r, start + (i + 1) r), B likewise for columns.
    # The selectors are built by comparing an iota with the (data-dependent) start, so the crop is
    # two small batched matmuls: rows outside the image select nothing (the official zero padding)
    # and the gradient is two matmuls, where vmapped dynamic slices gather and transpose to a
    # scatter-add.
    centre = jnp.trunc(0.5 * ((jax.lax.stop_gradient(l).astype(jnp.float32) + 1.0) * h)).astype(jnp.int32)
    cdt = jnp.promote_types(x.dtype, jnp.float32)
    patches = []
    for size in sizes:
        r = size // g
        start = centre - size // 2  # (B, 2) as (x, y)

        def selector(st, length, r=r):
            rel = jnp.arange(length)[None, None, :] - st[:, None, None]  # (B, 1, length)
            o = jnp.arange(g)[None, :, None]
            return jnp.where((rel >= o * r) & (rel < (o + 1) * r), jnp.asarray(1.0 / r, cdt), jnp.zeros((), cdt))

        rows, cols = selector(start[:, 1], h), selector(start[:, 0], w)  # (B, g, H), (B, g, W)
        p = jnp.einsum("bih,bhwc->biwc", rows, x.astype(cdt), precision="highest")
        p = jnp.einsum("bjw,biwc->bijc", cols, p, precision="highest")
        patches.append(p.astype(x.dtype))
    return jnp.concatenate(patches, axis=-1)
