"""Training configurations as data: one frozen-by-convention dataclass tree per task.

A config names everything a run needs: the task, the model (by import string, resolved lazily),
the data, the optimiser chain, precision, checkpointing and logging. ``flax-attn-train --config
NAME`` picks one from :data:`CONFIGS`; ``--override key=value`` edits any field by its dotted
path (``optim.learning_rate=3e-3``, ``model.kwargs.widths=(16,32)``, ``steps=50``).
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "CONFIGS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "a2n_x2",
    "a2n_x3",
    "a2n_x4",
    "apply_overrides",
    "classify",
    "classify_folder",
    "get_config",
    "hard_attention",
    "superres",
    "superres_folder",
    "validate",
]


class ConfigError(ValueError):
    """A config or an override is not valid; the message names the key, the expected and the actual value."""


class UnknownKeyError(ConfigError, KeyError):
    """An override names a field that does not exist (or a config name that is not registered)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass
class ModelConfig:
    """Which Flax module to build.

    Attributes:
      name: ``"package.module:Class"`` (imported only when the model is built, so a config may
        name a block family that is not installed yet), or a short alias from
        :data:`flax_attn.training.models.ALIASES`.
      kwargs: constructor arguments. ``dtype`` is added from ``Config.precision`` when the class
        has a ``dtype`` attribute and the kwargs do not set it.
      torch_layout: state-dict layout for ``--init-from`` (``None`` = the module's default).
    """

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    torch_layout: str | None = None


@dataclasses.dataclass
class OptimConfig:
    """An Optax chain: clip -> optimiser (with masked weight decay) driven by a schedule.

    Attributes:
      name: ``"adamw"`` or ``"sgd"`` (SGD with momentum; decoupled weight decay is added the
        same masked way).
      learning_rate: peak learning rate.
      schedule: ``"constant"``, ``"cosine"`` (cosine decay to ``end_lr_factor * lr``),
        ``"linear"`` or ``"step"`` (multiplied by ``decay_factor`` every ``decay_every`` steps, the
        EDSR/A2N schedule); each with ``warmup_steps`` of linear warmup from 0.
      weight_decay: decoupled weight decay; applied only to parameters with ndim >= 2 (kernels)
        unless ``decay_norms_and_biases``.
      clip_grad_norm: global-norm clipping threshold, ``None`` for none.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    end_lr_factor: float = 0.0
    weight_decay: float = 1e-4
    decay_norms_and_biases: bool = False
    momentum: float = 0.9
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_grad_norm: float | None = None
    decay_every: int = 0
    decay_factor: float = 0.5


@dataclasses.dataclass
class DataConfig:
    """Data of a task. The training order is a pure function of ``(Config.seed, epoch)``.

    Attributes:
      batch_size: *global* batch (all devices, all processes); must divide by the number of
        devices on the ``data`` mesh axis.
      eval_batch_size: global eval batch; the eval set is padded (and masked) to a multiple.
      image_size: classify, hard_attention: digits are resized from 8x8 to this (8 = no resize).
      canvas_size: hard_attention: the resized digit is centred on a zero square canvas this big.
      test_fraction: classify: held-out fraction of the digits, stratified, split seed fixed.
      split_seed: classify: seed of the fixed train/test split (independent of ``Config.seed``).
      scale: superres: upscaling factor.
      patch_size: superres: low-resolution training crop size.
      eval_size: superres: high-resolution centre crop of each evaluation image.
      train_images / eval_images: superres: ``skimage.data`` names (disjoint lists).
      augment: random flips (superres) / random shifts by one pixel (classify) / random
        resized crops (classify from a folder).
      root: classify from image files: a class-folder tree ``root/<class>/*.{png,jpg,jpeg}`` or a
        ``.csv``/``.json`` list of ``path,label`` (``""`` = the in-memory digits).
      eval_root: classify: evaluation images in the same form; ``""`` = hold back a stratified
        ``test_fraction`` of ``root`` (split fixed by ``split_seed``).
      train_dir: superres from image files: a folder of HR images (DIV2K-style); LR is made on
        the fly (PIL bicubic, :mod:`flax_attn.training.folders`). ``""`` = the skimage photos.
      eval_dir: superres: a Set5/Set14-layout folder evaluated on whole images (Y channel,
        ``scale`` border), ``""`` = centre crops of ``eval_images``.
      channels: folders: 1 (luminance) or 3 (RGB).
      crop_scale, crop_ratio: classify from a folder: random-resized-crop area fraction and aspect
        ratio ranges (``augment``).
      hflip: classify from a folder: random horizontal flips.
      eval_crop_fraction: classify from a folder: evaluation resizes the shorter side to
        ``image_size / eval_crop_fraction`` and takes the central square.
      workers: folders: grain worker processes decoding and augmenting (0 = threads of this process).
      read_threads: folders: grain reader threads (per worker, or in this process).
    """

    batch_size: int = 64
    eval_batch_size: int = 512
    image_size: int = 8
    canvas_size: int = 28
    test_fraction: float = 0.2
    split_seed: int = 0
    scale: int = 2
    patch_size: int = 24
    eval_size: int = 192
    train_images: tuple[str, ...] = ()
    eval_images: tuple[str, ...] = ()
    augment: bool = True
    root: str = ""
    eval_root: str = ""
    train_dir: str = ""
    eval_dir: str = ""
    channels: int = 3
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    crop_ratio: tuple[float, ...] = (0.75, 4 / 3)
    hflip: bool = True
    eval_crop_fraction: float = 0.875
    workers: int = 0
    read_threads: int = 2


@dataclasses.dataclass
class CheckpointConfig:
    """Orbax checkpointing.

    Attributes:
      every_steps: save every N steps (0 = only at the end, on SIGTERM and at evaluations).
      max_to_keep: latest checkpoints kept for resuming.
      best_metric: eval metric whose best checkpoint is kept in addition (``None`` = none).
      best_mode: ``"max"`` or ``"min"``.
      async_save: write in a background thread while training continues.
    """

    every_steps: int = 100
    max_to_keep: int = 3
    best_metric: str | None = None
    best_mode: str = "max"
    async_save: bool = True


@dataclasses.dataclass
class Config:
    """A whole training run.

    Attributes:
      name: config name (``--config``).
      task: ``"classify"``, ``"superres"``, ``"hard_attention"`` (in-memory data), ``"classify_folder"``
        or ``"superres_folder"`` (image files, :mod:`flax_attn.training.folders`); see
        :data:`flax_attn.training.tasks.TASKS`.
      seed: seeds parameter init, data order and dropout/augmentation rngs.
      steps: total optimiser steps.
      eval_every: evaluate every N steps (and at the end); 0 = only at the end.
      log_every: progress line and metrics line every N steps.
      precision: ``"float32"`` or ``"bfloat16"`` (bf16 compute, float32 parameters/optimiser).
      model_axis: size of the ``model`` mesh axis (1 = pure data parallelism); the ``data`` axis
        takes the remaining devices.
      ema_decay: exponential moving average of the parameters, ``ema = d * ema + (1 - d) * params``
        after every step (0 = off); evaluation and the best checkpoint then use the average.
      grad_accum_steps: split each global batch into this many micro-batches inside the step and
        average their gradients (same update, 1/k of the activation memory).
    """

    name: str
    task: str
    model: ModelConfig
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    seed: int = 0
    steps: int = 1000
    eval_every: int = 0
    log_every: int = 50
    precision: str = "float32"
    model_axis: int = 1
    ema_decay: float = 0.0
    grad_accum_steps: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- the configs


def _warmup_cosine_adamw(learning_rate: float, weight_decay: float) -> OptimConfig:
    """The small in-memory recipes' optimiser: AdamW, 50 warmup steps, cosine decay, clipping at 1."""
    return OptimConfig(
        name="adamw",
        learning_rate=learning_rate,
        schedule="cosine",
        warmup_steps=50,
        weight_decay=weight_decay,
        clip_grad_norm=1.0,
    )


def classify() -> Config:
    """Digits classification (scikit-learn ``load_digits``: 1797 real 8x8 scans, 10 classes).

    A small SE-style residual CNN (``flax_attn.training.models:SmallSECNN``) on the native 8x8 digits (set
    ``data.image_size`` to upsample; 8x8 is enough for this model), AdamW
    with cosine decay, fixed stratified 80/20 split. Reaches >= 97% test accuracy on one CPU in
    well under five minutes (measured: ``benchmarks/results/train_tasks.md``)::

        flax-attn-train --config classify --workdir /tmp/classify

    When the catalogued SE-ResNet lands (``flax_attn.se``), switch with
    ``--override model.name=flax_attn.se:SEResNet --override model.kwargs={...}``; the default
    will point there once the integrator wires it.
    """
    return Config(
        name="classify",
        task="classify",
        model=ModelConfig(
            "flax_attn.training.models:SmallSECNN", {"num_classes": 10, "widths": (32, 64), "reduction": 4}
        ),
        optim=_warmup_cosine_adamw(learning_rate=3e-3, weight_decay=5e-4),
        data=DataConfig(batch_size=64, eval_batch_size=512, image_size=8, augment=True),
        checkpoint=CheckpointConfig(every_steps=200, max_to_keep=2, best_metric="accuracy", best_mode="max"),
        steps=800,
        eval_every=200,
        log_every=50,
    )


def superres() -> Config:
    """x2 super-resolution with A2N on crops of the real photographs bundled with scikit-image.

    Bicubic-downscaled (PIL) inputs, L1 loss, PSNR/SSIM on the Y channel (BT.601, border of
    ``scale`` pixels shaved) against the bicubic baseline on a disjoint list of evaluation
    images. The model is the catalogued A2N (``flax_attn.a2n:A2N``) at the paper's size (nf=40,
    unf=24, nb=16), trained for a CPU-sized budget; ``model.name=tiny_sr`` selects a tiny residual
    CNN for quick experiments. Measured margin over bicubic: ``benchmarks/results/train_tasks.md``::

        flax-attn-train --config superres --workdir /tmp/superres
    """
    return Config(
        name="superres",
        task="superres",
        model=ModelConfig("flax_attn.a2n:A2N", {"scale": 2, "nf": 40, "unf": 24, "nb": 16}),
        optim=_warmup_cosine_adamw(learning_rate=1e-3, weight_decay=0.0),
        data=DataConfig(
            batch_size=16,
            eval_batch_size=4,
            scale=2,
            patch_size=32,
            eval_size=192,
            train_images=(
                "astronaut",
                "coffee",
                "rocket",
                "immunohistochemistry",
                "hubble_deep_field",
                "retina",
                "moon",
                "grass",
                "gravel",
                "brick",
            ),
            eval_images=("chelsea", "camera", "coins", "clock"),
        ),
        checkpoint=CheckpointConfig(every_steps=200, max_to_keep=2, best_metric="psnr", best_mode="max"),
        steps=300,
        eval_every=100,
        log_every=50,
    )


def hard_attention() -> Config:
    """Hard attention: the Recurrent Attention Model (``flax_attn.hard_attention``) on digits.

    The scikit-learn digits (the classify task's fixed split) upsampled to 16x16 and centred on a
    28x28 canvas; six glimpses of a two-scale 8x8 retina (g=8, k=2, s=2: 8x8 and 16x16 patches),
    policy std 0.17, the official hybrid loss (NLL + REINFORCE with a learned baseline + baseline
    MSE) with Adam at 1e-3 (the official learning rate is 3e-4 over hundreds of MNIST epochs; this
    is a CPU budget). Locations and policy noise come from the step's rng, so runs are
    deterministic and resumable. Test accuracy averages 10 Monte-Carlo rollouts as the official
    test does (``accuracy``), ``accuracy_mean`` uses the mean policy::

        flax-attn-train --config hard_attention --workdir /tmp/hard_attention
    """
    return Config(
        name="hard_attention",
        task="hard_attention",
        model=ModelConfig(
            "flax_attn.hard_attention:RecurrentAttention",
            {
                "g": 8,
                "k": 2,
                "s": 2,
                "c": 1,
                "h_g": 128,
                "h_l": 128,
                "std": 0.17,
                "hidden_size": 256,
                "num_classes": 10,
                "num_glimpses": 6,
            },
        ),
        optim=OptimConfig(
            name="adamw",
            learning_rate=1e-3,
            schedule="constant",
            warmup_steps=0,
            weight_decay=0.0,
            clip_grad_norm=None,
        ),
        data=DataConfig(batch_size=64, eval_batch_size=360, image_size=16, canvas_size=28, augment=False),
        checkpoint=CheckpointConfig(every_steps=500, max_to_keep=2, best_metric="accuracy", best_mode="max"),
        steps=1500,
        eval_every=500,
        log_every=100,
    )


def classify_folder() -> Config:
    """Image classification from a folder tree ``root/<class>/*.{png,jpg,jpeg}`` (ImageNet-style) or a
    ``.csv``/``.json`` list of ``path,label``, through the grain pipeline of
    :mod:`flax_attn.training.folders` (decoding, random-resized crop and flip in grain workers,
    per-process rows, iterator state in the checkpoint). The number of classes and of input
    channels (``data.channels``) is taken from the data; evaluation uses ``data.eval_root`` or,
    when empty, a stratified ``data.test_fraction`` held back from ``data.root``. The model is the
    SE-style CNN of ``classify``; on a pod, point ``model.name`` at a bigger one::

        flax-attn-train --config classify_folder --override data.root=/data/train \\
            --override data.eval_root=/data/val --workdir /tmp/classify_folder
    """
    c = classify()
    c.name, c.task = "classify_folder", "classify_folder"
    c.model.kwargs.update(num_classes=None, in_chans=None)
    c.data = DataConfig(batch_size=64, eval_batch_size=256, image_size=64, test_fraction=0.1, augment=True, workers=2)
    c.steps, c.eval_every, c.log_every = 2000, 500, 50
    c.checkpoint = CheckpointConfig(every_steps=500, max_to_keep=2, best_metric="accuracy", best_mode="max")
    return c


def superres_folder() -> Config:
    """x2 super-resolution from a folder of HR images (``data.train_dir``, DIV2K-style), LR made on the
    fly by PIL bicubic, evaluated on whole images of a Set5/Set14-layout folder (``data.eval_dir``:
    PSNR/SSIM on Y with a border of ``scale`` pixels, the A2N protocol). A2N at the paper's size;
    the full A2N recipes are ``a2n_x2``/``a2n_x3``/``a2n_x4``::

        flax-attn-train --config superres_folder --override data.train_dir=/data/DIV2K_train_HR \\
            --override data.eval_dir=/data/Set5 --workdir /tmp/superres_folder
    """
    c = superres()
    c.name, c.task = "superres_folder", "superres_folder"
    c.data = DataConfig(batch_size=16, eval_batch_size=1, scale=2, patch_size=48, augment=True, workers=2)
    c.steps, c.eval_every, c.log_every = 5000, 1000, 100
    c.checkpoint = CheckpointConfig(every_steps=1000, max_to_keep=2, best_metric="psnr", best_mode="max")
    return c


def _a2n(scale: int) -> Config:
    # The official code (haoyuc/A2N, code/option.py, EDSR's trainer): HR output patch 192 (LR
    # 192 // scale), batch 16, L1, Adam (0.9, 0.999, eps 1e-8), no weight decay, lr 1e-4 halved
    # ("step", gamma 0.5) every 200 epochs of 1000 iterations, 1000 epochs; DIV2K train, Set5 test.
    # These are the numbers of the released code; the paper's text was not available to check
    # them against (a different patch or batch in the paper would be a one-line change here).
    return Config(
        name=f"a2n_x{scale}",
        task="superres_folder",
        model=ModelConfig("flax_attn.a2n:A2N", {"scale": scale, "nf": 40, "unf": 24, "nb": 16}),
        optim=OptimConfig(
            name="adamw",
            learning_rate=1e-4,
            schedule="step",
            decay_every=200_000,
            decay_factor=0.5,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            clip_grad_norm=None,
        ),
        data=DataConfig(
            batch_size=16, eval_batch_size=1, scale=scale, patch_size=192 // scale, augment=True, workers=4
        ),
        checkpoint=CheckpointConfig(every_steps=10_000, max_to_keep=3, best_metric="psnr", best_mode="max"),
        steps=1_000_000,
        eval_every=10_000,
        log_every=100,
        ema_decay=0.0,
    )


def a2n_x2() -> Config:
    """A2N x2, the official training recipe (haoyuc/A2N ``code/option.py``): DIV2K HR folder, HR patch
    192 (LR 96), batch 16, L1, Adam at 1e-4 halved every 200k steps, 1M steps, Set5 every 10k::

        flax-attn-train --config a2n_x2 --override data.train_dir=/data/DIV2K_train_HR \\
            --override data.eval_dir=/data/Set5 --workdir /tmp/a2n_x2
    """
    return _a2n(2)


def a2n_x3() -> Config:
    """A2N x3, as :func:`a2n_x2` with LR patch 64::

        flax-attn-train --config a2n_x3 --override data.train_dir=/data/DIV2K_train_HR \\
            --override data.eval_dir=/data/Set5 --workdir /tmp/a2n_x3
    """
    return _a2n(3)


def a2n_x4() -> Config:
    """A2N x4, as :func:`a2n_x2` with LR patch 48::

        flax-attn-train --config a2n_x4 --override data.train_dir=/data/DIV2K_train_HR \\
            --override data.eval_dir=/data/Set5 --workdir /tmp/a2n_x4
    """
    return _a2n(4)


CONFIGS: dict[str, Callable[[], Config]] = {
    "classify": classify,
    "superres": superres,
    "hard_attention": hard_attention,
    "classify_folder": classify_folder,
    "superres_folder": superres_folder,
    "a2n_x2": a2n_x2,
    "a2n_x3": a2n_x3,
    "a2n_x4": a2n_x4,
}


def get_config(name: str, overrides: Sequence[str] = ()) -> Config:
    """The config called ``name`` with ``overrides`` (``"dotted.key=value"``) applied."""
    if name not in CONFIGS:
        raise UnknownKeyError(f"unknown config {name!r}; known configs: {sorted(CONFIGS)}")
    return apply_overrides(CONFIGS[name](), overrides)


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # bare strings: model.name=flax_attn.se:SEResNet


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation (the subset used in these configs)."""
    hint = annotation if not isinstance(annotation, str) else None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is None:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        # Each member's own complaint says what the value would have needed to be.
        raise ConfigError(f"override {key}: {value!r} does not fit {hint} ({'; '.join(errors)})")
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"override {key}: expected a number, got {value!r}")
        return float(value)
    if hint in (int, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"override {key}: expected {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"override {key}: expected int, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"override {key}: expected a tuple, got {value!r}")
        return tuple(value)
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"override {key}: expected a dict, got {value!r}")
    return value


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``config`` with each ``"a.b.c=value"`` applied (values parsed as Python literals).

    Keys below ``model.kwargs`` are free-form (they are the model's constructor arguments); every
    other key must name an existing field, and the value must fit its type.
    """
    config = _deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value")
        value = _parse_value(raw.strip())
        parts = key.strip().split(".")
        obj: Any = config
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(obj, dict):
                if last:
                    obj[part] = value
                else:
                    obj = obj.setdefault(part, {})
                    if not isinstance(obj, dict):
                        raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is {obj!r}, not a dict")
                continue
            if not dataclasses.is_dataclass(obj):
                where = ".".join(parts[:i])
                raise ConfigError(f"override {key!r}: {where} is {obj!r}, which has no fields")
            fields = {f.name: f for f in dataclasses.fields(obj)}
            if part not in fields:
                where = ".".join(parts[:i]) or "config"
                raise UnknownKeyError(f"override {key!r}: {where} has no field {part!r}; fields: {sorted(fields)}")
            if last:
                hints = typing.get_type_hints(type(obj))
                setattr(obj, part, _coerce(value, hints[part], key))
            else:
                obj = getattr(obj, part)
    validate(config)
    return config


# --------------------------------------------------------------------------- validation

_CHOICES = {
    "task": ("classify", "superres", "hard_attention", "classify_folder", "superres_folder"),
    "precision": ("float32", "bfloat16"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("constant", "cosine", "linear", "step"),
    "data.channels": (1, 3),
    "checkpoint.best_mode": ("max", "min"),
}
# (key, lower bound, upper bound, lower inclusive, upper inclusive); None = unbounded.
_RANGES = [
    ("steps", 1, None, True, True),
    ("log_every", 1, None, True, True),
    ("eval_every", 0, None, True, True),
    ("model_axis", 1, None, True, True),
    ("seed", 0, 2**32 - 1, True, True),
    ("optim.learning_rate", 0, None, False, True),
    ("optim.warmup_steps", 0, None, True, True),
    ("optim.end_lr_factor", 0, 1, True, True),
    ("optim.weight_decay", 0, None, True, True),
    ("optim.momentum", 0, 1, True, False),
    ("optim.b1", 0, 1, True, False),
    ("optim.b2", 0, 1, True, False),
    ("optim.eps", 0, None, False, True),
    ("optim.clip_grad_norm", 0, None, False, True),
    ("data.batch_size", 1, None, True, True),
    ("data.eval_batch_size", 1, None, True, True),
    ("data.image_size", 1, None, True, True),
    ("data.canvas_size", 1, None, True, True),
    ("data.test_fraction", 0, 1, False, False),
    ("data.split_seed", 0, 2**32 - 1, True, True),
    ("data.scale", 1, None, True, True),
    ("data.patch_size", 1, None, True, True),
    ("data.eval_size", 1, None, True, True),
    ("checkpoint.every_steps", 0, None, True, True),
    ("optim.decay_every", 0, None, True, True),
    ("optim.decay_factor", 0, 1, False, True),
    ("data.eval_crop_fraction", 0, 1, False, True),
    ("data.workers", 0, None, True, True),
    ("data.read_threads", 1, None, True, True),
    ("ema_decay", 0, 1, True, False),
    ("grad_accum_steps", 1, None, True, True),
    ("checkpoint.max_to_keep", 1, None, True, True),
]


def _get(config: Config, key: str) -> Any:
    obj: Any = config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_types(obj: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_types(value, key + ".")
            continue
        try:
            _coerce(value, hints[f.name], key)
        except ConfigError as e:
            raise ConfigError(str(e).replace("override ", "config ", 1)) from None


def validate(config: Config) -> None:
    """Check every field's type, range and finiteness; raise :class:`ConfigError` naming the first bad one.

    Called by :func:`apply_overrides` and by the trainer, so a bad value stops the run before
    any work (not as a ``ZeroDivisionError`` or inside the jitted step).
    """
    import math

    if not isinstance(config, Config):
        raise ConfigError(f"config must be a train.configs.Config, got {type(config).__name__}")
    _check_types(config, "")
    for key, allowed in _CHOICES.items():
        if _get(config, key) not in allowed:
            raise ConfigError(f"config {key}: expected one of {list(allowed)}, got {_get(config, key)!r}")
    for key, lo, hi, lo_in, hi_in in _RANGES:
        v = _get(config, key)
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config {key}: expected a finite number, got {v!r}")
        bad = (lo is not None and (v < lo if lo_in else v <= lo)) or (hi is not None and (v > hi if hi_in else v >= hi))
        if bad:
            lo_s = "" if lo is None else f"{'>=' if lo_in else '>'} {lo}"
            hi_s = "" if hi is None else f"{'<=' if hi_in else '<'} {hi}"
            raise ConfigError(f"config {key}: expected {' and '.join(x for x in (lo_s, hi_s) if x)}, got {v!r}")
    if not config.model.name or not isinstance(config.model.name, str):
        raise ConfigError(f"config model.name: expected a non-empty string, got {config.model.name!r}")
    d = config.data
    for key, hi in (("data.crop_scale", 1.0), ("data.crop_ratio", None)):
        v = _get(config, key)
        if len(v) != 2 or not all(isinstance(x, (int, float)) for x in v) or not 0 < v[0] <= v[1]:
            raise ConfigError(f"config {key}: expected (low, high) with 0 < low <= high, got {v!r}")
        if hi is not None and v[1] > hi:
            raise ConfigError(f"config {key}: expected high <= {hi}, got {v!r}")
    if config.optim.schedule == "step" and config.optim.decay_every < 1:
        raise ConfigError(
            f"config optim.decay_every: expected >= 1 with schedule 'step', got {config.optim.decay_every}"
        )
    if d.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f"config grad_accum_steps: expected a divisor of data.batch_size {d.batch_size}, "
            f"got {config.grad_accum_steps}"
        )
    for k, v in _walk(config.model.kwargs, "model.kwargs"):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config {k}: expected a finite number, got {v!r}")


def _walk(tree: Any, prefix: str):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _walk(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def _deepcopy(config: Config) -> Config:
    import copy

    return copy.deepcopy(config)
