"""Helpers shared by the pruning-engine tests."""

from __future__ import annotations

import copy
import os

import numpy as np
import timm
import torch
import torch.nn as nn

from kpid_zoo.engine.groups import ROLE_IN, GroupGraph
from kpid_zoo.engine.surgery import prune_model

# One architecture per family the engine supports, small enough for CI at 64 px.
FAMILIES = [
    'resnet18',
    'resnet50d',
    'efficientnet_b0',
    'tf_efficientnet_lite0',
    'mobilenetv3_large_100',
    'mobilenetv3_small_100',
]
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


def random_keep(graph: GroupGraph, generator: torch.Generator, groups=None) -> dict[str, torch.Tensor]:
    """Random kept channels for each group (every prunable one unless `groups`), as many in each of its blocks."""
    keep = {}
    for group in graph.prunable if groups is None else groups:
        blocks = group.block_index()
        k = int(torch.randint(1, group.size // len(blocks) + 1, (1,), generator=generator))
        keep[group.name] = torch.cat([b[torch.randperm(len(b), generator=generator)[:k]] for b in blocks])
    return keep


def zero_pruned_inputs(model: nn.Module, graph: GroupGraph, keep: dict[str, torch.Tensor]) -> nn.Module:
    """The parent with the pruned channels removed from every consumer: what each "in" member reads of them is 0.

    A forward pre-hook masks the consumer's input, position by position, so this holds however the consumer's
    weight is laid out (grouped convs, inputs concatenated from several groups)."""
    ref = copy.deepcopy(model)
    masks = graph.masks(keep)
    for member, channels in graph.layouts.items():
        if member.role != ROLE_IN or not any(gi in masks for gi in np.unique(channels.group)):
            continue
        mask = torch.zeros(len(channels), dtype=torch.float64)
        mask[torch.from_numpy(channels.kept(masks))] = 1

        def hook(module, args, mask=mask):
            x = args[0]
            if isinstance(module, nn.Linear):  # reads the last dimension: (batch, channels) or channels-last tokens
                return (x * mask.to(x.dtype),) + tuple(args[1:])
            return (x * mask.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2))),) + tuple(args[1:])

        ref.get_submodule(member.module).register_forward_pre_hook(hook)
    return ref


def assert_pruned_exact(model: nn.Module, graph: GroupGraph, keep: dict[str, torch.Tensor], input_size=INPUT):
    """The pruned network (returned) computes what `model` computes with the pruned channels zeroed, in float64."""
    x = torch.randn(2, *input_size, dtype=torch.float64)
    pruned = prune_model(model, graph, keep)
    with torch.no_grad():
        expected, got = zero_pruned_inputs(model, graph, keep)(x), pruned(x)
    assert expected.abs().max() > 1e-3  # a vanishing output would make the comparison meaningless
    # float64 through ~100 layers: rounding stays near 1e-15 of the output scale, far below this bound
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    return pruned


class HomeProcessGuard(nn.Module):
    """A conv that refuses to run in the process that built it: a network that must be timed in a new process."""

    def __init__(self, width: int):
        super().__init__()
        self.home = os.getpid()
        self.conv = nn.Conv2d(3, width, 3, padding=1)

    def forward(self, x):
        if os.getpid() == self.home:
            raise RuntimeError('ran in the process that built it')
        return self.conv(x)
