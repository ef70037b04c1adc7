"""The built-in model zoo addressed as ``zoo:NAME``: small reference CNNs and MLPs (MNIST, CIFAR
size) and the ImageNet architectures people deploy, at 224x224 with torchvision's layer shapes.

Every model is a plain ``nn.Module`` that ``torch.fx.symbolic_trace`` traces, is deterministic given
``torch.manual_seed``, and ends in its classifier (the last ``nn.Linear``). ``get(name).build(**kwargs)``
builds one; every builder takes ``num_classes``.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from sparsify.errors import ModelLoadError
from sparsify.zoo.cifarnet import cifarnet
from sparsify.zoo.densenet import densenet121
from sparsify.zoo.efficientnet import efficientnet_b0
from sparsify.zoo.inception import inception_mini
from sparsify.zoo.lenet import lenet5
from sparsify.zoo.mlp import lenet300_100, mlp
from sparsify.zoo.mobilenet import mobilenetv2, mobilenetv2_imagenet
from sparsify.zoo.resnet import resnet18, resnet20, resnet50
from sparsify.zoo.vgg import vgg16n

__all__ = ["ZooEntry", "get", "names"]


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: its builder, the input shape it expects (batch 1 included) and what it classifies."""

    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    dataset: str


_MNIST = (1, 1, 28, 28)
_CIFAR = (1, 3, 32, 32)
_IMAGENET = (1, 3, 224, 224)

_ENTRIES: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("lenet5", lenet5, _MNIST, 10,
                 "3-conv MNIST net of the TF tutorial used by Changpinyo et al. (conv 32/64/128, FC 256)", "mnist"),
        ZooEntry("lenet300-100", lenet300_100, _MNIST, 10,
                 "LeNet-300-100 MLP, 784-300-100-10 (266,610 parameters)", "mnist"),
        ZooEntry("mlp", mlp, _MNIST, 10,
                 "PSN-paper fully connected net 784-300-100-10 with ReLU; `hidden` sets the hidden widths", "mnist"),
        ZooEntry("cifarnet", cifarnet, _CIFAR, 10,
                 "TF CIFAR-10 tutorial net: 2 conv 5x5x64 with pooling, FC 384-192", "cifar10"),
        ZooEntry("vgg16n", vgg16n, _CIFAR, 10,
                 "VGG-16 with BN, FC-4096 layers replaced by 2x2 max-pool + 3x3 conv 1024 (Changpinyo et al.)", "cifar10"),
        ZooEntry("resnet20", resnet20, _CIFAR, 10,
                 "CIFAR ResNet-20 (16/32/64) with 1x1-conv projection shortcuts", "cifar10"),
        ZooEntry("mobilenetv2", mobilenetv2, _CIFAR, 10,
                 "MobileNetV2 width 1.0 at CIFAR size: depthwise convs, inverted residuals", "cifar10"),
        ZooEntry("inception-mini", inception_mini, _CIFAR, 10,
                 "small Inception net: stem + 3 four-branch blocks joined by concatenation", "cifar10"),
        ZooEntry("resnet18", resnet18, _IMAGENET, 1000,
                 "ResNet-18 as torchvision's (basic blocks 2/2/2/2, 11,689,512 params), random init", "imagenet"),
        ZooEntry("resnet50", resnet50, _IMAGENET, 1000,
                 "ResNet-50 v1.5 as torchvision's (bottlenecks 3/4/6/3, 25,557,032 params), random init", "imagenet"),
        ZooEntry("mobilenetv2-imagenet", mobilenetv2_imagenet, _IMAGENET, 1000,
                 "MobileNetV2 width 1.0 as torchvision's (stride-2 stem, 3,504,872 params), random init", "imagenet"),
        ZooEntry("efficientnet-b0", efficientnet_b0, _IMAGENET, 1000,
                 "EfficientNet-B0 as torchvision's (MBConv + SE, SiLU, 5x5 depthwise, stochastic depth 0.2; "
                 "5,288,548 params), random init", "imagenet"),
        ZooEntry("densenet121", densenet121, _IMAGENET, 1000,
                 "DenseNet-121 as torchvision's (growth 32, blocks 6/12/24/16, 7,978,856 params), random init",
                 "imagenet"),
    )
}


def names() -> list[str]:
    """The zoo's model names, sorted."""
    return sorted(_ENTRIES)


def get(name: str) -> ZooEntry:
    """The entry called ``name``; an unknown name raises ModelLoadError naming the closest match and all names."""
    entry = _ENTRIES.get(name)
    if entry is not None:
        return entry
    close = difflib.get_close_matches(name.lower(), names(), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ModelLoadError(
        f"unknown zoo model '{name}': the built-in zoo has no such model; {hint}available: {', '.join(names())}"
    )
