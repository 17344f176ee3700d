"""Import ``timm`` where torchvision is not installed (tests only; imports torch).

timm builds its models from plain torch, but a few of its modules import names from torchvision at
import time (``FrozenBatchNorm2d`` for norm-layer helpers, ``InterpolationMode`` and the transform
modules for its data pipeline, the dataset classes). Where no torchvision build exists, this module
registers small stand-in modules in ``sys.modules`` that define exactly those names, so that
``timm.create_model("seresnet18", pretrained=False)`` builds the real timm model and the parity
tests can use timm's own state-dict layout and forward as the reference.

The stand-ins are never used by the models the tests build: a dataset class or transform raises
``RuntimeError`` if anything tries to instantiate it. If a real torchvision is importable, nothing
is registered.

Usage::

    from flax_attn.testing.timm_shim import import_timm
    timm = import_timm()            # None if timm itself is not installed
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import sys
import types

__all__ = ["import_timm", "install_torchvision_stub"]

_STUB_FLAG = "__flax_attn_stub__"


class _Unavailable:
    """A torchvision name that exists only so that ``from torchvision... import X`` succeeds."""

    _qualname = "torchvision object"

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{self._qualname} is a flax_attn.testing.timm_shim stand-in: torchvision is not installed")


def _unavailable(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (_Unavailable,), {"_qualname": qualname})


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    setattr(mod, _STUB_FLAG, True)
    # A package path makes `import torchvision.x.y` resolve through sys.modules.
    mod.__path__ = []
    return mod


def install_torchvision_stub() -> bool:
    """Register the torchvision stand-ins; returns False (and does nothing) if torchvision exists."""
    existing = sys.modules.get("torchvision")
    if existing is not None:
        return bool(getattr(existing, _STUB_FLAG, False))
    if importlib.util.find_spec("torchvision") is not None:
        return False
    from torch import nn

    class FrozenBatchNorm2d(nn.Module):
        """torchvision's BatchNorm with fixed statistics and affine parameters (buffers, no grads)."""

        def __init__(self, num_features: int, eps: float = 1e-5):
            super().__init__()
            import torch

            self.eps = eps
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale[None, :, None, None] + shift[None, :, None, None]

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    transform_names = [
        "CenterCrop",
        "ColorJitter",
        "Compose",
        "Grayscale",
        "Normalize",
        "Pad",
        "RandomApply",
        "RandomCrop",
        "RandomErasing",
        "RandomGrayscale",
        "RandomHorizontalFlip",
        "RandomResizedCrop",
        "RandomVerticalFlip",
        "Resize",
        "ToPILImage",
        "ToTensor",
        "Lambda",
        "RandomChoice",
        "RandomOrder",
        "GaussianBlur",
        "RandomRotation",
        "RandomAffine",
        "RandomPerspective",
        "PILToTensor",
        "ConvertImageDtype",
        "FiveCrop",
        "TenCrop",
        "RandomAdjustSharpness",
        "RandomAutocontrast",
        "RandomEqualize",
        "RandomInvert",
        "RandomPosterize",
        "RandomSolarize",
        "TrivialAugmentWide",
        "AutoAugment",
        "RandAugment",
        "AugMix",
    ]
    functional = _module("torchvision.transforms.functional", InterpolationMode=InterpolationMode)

    transforms = _module(
        "torchvision.transforms",
        functional=functional,
        InterpolationMode=InterpolationMode,
        **{n: _unavailable(f"torchvision.transforms.{n}") for n in transform_names},
    )
    dataset_names = [
        "CIFAR10",
        "CIFAR100",
        "MNIST",
        "KMNIST",
        "FashionMNIST",
        "ImageFolder",
        "Places365",
        "INaturalist",
        "QMNIST",
        "ImageNet",
    ]
    datasets = _module("torchvision.datasets", **{n: _unavailable(f"torchvision.datasets.{n}") for n in dataset_names})
    misc = _module("torchvision.ops.misc", FrozenBatchNorm2d=FrozenBatchNorm2d)
    ops = _module("torchvision.ops", misc=misc, FrozenBatchNorm2d=FrozenBatchNorm2d)
    # timm guards `torchvision.models.feature_extraction` with try/except: leaving it out keeps
    # timm's FX feature extraction cleanly disabled.
    utils = _module("torchvision.utils")
    root = _module(
        "torchvision",
        transforms=transforms,
        datasets=datasets,
        ops=ops,
        utils=utils,
        __version__="0.0.0+flax_attn_stub",
    )
    for mod in (root, transforms, functional, datasets, ops, misc, utils):
        sys.modules[mod.__name__] = mod
    return True


def import_timm():
    """``timm``, importable without torchvision; ``None`` if timm (or torch) is not installed."""
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torch") is None:
        return None
    install_torchvision_stub()
    return importlib.import_module("timm")
