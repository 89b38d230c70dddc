"""Helpers shared by the pruning-engine tests."""
from __future__ import annotations

import copy

import timm
import torch
import torch.nn as nn

from kpid_zoo.groups import ROLE_IN, GroupGraph

# One architecture per family the engine supports, small enough for CI at 64 px.
FAMILIES = ["resnet18", "resnet50d", "efficientnet_b0", "tf_efficientnet_lite0",
            "mobilenetv3_large_100", "mobilenetv3_small_100"]
INPUT = (3, 32, 32)


def random_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A timm model in eval mode with random BN statistics and affine terms, in float64.

    Fresh timm BNs are the identity (mean 0, var 1, gamma 1, beta 0): randomising them makes a slicing mistake
    in a BN visible in the output.
    """
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).double().eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model


def zero_pruned_inputs(model: nn.Module, graph: GroupGraph, keep: dict[str, torch.Tensor]) -> nn.Module:
    """The parent with the pruned channels removed from every consumer: its input slices for them set to 0."""
    ref = copy.deepcopy(model)
    for name, idx in keep.items():
        group = graph[name]
        dropped = torch.ones(group.size, dtype=torch.bool)
        dropped[idx] = False
        for member in group.members:
            if member.role == ROLE_IN:
                with torch.no_grad():
                    ref.get_submodule(member.module).weight[:, dropped] = 0
    return ref
