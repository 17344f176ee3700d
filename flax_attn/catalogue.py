"""The single catalogue of blocks: it drives the parity tests, the benchmarks, the CLI and the README table.

Each block family registers its entries at import (``register(Entry(...))`` at the bottom of its
module), so adding a block means writing one entry beside the block. An entry holds everything
needed to build the Flax block and its PyTorch reference with the *same* constructor arguments,
to make example inputs, and to compare the two.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["Entry", "entries", "get", "image_inputs", "markdown_table", "register", "torch_factory"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One catalogued block.

    Attributes:
      name: catalogue key, snake_case (``"se_layer"``); used by the CLI (``--block``).
      family: the module file (``"se"``).
      paper: short citation, e.g. ``"Hu et al., CVPR 2018"``.
      arxiv: arXiv id or ``None``.
      flax: factory ``(**config) -> flax module``.
      torch: ``"module.path:factory"`` returning the PyTorch reference for ``**config``; imported
        lazily (torch is optional). ``None`` when there is no PyTorch reference.
      config: small constructor arguments shared by both factories (the reference's names).
      inputs: ``rng -> {argument name: array}`` in Flax layout: small odd, non-square shapes.
      bench_inputs: like ``inputs`` with benchmark-sized shapes (defaults to ``inputs``).
      bench_config: constructor arguments for benchmarks (defaults to ``config``).
      image_inputs: argument names that are NHWC images (moved to NCHW for torch).
      output_layout: ``"nhwc"`` (torch returns channels-first images), ``"same"``, or a callable
        applied to the torch outputs (torch tensors in, torch tensors in Flax layout out).
      call_kwargs: extra keyword arguments for both calls (e.g. ``need_weights=True``).
      torch_call: ``(torch_module, **inputs) -> outputs`` when a plain call does not fit.
      layouts: PyTorch state-dict layouts the converter supports; the first is the default.
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
    layouts: tuple[str, ...] = ("official",)
    atol: float = 1e-5
    rtol: float = 1e-5
    kernel: str | None = None
    train_mode: bool = True
    slow: bool = False
    allowed_hlo: Mapping[str, str] = dataclasses.field(default_factory=dict)
    float64_modes: tuple[str, ...] = ()
    conditioning: str = ""
    float64_tolerance: float = 1e-9

    def make_inputs(self, rng: np.random.Generator, config: Mapping[str, Any] | None = None):
        """Example inputs; ``inputs`` may take ``(rng)`` or ``(rng, config)`` to follow overrides."""
        try:
            n_params = len(inspect.signature(self.inputs).parameters)
        except (TypeError, ValueError):
            n_params = 1
        if n_params >= 2:
            return self.inputs(rng, dict(self.config if config is None else config))
        return self.inputs(rng)

    def build_flax(self, config: Mapping[str, Any] | None = None):
        return self.flax(**dict(self.config if config is None else config))

    def build_torch(self, config: Mapping[str, Any] | None = None):
        if self.torch is None:
            raise ValueError(f"catalogue entry {self.name!r} has no PyTorch reference")
        return torch_factory(self.torch)(**dict(self.config if config is None else config))


def image_inputs(*shape: int, name: str = "x") -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    """``inputs`` for a block taking one NHWC image batch: ``image_inputs(3, 13, 17, 8)``."""
    return lambda rng: {name: rng.standard_normal(shape, dtype=np.float32)}


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    """Add ``entry``; names are unique across the library."""
    if entry.name in _REGISTRY and _REGISTRY[entry.name] is not entry:
        raise ValueError(f"catalogue: duplicate block name {entry.name!r}")
    if entry.layouts and len(set(entry.layouts)) != len(entry.layouts):
        raise ValueError(f"catalogue: {entry.name!r} lists a layout twice: {entry.layouts}")
    bad_modes = set(entry.float64_modes) - {"eval", "train"}
    if bad_modes:
        raise ValueError(f"catalogue: {entry.name!r} float64_modes must name 'eval'/'train', got {sorted(bad_modes)}")
    if entry.float64_modes and not entry.conditioning:
        raise ValueError(f"catalogue: {entry.name!r} compares in float64 without a measured reason (conditioning)")
    _REGISTRY[entry.name] = entry
    return entry


def _load_all() -> None:
    import flax_attn  # noqa: F401  (importing the package registers every family)


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
        "| Block | Paper | Flax class | PyTorch layouts | Pallas kernel | Parity (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries():
        paper = e.paper + (f" ([arXiv {e.arxiv}](https://arxiv.org/abs/{e.arxiv}))" if e.arxiv else "")
        cls = getattr(e.flax, "__qualname__", getattr(e.flax, "__name__", str(e.flax)))
        module = getattr(e.flax, "__module__", "")
        kernel = e.kernel or "-"
        tol = _parity_cell(e)
        rows.append(f"| `{e.name}` | {paper} | `{module}.{cls}` | {', '.join(e.layouts)} | {kernel} | {tol} |")
    return "\n".join(rows)
