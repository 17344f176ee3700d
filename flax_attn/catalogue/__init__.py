"""The single catalogue of blocks: it drives the parity tests, the benchmarks, the CLI and the README table.

The catalogue is test and tooling data, kept beside the library rather than inside it: the block
files (``flax_attn/se.py``, ...) hold modules and their conversion rules only, and each family's
entries live in ``flax_attn/catalogue/<family>.py``: the file states the family's shared facts once
(``add = catalogue.family("se", paper=..., arxiv=...)``) and each block's own with one ``add(...)``. Those
files are imported on the first call of :func:`entries` or :func:`get`, never by ``import
flax_attn``. An entry holds everything needed to build the Flax block and its PyTorch reference
with the *same* constructor arguments, to make example inputs, to call both, and to compare them.

Example:
  >>> from flax_attn import catalogue
  >>> entry = catalogue.get("se_layer")
  >>> entry.flax_class.__name__, entry.layouts[0]
  ('SELayer', 'official')
  >>> sorted(entry.make_inputs(np.random.default_rng(0)))
  ['x']
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "Entry",
    "entries",
    "families",
    "family",
    "get",
    "image_batch",
    "markdown_table",
    "register",
    "torch_factory",
]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One catalogued block.

    Attributes:
      name: catalogue key, snake_case (``"se_layer"``); used by the CLI (``--block``).
      family: the block file the class lives in (``"se"`` for ``flax_attn/se.py``); its entries
        live in ``flax_attn/catalogue/se.py``.
      paper: short citation, e.g. ``"Hu et al., CVPR 2018"``.
      arxiv: arXiv id or ``None``.
      flax: factory ``(**config) -> flax module``: the public class itself, a public factory of the
        block file (``se_resnet18``), or a function of the catalogue file that assembles public
        classes (``SpatialTransformer`` around a ``TutorialLocalization``).
      torch: ``"module.path:factory"`` returning the PyTorch reference for ``**config``; imported
        lazily (torch is optional). ``None`` when there is no PyTorch reference.
      config: small constructor arguments shared by both factories (the reference's names).
      inputs: ``rng -> {argument name: array}`` in Flax layout: small odd, non-square shapes.
      bench_inputs: like ``inputs`` with benchmark-sized shapes (defaults to ``inputs``).
      bench_config: constructor arguments for benchmarks (defaults to ``config``).
      image_inputs: names of the inputs that are NHWC images (moved to NCHW for torch). Not to be
        confused with :func:`image_batch`, which *makes* an ``inputs`` function.
      output_layout: ``"nhwc"`` (torch returns channels-first images), ``"same"``, or a callable
        applied to the torch outputs (torch tensors in, torch tensors in Flax layout out).
      call_kwargs: extra keyword arguments for both calls (e.g. ``need_weights=True``).
      torch_call: ``(torch_module, **inputs, **call_kwargs) -> outputs`` when a plain call does not fit.
      flax_call: ``(bound_flax_module, **inputs, **call_kwargs, train=...) -> outputs`` when a plain
        call does not fit (the inputs are flat keyword arrays, the block takes a list of them). It
        runs as Flax's ``apply(..., method=flax_call)``, so the variables are the block's own and no
        wrapper class is needed; :attr:`flax_kwargs` passes it along.
      layouts: PyTorch state-dict layouts the parity tests and the CLI use; the first is the default.
        ``None`` (the usual case) reads the class's ``torch_layouts``, the single source of a block's
        layouts; an explicit tuple must list some of those, in the class's order.
      atol, rtol: parity tolerance reached (and tested) in float32 on CPU.
      kernel: name of the Pallas kernel behind the block, if any.
      train_mode: whether the block behaves differently in training (BatchNorm, dropout).
      slow: a whole model too heavy for the quick test run; its parity tests carry
        ``pytest.mark.slow`` (deselect with ``-m "not slow"``).
      allowed_hlo: serial StableHLO ops (``flax_attn.testing.hlo.SERIAL_OPS``) that the block's
        jitted train-mode forward + backward may lower to, each mapped to the reason it cannot be
        avoided (``{"stablehlo.scatter": "grid_sample: data-dependent bilinear gather"}``). Only
        data-dependent sampling justifies a scatter; ``select_and_scatter`` is never allowed.
        ``tests/test_hlo_census.py`` fails on any op not declared here and on any declared op
        that is no longer there.
      float64_modes: the modes (``"eval"``, ``"train"``) whose parity test compares in float64 on
        both sides, because float32 agreement there is ill-conditioned: each framework's own
        float32-vs-float64 difference (``testing.parity.measure_conditioning``) uses up a large part
        of the float32 tolerance, so the result would depend on the CPU's kernels.
      conditioning: the measured reason for ``float64_modes`` (or for a loosened tolerance).
      float64_tolerance: atol and rtol of the float64 comparison; 1e-9 unless part of the
        reference is float32 by definition (DETR's sine position encoding), with a comment why.
    """

    name: str
    family: str
    paper: str
    flax: Callable[..., Any]
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]
    torch: str | None = None
    arxiv: str | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    bench_inputs: Callable[[np.random.Generator], dict[str, np.ndarray]] | None = None
    bench_config: Mapping[str, Any] | None = None
    image_inputs: tuple[str, ...] = ("x",)
    output_layout: str | Callable[[Any], Any] = "nhwc"
    call_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    torch_call: Callable[..., Any] | None = None
    flax_call: Callable[..., Any] | None = None
    layouts: tuple[str, ...] | None = None
    atol: float = 1e-5
    rtol: float = 1e-5
    kernel: str | None = None
    train_mode: bool = True
    slow: bool = False
    allowed_hlo: Mapping[str, str] = dataclasses.field(default_factory=dict)
    float64_modes: tuple[str, ...] = ()
    conditioning: str = ""
    float64_tolerance: float = 1e-9

    def __post_init__(self):
        declared = getattr(self.flax_class, "torch_layouts", None)
        if declared is None:
            raise ValueError(
                f"catalogue entry {self.name!r}: {_qualified(self.flax_class)} declares no `torch_layouts`; "
                "a block's layouts live on its class (torch_layouts = (...)), the entry reads them there"
            )
        declared = tuple(declared)
        if self.layouts is None:
            object.__setattr__(self, "layouts", declared)
            return
        layouts = tuple(self.layouts)
        if [x for x in declared if x in layouts] != list(layouts):
            raise ValueError(
                f"catalogue entry {self.name!r}: `layouts` must list layouts of {_qualified(self.flax_class)}."
                f"torch_layouts in that order, expected a subsequence of {declared}, got {layouts}"
            )
        object.__setattr__(self, "layouts", layouts)

    @property
    def flax_class(self) -> type:
        """The Flax module class ``flax`` builds (the class itself, or what a factory returns)."""
        if isinstance(self.flax, type):
            return self.flax
        return type(self.build_flax())

    @property
    def flax_name(self) -> str:
        """What the README table and the CLI show: ``flax_attn.<family>.<public name>``.

        The ``flax`` callable's own name when it is public and lives in a block file
        (``flax_attn.se.se_resnet18``), else the class it builds (``flax_attn.stn.SpatialTransformer``).
        """
        f = self.flax
        module = getattr(f, "__module__", "") or ""
        public = not getattr(f, "__name__", "_").startswith("_") and "<" not in getattr(f, "__qualname__", "<")
        if isinstance(f, type) or (public and not module.startswith(__name__)):
            return _qualified(f)
        return _qualified(self.flax_class)

    @property
    def flax_signature(self) -> str:
        """:attr:`flax_name` called with the entry's ``config``, as the README table and the CLI show it.

        For an entry whose factory assembles public classes (``spatial_transformer``), the arguments
        are that factory's.
        """
        return f"{self.flax_name}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    @property
    def flax_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the Flax side's ``init``/``apply`` (and ``from_torch``/``to_torch``):
        ``call_kwargs``, plus ``method=flax_call`` when the entry has one."""
        kwargs = dict(self.call_kwargs)
        if self.flax_call is not None:
            kwargs["method"] = self.flax_call
        return kwargs

    def call_torch(self, module, **inputs):
        """Call the PyTorch reference on torch-layout ``inputs`` (through ``torch_call`` if set)."""
        if self.torch_call is not None:
            return self.torch_call(module, **inputs, **self.call_kwargs)
        return module(**inputs, **self.call_kwargs)

    def inputs_follow_config(self, bench: bool = False) -> bool:
        """Whether the ``inputs`` (``bench_inputs``) function takes ``(rng, config)``, so its shapes
        follow a changed config, rather than ``(rng)`` alone. The one place that asks."""
        make = self.bench_inputs if bench and self.bench_inputs is not None else self.inputs
        try:
            return len(inspect.signature(make).parameters) >= 2
        except (TypeError, ValueError):
            return False

    def make_inputs(self, rng: np.random.Generator, config: Mapping[str, Any] | None = None, *, bench: bool = False):
        """Example inputs (``bench=True``: ``bench_inputs``, falling back to ``inputs``); ``inputs``
        may take ``(rng)`` or ``(rng, config)`` to follow overrides."""
        make = self.bench_inputs if bench and self.bench_inputs is not None else self.inputs
        if self.inputs_follow_config(bench):
            return make(rng, dict(self.config if config is None else config))
        return make(rng)

    def build_flax(self, config: Mapping[str, Any] | None = None):
        return self.flax(**dict(self.config if config is None else config))

    def build_torch(self, config: Mapping[str, Any] | None = None):
        if self.torch is None:
            raise ValueError(f"catalogue entry {self.name!r} has no PyTorch reference")
        return torch_factory(self.torch)(**dict(self.config if config is None else config))


def _qualified(f) -> str:
    return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', getattr(f, '__name__', repr(f)))}"


def image_batch(*shape: int, name: str = "x") -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    """An ``inputs`` function for a block taking one NHWC image batch: ``image_batch(3, 13, 17, 8)``.

    Example:
      >>> make = image_batch(3, 13, 17, 8)
      >>> make(np.random.default_rng(0))["x"].shape
      (3, 13, 17, 8)
    """
    return lambda rng: {name: rng.standard_normal(shape, dtype=np.float32)}


_REGISTRY: dict[str, Entry] = {}
_LOADED = False


def register(entry: Entry) -> Entry:
    """Add ``entry``; names are unique across the library."""
    if not isinstance(entry, Entry):
        raise TypeError(f"catalogue.register: `entry` must be a catalogue.Entry, got {type(entry).__name__}")
    if entry.name in _REGISTRY and _REGISTRY[entry.name] is not entry:
        raise ValueError(f"catalogue: duplicate block name {entry.name!r}")
    if len(set(entry.layouts)) != len(entry.layouts):
        raise ValueError(f"catalogue: {entry.name!r} lists a layout twice: {entry.layouts}")
    bad_modes = set(entry.float64_modes) - {"eval", "train"}
    if bad_modes:
        raise ValueError(f"catalogue: {entry.name!r} float64_modes must name 'eval'/'train', got {sorted(bad_modes)}")
    if entry.float64_modes and not entry.conditioning:
        raise ValueError(f"catalogue: {entry.name!r} compares in float64 without a measured reason (conditioning)")
    _REGISTRY[entry.name] = entry
    return entry


TORCH_REFERENCES = "flax_attn.testing.torch_ref"
"""The package of the PyTorch references: family ``se``'s is ``flax_attn.testing.torch_ref.se``."""

_FLAX_NAME = object()  # `add`'s default torch factory: the one named like the entry's `flax`


def family(family: str, /, *, paper: str, arxiv: str | None = None, **shared: Any) -> Callable[..., Entry]:
    """The registrar of one family's entries, with what they share stated once.

    ``family``, ``paper``, ``arxiv`` and any other :class:`Entry` field in ``shared`` (``kernel``,
    ``train_mode``, ...) go to every entry; the reference module is ``TORCH_REFERENCES.<family>``.
    The returned ``add(*, name, flax, torch=..., **fields)`` registers one :class:`Entry` with the
    entry's own ``fields`` (which override ``shared``, ``paper`` and ``arxiv``) and returns it;
    ``torch`` names the reference's factory in the family's module, by default the one named like
    ``flax`` (``flax=SELayer`` -> ``"flax_attn.testing.torch_ref.se:SELayer"``), ``None`` for none.

    In ``flax_attn/catalogue/se.py``::

      add = family("se", paper="Hu et al., CVPR 2018", arxiv="1709.01507")
      add(name="se_layer", flax=SELayer, config=dict(channel=32, reduction=4), ...)  # torch_ref.se:SELayer
      add(name="se_basic_block", flax=SEBasicBlock, torch="se_basic_block", ...)
    """
    module = f"{TORCH_REFERENCES}.{family}"
    common = dict(paper=paper, arxiv=arxiv, **shared)
    own = {"name", "family", "flax", "torch"}  # each entry's, or the registrar's
    bad = sorted(set(common) - ({f.name for f in dataclasses.fields(Entry)} - own))
    if bad:
        raise TypeError(
            f"catalogue.family({family!r}): `shared` must name Entry fields other than {sorted(own)}, got {bad}"
        )

    def add(*, name: str, flax: Callable[..., Any], torch: Any = _FLAX_NAME, **fields: Any) -> Entry:
        if torch is _FLAX_NAME:
            torch = flax.__name__
        spec = None if torch is None else f"{module}:{torch}"
        return register(Entry(name=name, family=family, flax=flax, torch=spec, **{**common, **fields}))

    return add


def families() -> list[str]:
    """The catalogue files (one per block family), i.e. the modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def _load_all() -> None:
    """Import every family's catalogue file once (each registers its entries)."""
    global _LOADED
    if _LOADED:
        return
    for family in families():
        importlib.import_module(f"{__name__}.{family}")
    _LOADED = True


def entries() -> list[Entry]:
    """All catalogued blocks, sorted by family then name."""
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda e: (e.family, e.name))


def get(name: str) -> Entry:
    """The entry called ``name``; the error lists the known names."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown block {name!r}; known blocks: {sorted(_REGISTRY)}") from None


def torch_factory(spec: str) -> Callable[..., Any]:
    """Resolve ``"package.module:attr"`` (imports torch lazily, through the reference module)."""
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _parity_cell(e: Entry) -> str:
    if not e.torch:
        return "no reference"
    modes = ("eval", "train") if e.train_mode else ("eval",)
    f32 = [m for m in modes if m not in e.float64_modes]
    parts = [f"{'/'.join(f32)} f32 atol {e.atol:g}, rtol {e.rtol:g}"] if f32 else []
    f64 = [m for m in modes if m in e.float64_modes]
    if f64:
        parts.append(f"{'/'.join(f64)} f64 (ill-conditioned in f32)")
    return "; ".join(parts)


def markdown_table() -> str:
    """The README's table of blocks, generated from the catalogue (a test keeps the README in sync)."""
    rows = [
        "| Block | Paper | Flax class (catalogue arguments) | PyTorch layouts | Pallas kernel | Parity (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries():
        paper = e.paper + (f" ([arXiv {e.arxiv}](https://arxiv.org/abs/{e.arxiv}))" if e.arxiv else "")
        kernel = e.kernel or "-"
        tol = _parity_cell(e)
        rows.append(f"| `{e.name}` | {paper} | `{e.flax_signature}` | {', '.join(e.layouts)} | {kernel} | {tol} |")
    return "\n".join(rows)
