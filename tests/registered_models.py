"""Small networks registered in timm's model registry (a recipe's parent is any timm model name), each built to
stop the pruning engine in one way that no layer handler will ever lift: what a preflight must refuse, and say why.

Importing this module registers them once per process.
"""

from __future__ import annotations

import torch
from timm.layers import EcaModule
from timm.models import register_model
from torch import nn


class FftNet(nn.Module):
    """conv -> 2-D FFT -> pool -> head: the FFT mixes every channel's values, so the conv's channels stay whole
    and, the head being the network's output, no group is prunable."""

    def __init__(self, num_classes: int = 1000, **_):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.fft.fft2(self.stem(x)).abs().mean((2, 3)))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes, self.head = num_classes, nn.Linear(self.head.in_features, num_classes)


class EcaNet(nn.Module):
    """[conv 3 -> 16 ->] conv -> 256 -> ECA -> pool -> head: the ECA gate ties the wide conv's channels inexactly
    (`kpid_zoo.engine.groups`); with `exact_stem`, a narrow exact group comes first, too small for a deep cut."""

    def __init__(self, num_classes: int = 1000, exact_stem: bool = False, **_):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()) if exact_stem else nn.Identity()
        self.conv = nn.Conv2d(16 if exact_stem else 3, 256, 3, padding=1)
        self.eca = EcaModule(256)
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.eca(self.conv(self.stem(x))).mean((2, 3)))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes, self.head = num_classes, nn.Linear(self.head.in_features, num_classes)


@register_model
def hostile_fftnet(pretrained: bool = False, **kwargs) -> FftNet:
    return FftNet(**kwargs)


@register_model
def hostile_ecanet(pretrained: bool = False, **kwargs) -> EcaNet:
    return EcaNet(**kwargs)


@register_model
def hostile_ecanet_stem(pretrained: bool = False, **kwargs) -> EcaNet:
    return EcaNet(exact_stem=True, **kwargs)
