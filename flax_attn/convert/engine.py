"""The generic PyTorch <-> Flax variable mapping.

How a Flax variable finds its PyTorch name
-------------------------------------------
1. The leaf gets torch's name and layout from its Flax name: ``kernel`` -> ``weight`` (a 2-D kernel
   is transposed like ``nn.Linear``; an N-D kernel goes HWIO -> OIHW like ``nn.ConvNd``), ``scale`` ->
   ``weight``, ``bias`` -> ``bias``, ``embedding`` -> ``weight``; ``batch_stats`` ``mean``/``var`` ->
   ``running_mean``/``running_var``. Any other leaf (``gamma``, ``key_rel_w``) keeps its name and layout.
2. Walking up from the module that owns the leaf to the root, each module's path component is
   prepended (``query_conv.weight``) and that module's *rename table* is applied to the name
   relative to it. A module declares its table with a method::

       @nn.nowrap
       def torch_rules(self, layout):            # layout: "official", "timm", ... or None
           return [Rename(r"fc_(\\d+)\\.(.*)", r"fc.\\1.\\2")]

   Rules are regular expressions matched against the whole relative name; the first match wins.
   A replacement may end in ``[i/n]`` to say "chunk i of n along torch's first axis" (fused
   ``in_proj_weight``), and may carry a :class:`Transform` for layouts the defaults do not cover.

Because each table only sees names relative to its own module, blocks compose: an ``SELayer`` inside
an SE-ResNet inside a detector keeps the same table.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from flax_attn.convert.io import load_state_dict, to_numpy

__all__ = [
    "ConversionReport",
    "Conv1x1AsLinear",
    "Ignore",
    "LinearFromNCHW",
    "Permute",
    "Rename",
    "Reshape",
    "Stacked",
    "StateDictMismatchError",
    "Transform",
    "from_torch",
    "mapping",
    "sequential_rules",
    "to_torch",
]


# --------------------------------------------------------------------------- transforms


class Transform:
    """A bijection between a torch tensor layout and a Flax variable layout."""

    def to_flax(self, t: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_torch(self, f: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Permute(Transform):
    """``flax = torch.transpose(axes)``."""

    axes: tuple[int, ...]

    def to_flax(self, t):
        if t.ndim != len(self.axes):
            raise ValueError(f"expected a {len(self.axes)}-D tensor, got shape {t.shape}")
        return np.transpose(t, self.axes)

    def to_torch(self, f):
        return np.transpose(f, np.argsort(self.axes))


@dataclasses.dataclass(frozen=True)
class Identity(Transform):
    def to_flax(self, t):
        return t

    def to_torch(self, f):
        return f


@dataclasses.dataclass(frozen=True)
class Reshape(Transform):
    """Same elements, different shape (e.g. torch LayerNorm over ``[C, 1, 1]`` vs Flax ``(C,)``)."""

    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]

    def to_flax(self, t):
        if tuple(t.shape) != tuple(self.torch_shape):
            raise ValueError(f"expected torch shape {self.torch_shape}, got {t.shape}")
        return t.reshape(self.flax_shape)

    def to_torch(self, f):
        return f.reshape(self.torch_shape)


@dataclasses.dataclass(frozen=True)
class LinearFromNCHW(Transform):
    """An ``nn.Linear`` that reads NCHW-flattened features, feeding a Flax Dense on NHWC-flattened ones.

    torch ``weight`` ``(out, C*H*W)`` in (C, H, W) order <-> Flax ``kernel`` ``(H*W*C, out)`` in (H, W, C)
    order, so the block flattens its NHWC activations directly with no transpose at run time.
    """

    channels: int
    height: int
    width: int

    def to_flax(self, t):
        c, h, w = self.channels, self.height, self.width
        if t.ndim != 2 or t.shape[1] != c * h * w:
            raise ValueError(f"expected (out, {c}*{h}*{w}), got {t.shape}")
        return t.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)

    def to_torch(self, f):
        c, h, w = self.channels, self.height, self.width
        return f.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)


@dataclasses.dataclass(frozen=True)
class Conv1x1AsLinear(Transform):
    """A torch 1x1 ``nn.Conv2d`` weight ``(out, in, 1, 1)`` <-> a Flax Dense kernel ``(in, out)``.

    For blocks whose reference applies 1x1 convs to pooled ``(B, C, 1, 1)`` vectors (SE, CBAM
    variants): the Flax block keeps one Dense layer and reads either layout.
    """

    def to_flax(self, t):
        if t.ndim != 4 or tuple(t.shape[2:]) != (1, 1):
            raise ValueError(f"expected a 1x1 conv weight (out, in, 1, 1), got {t.shape}")
        return np.transpose(t[:, :, 0, 0])

    def to_torch(self, f):
        return np.transpose(f)[:, :, None, None]


LINEAR = Permute((1, 0))
IDENTITY = Identity()


def _conv_transform(ndim: int) -> Permute:
    # torch (O, I, *k) -> flax (*k, I, O)
    return Permute((*range(2, ndim), 1, 0))


# --------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rename:
    """Rename ``pattern`` (a full match on the name relative to the module) to ``replacement``."""

    pattern: str
    replacement: str
    transform: Transform | None = None


@dataclasses.dataclass(frozen=True)
class Ignore:
    """Torch keys (``re.search`` on the full key) that have no Flax counterpart, e.g. cached buffers."""

    pattern: str


def sequential_rules(*names: str, depth: int = 4) -> list[Rename]:
    """Rename rules for PyTorch ``nn.Sequential``/``nn.ModuleList`` children: ``name_3_1.x`` -> ``name.3.1.x``.

    Flax submodule names cannot contain dots, so a child that PyTorch calls ``layer1.0`` (or
    ``branches.2.1``, a list of lists) is named ``layer1_0`` (``branches_2_1``) in Flax; these rules
    put the dots back. Each name may be a regular expression (``softmax\\d_blocks``,
    ``conv5a|conv5c``); up to ``depth`` levels of indices are renamed, the deepest first.

    Example:
      >>> import re
      >>> rules = sequential_rules("layer1", "downsample")
      >>> def rename(name):
      ...     for rule in rules:
      ...         if re.fullmatch(rule.pattern, name):
      ...             return re.fullmatch(rule.pattern, name).expand(rule.replacement)
      ...     return name
      >>> rename("layer1_0.conv1.weight"), rename("downsample_1.running_mean"), rename("fc.weight")
      ('layer1.0.conv1.weight', 'downsample.1.running_mean', 'fc.weight')
      >>> rename("layer1_2_3.bn1.bias")
      'layer1.2.3.bn1.bias'
    """
    if not names:
        raise ValueError("sequential_rules: give at least one name, got none")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"sequential_rules: `depth` must be a positive int, got {depth!r}")
    rules = []
    for name in names:
        for d in range(depth, 0, -1):
            indices = "_".join(f"(?P<i{k}>\\d+)" for k in range(d))
            dotted = ".".join(f"\\g<i{k}>" for k in range(d))
            rules.append(Rename(rf"(?P<name>{name})_{indices}\.(?P<rest>.*)", rf"\g<name>.{dotted}.\g<rest>"))
    return rules


@dataclasses.dataclass(frozen=True)
class Stacked:
    """Submodule ``name`` is an ``nn.scan`` stack: each of its variables has a leading layer axis,
    and layer ``i`` is torch's ``<name>.<i>.*`` (an ``nn.ModuleList``). The leaf rules and the
    stacked module's own table apply to one layer's slice."""

    name: str


_CHUNK = re.compile(r"^(.*)\[(\d+)/(\d+)\]$")
_LAYER = "{layer}"  # placeholder for the layer index in a stacked target's key


@dataclasses.dataclass(frozen=True)
class _Target:
    key: str  # contains _LAYER when ``stacked``
    transform: Transform
    chunk: tuple[int, int] | None  # (index, count) along torch axis 0
    stacked: bool = False  # the Flax leaf has a leading layer axis; key is a template

    def layer_key(self, i: int) -> str:
        return self.key.replace(_LAYER, str(i))


def _default_leaf(collection: str, leaf: str, ndim: int) -> tuple[str, Transform]:
    if collection == "batch_stats":
        return {"mean": "running_mean", "var": "running_var"}.get(leaf, leaf), IDENTITY
    if leaf == "kernel":
        return "weight", LINEAR if ndim == 2 else _conv_transform(ndim)
    if leaf in ("scale", "embedding"):
        return "weight", IDENTITY
    return leaf, IDENTITY


def _normalise_rules(rules) -> tuple:
    out = []
    for r in rules or ():
        if isinstance(r, (Rename, Ignore, Stacked)):
            out.append(r)
        elif isinstance(r, tuple) and len(r) in (2, 3):
            out.append(Rename(*r))
        else:
            raise TypeError(
                f"torch_rules entries must be Rename, Ignore, Stacked or (pattern, replacement[, transform]); got {r!r}"
            )
    return tuple(out)


def _trace(module: nn.Module, layout: str | None, args, kwargs):
    """Variable shapes of ``module`` and the rename table of every submodule, by scope path."""
    supported = getattr(type(module), "torch_layouts", None)
    if layout is not None and supported is not None and layout not in supported:
        raise ValueError(f"{type(module).__name__}: unknown layout {layout!r}; supported layouts: {list(supported)}")
    tables: dict[tuple[str, ...], tuple] = {}

    def interceptor(next_fun, a, kw, ctx):
        m = ctx.module
        path = tuple(m.scope.path) if m.scope is not None else ()
        if path not in tables:
            tables[path] = ()
            fn = getattr(type(m), "torch_rules", None)
            if fn is not None:
                tables[path] = _normalise_rules(fn(m, layout))
        return next_fun(*a, **kw)

    # Array-like example inputs (arrays or ShapeDtypeStructs) are traced; Python values such as
    # need_weights=True stay static, since modules branch on them.
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_array = [hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves]
    traced = [x for x, a in zip(leaves, is_array) if a]

    def init(traced_leaves, rngs):
        it = iter(traced_leaves)
        a, kw = jax.tree_util.tree_unflatten(treedef, [next(it) if flag else x for x, flag in zip(leaves, is_array)])
        return module.init(rngs, *a, **kw)

    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    with nn.intercept_methods(interceptor):
        shapes = jax.eval_shape(init, traced, rngs)
    return unfreeze(shapes), tables


def _resolve(flax_key: tuple[str, ...], ndim: int, tables) -> _Target:
    collection, *mods, leaf = flax_key
    # A Stacked scope above the leaf: one layer's slice drops the leading axis.
    stacked_at = next(
        (
            d
            for d in range(len(mods))
            if any(isinstance(r, Stacked) and r.name == mods[d] for r in tables.get(tuple(mods[:d]), ()))
        ),
        None,
    )
    stacked = stacked_at is not None
    name, transform = _default_leaf(collection, leaf, ndim - 1 if stacked else ndim)
    chunk = None
    for depth in range(len(mods), -1, -1):
        if depth < len(mods):
            name = f"{mods[depth]}.{_LAYER}.{name}" if depth == stacked_at else f"{mods[depth]}.{name}"
        for rule in tables.get(tuple(mods[:depth]), ()):
            if isinstance(rule, Rename):
                m = re.fullmatch(rule.pattern, name)
                if m:
                    name = m.expand(rule.replacement)
                    c = _CHUNK.match(name)
                    if c:
                        name, chunk = c.group(1), (int(c.group(2)), int(c.group(3)))
                    if rule.transform is not None:
                        transform = rule.transform
                    break
    return _Target(name, transform, chunk, stacked)


def _ignores(tables) -> list[str]:
    return [r.pattern for rules in tables.values() for r in rules if isinstance(r, Ignore)]


def _flax_paths(shapes, collections) -> dict[tuple[str, ...], Any]:
    flat = traverse_util.flatten_dict(shapes)
    return {k: v for k, v in flat.items() if k[0] in collections}


def mapping(
    module: nn.Module,
    *example_args,
    layout: str | None = None,
    collections: Sequence[str] = ("params", "batch_stats"),
    **example_kwargs,
) -> dict[str, str]:
    """``{"params/fc_0/kernel": "fc.0.weight", ...}``: the name table, for review and debugging."""
    shapes, tables = _trace(module, layout, example_args, example_kwargs)
    out = {}
    for key, sds in _flax_paths(shapes, collections).items():
        t = _resolve(key, len(sds.shape), tables)
        out["/".join(key)] = t.key.replace(_LAYER, f"{{0..{sds.shape[0] - 1}}}") + (
            f"[{t.chunk[0]}/{t.chunk[1]}]" if t.chunk else ""
        )
    return out


# --------------------------------------------------------------------------- reports


@dataclasses.dataclass
class ConversionReport:
    """Everything that did not line up between a state dict and a Flax module."""

    missing: list[tuple[str, str, tuple]] = dataclasses.field(default_factory=list)
    unexpected: list[tuple[str, tuple]] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple, str, tuple, tuple]] = dataclasses.field(default_factory=list)
    bad_dtype: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    overflow: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.bad_dtype or self.overflow)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors"]
        for flax_path, key, shape in self.missing:
            lines.append(f"  missing torch key {key!r} (expected torch shape {shape}) for Flax {flax_path}")
        for key, shape in self.unexpected:
            lines.append(f"  unexpected torch key {key!r} with shape {shape}: no Flax variable maps to it")
        for flax_path, fshape, key, tshape, want in self.mismatched:
            lines.append(
                f"  shape mismatch: torch {key!r} has shape {tshape}, expected {want} "
                f"for Flax {flax_path} of shape {fshape}"
            )
        for key, dtype, flax_path in self.bad_dtype:
            lines.append(f"  torch {key!r} has non-float dtype {dtype}; Flax {flax_path} needs a float")
        for key, src, dst, flax_path in self.overflow:
            lines.append(f"  torch {key!r} holds finite {src} values that overflow to inf in {dst} (Flax {flax_path})")
        return "\n".join(lines)


class StateDictMismatchError(ValueError):
    """Raised by ``from_torch(strict=True)``; ``.report`` holds the full :class:`ConversionReport`."""

    def __init__(self, module_name: str, report: ConversionReport):
        self.report = report
        n = sum(map(len, (report.missing, report.unexpected, report.mismatched, report.bad_dtype, report.overflow)))
        super().__init__(f"{module_name}: state dict does not match ({n} problems)\n{report}")


def _torch_shape(target: _Target, flax_shape) -> tuple:
    shape = target.transform.to_torch(np.empty(flax_shape, dtype=np.float32)).shape
    if target.chunk:
        shape = (shape[0] * target.chunk[1], *shape[1:])
    return tuple(shape)


# --------------------------------------------------------------------------- conversion


def _load_leaf(sd, target: _Target, torch_key: str, flax_path: str, sds, report: ConversionReport, consumed):
    """One Flax leaf (or one layer's slice of a stacked leaf) from ``sd[torch_key]``; ``None`` and
    an entry in ``report`` when it does not fit."""
    if torch_key not in sd:
        report.missing.append((flax_path, torch_key, _torch_shape(target, sds.shape)))
        return None
    consumed.add(torch_key)
    arr = sd[torch_key]
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
        report.bad_dtype.append((torch_key, str(arr.dtype), flax_path))
        return None
    expected = _torch_shape(target, sds.shape)
    piece = arr
    try:
        if tuple(arr.shape) != expected:
            raise ValueError("shape")
        if target.chunk:
            i, n = target.chunk
            piece = np.split(arr, n, axis=0)[i]
        piece = target.transform.to_flax(piece)
    except ValueError:
        # The chunks of one fused tensor (in_proj_bias [i/3]) share its shape: report it once.
        if torch_key not in {m[2] for m in report.mismatched}:
            report.mismatched.append((flax_path, tuple(sds.shape), torch_key, tuple(arr.shape), expected))
        return None
    piece = np.asarray(piece, dtype=np.float32) if arr.dtype.name == "bfloat16" else piece
    with np.errstate(over="ignore"):
        cast = np.asarray(piece).astype(sds.dtype)
    if not np.array_equal(np.isfinite(cast), np.isfinite(piece)):
        # A float64 1e300 would silently become inf in float32.
        report.overflow.append((torch_key, str(arr.dtype), str(np.dtype(sds.dtype)), flax_path))
        return None
    report.loaded += 1
    return jnp.asarray(cast, dtype=sds.dtype)


def from_torch(
    module: nn.Module,
    state_dict: Mapping[str, Any] | str | os.PathLike,
    *example_args,
    layout: str | None = None,
    strict: bool = True,
    collections: Sequence[str] = ("params", "batch_stats"),
    **example_kwargs,
):
    """Flax variables for ``module`` from a PyTorch state dict.

    Args:
      module: the Flax module (unbound).
      state_dict: ``{name: tensor or array}``, or a path read with :func:`load_state_dict`.
      *example_args, **example_kwargs: example inputs (arrays or ``jax.ShapeDtypeStruct``) that
        ``module.init`` takes; only their shapes are used.
      layout: which PyTorch layout the state dict follows (``"official"``, ``"timm"``,
        ``"torch.nn"``...); ``None`` = the module's default.
      strict: raise one :class:`StateDictMismatchError` listing every missing/unexpected key,
        shape mismatch and non-float dtype. With ``strict=False`` return ``(variables, report)``
        instead, with missing variables taken from a fresh ``module.init``.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` with each leaf in the dtype ``module.init`` gives it.
      ``num_batches_tracked`` buffers are ignored.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_state_dict(state_dict)
    sd = {k: to_numpy(v) for k, v in state_dict.items()}
    shapes, tables = _trace(module, layout, example_args, example_kwargs)
    report = ConversionReport()
    consumed: set[str] = set()
    flat_out: dict[tuple[str, ...], Any] = {}
    for key, sds in _flax_paths(shapes, collections).items():
        target = _resolve(key, len(sds.shape), tables)
        flax_path = "/".join(key)
        if target.stacked:
            layer_shape = jax.ShapeDtypeStruct(tuple(sds.shape[1:]), sds.dtype)
            layers = [
                _load_leaf(sd, target, target.layer_key(i), f"{flax_path}[{i}]", layer_shape, report, consumed)
                for i in range(sds.shape[0])
            ]
            if all(x is not None for x in layers):
                flat_out[key] = jnp.stack(layers)
            continue
        piece = _load_leaf(sd, target, target.key, flax_path, sds, report, consumed)
        if piece is not None:
            flat_out[key] = piece
    ignores = [re.compile(p) for p in (r"(^|\.)num_batches_tracked$", *_ignores(tables))]
    for k, v in sd.items():
        if k not in consumed and not any(p.search(k) for p in ignores):
            report.unexpected.append((k, tuple(v.shape)))
    if strict:
        if not report.ok:
            raise StateDictMismatchError(type(module).__name__, report)
        return traverse_util.unflatten_dict(flat_out)
    if report.missing or report.mismatched or report.bad_dtype or report.overflow:
        fresh = traverse_util.flatten_dict(
            unfreeze(
                module.init(
                    {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, *example_args, **example_kwargs
                )
            )
        )
        for key in _flax_paths(shapes, collections):
            flat_out.setdefault(key, fresh[key])
    return traverse_util.unflatten_dict(flat_out), report


def to_torch(
    module: nn.Module,
    variables: Mapping[str, Any],
    *example_args,
    layout: str | None = None,
    collections: Sequence[str] = ("params", "batch_stats"),
    return_tensors: str = "np",
    **example_kwargs,
) -> dict[str, Any]:
    """The PyTorch state dict for Flax ``variables`` (the inverse of :func:`from_torch`, exactly).

    ``return_tensors="pt"`` gives torch tensors (needs torch), ready for ``load_state_dict``.
    """
    shapes, tables = _trace(module, layout, example_args, example_kwargs)
    flat = traverse_util.flatten_dict(unfreeze(variables))
    pieces: dict[str, dict[int, np.ndarray]] = {}
    counts: dict[str, int] = {}
    out: dict[str, np.ndarray] = {}
    for key, sds in _flax_paths(shapes, collections).items():
        if key not in flat:
            raise KeyError(f"to_torch: variables lack {'/'.join(key)} (shape {tuple(sds.shape)})")
        arr = np.asarray(flat[key])
        if tuple(arr.shape) != tuple(sds.shape):
            raise ValueError(f"to_torch: {'/'.join(key)} has shape {arr.shape}, the module expects {tuple(sds.shape)}")
        target = _resolve(key, arr.ndim, tables)
        slices = [(target.layer_key(i), a) for i, a in enumerate(arr)] if target.stacked else [(target.key, arr)]
        for torch_key, a in slices:
            t = target.transform.to_torch(a)
            if target.chunk:
                i, n = target.chunk
                pieces.setdefault(torch_key, {})[i] = t
                counts[torch_key] = n
            else:
                out[torch_key] = np.ascontiguousarray(t)
    for name, parts in pieces.items():
        if sorted(parts) != list(range(counts[name])):
            raise ValueError(f"to_torch: fused {name!r} needs chunks 0..{counts[name] - 1}, got {sorted(parts)}")
        out[name] = np.concatenate([parts[i] for i in range(counts[name])], axis=0)
    if return_tensors == "pt":
        import torch

        return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}
    if return_tensors != "np":
        raise ValueError(f"to_torch: return_tensors must be 'np' or 'pt', got {return_tensors!r}")
    return out
