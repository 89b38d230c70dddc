"""The CIFAR-10 grid's new-family rows (benchmarks/cifar10_grid.py --family, issue 25): the Torch-Pruning baselines
prune a timm ViT and ConvNeXt into networks that run, the FLOPs count sees attention, the model kwargs parse."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from cifar10 import uniform_l1  # noqa: E402
from cifar10_grid import FAMILIES, model_kwargs  # noqa: E402

from kpid_zoo.engine.flops import count_flops  # noqa: E402

SIZE = (3, 32, 32)


def _vit(depth: int = 2):
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=32, patch_size=8, depth=depth).eval()


def test_uniform_l1_prunes_a_vit_per_head_and_keeps_the_softmax_scale():
    # without Torch-Pruning's num_heads the qkv channels are pruned as one flat group and timm's head reshape fails
    parent = _vit(depth=2)
    target = 0.5 * count_flops(parent, SIZE).gmacs
    pruned = uniform_l1(parent, target, SIZE, iters=4, round_to=None)
    assert count_flops(pruned, SIZE).gmacs <= target
    for old, new in zip(parent.blocks, pruned.blocks):
        a = new.attn
        assert a.num_heads == old.attn.num_heads  # head dims pruned, every head kept (Torch-Pruning's default)
        assert 3 * a.num_heads * a.head_dim == a.qkv.out_features and a.attn_dim == a.proj.in_features
        assert a.head_dim < old.attn.head_dim and a.scale == old.attn.scale and not a.fused_attn
    assert pruned.pos_embed.shape[-1] == pruned.cls_token.shape[-1] == pruned.patch_embed.proj.out_channels
    assert pruned(torch.randn(2, *SIZE)).shape == (2, 10)


def test_uniform_l1_prunes_convnext_with_its_layer_scales():
    torch.manual_seed(0)
    parent = timm.create_model('convnext_atto', num_classes=10).eval()
    target = 0.5 * count_flops(parent, SIZE).gmacs
    pruned = uniform_l1(parent, target, SIZE, iters=4, round_to=None)
    assert count_flops(pruned, SIZE).gmacs <= target
    for stage in pruned.stages:
        for block in stage.blocks:
            assert block.gamma.shape == (block.conv_dw.out_channels,)
    assert pruned(torch.randn(2, *SIZE)).shape == (2, 10)


def test_model_kwargs_parse_json_values_and_refuse_a_bare_word():
    assert model_kwargs('img_size=32') == ('img_size', 32)
    assert model_kwargs('act_layer=gelu') == ('act_layer', 'gelu')
    assert model_kwargs('class_token=false') == ('class_token', False)
    for bad in ('img_size', '=3', '1x=2'):
        with pytest.raises(argparse.ArgumentTypeError, match='KEY=VALUE'):
            model_kwargs(bad)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_family_parents_build_at_their_size(family):
    preset = FAMILIES[family]
    model = timm.create_model(preset['parent'], num_classes=10, **dict(preset['model_kwargs']))
    out = model(torch.randn(1, 3, preset['px'], preset['px']))
    assert out.shape == (1, 10)
