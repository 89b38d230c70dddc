"""fvcore FLOP counts against timm's published GMACs, and the caller's model left exactly as it was."""

from __future__ import annotations

import pytest
import timm
import torch

from kpid_zoo.engine.flops import count_flops, count_params


@pytest.mark.parametrize(
    'name, published_gmacs',
    [
        ('efficientnet_b0', 0.40),
        ('mobilenetv3_large_100', 0.23),  # fvcore: 0.2254 (timm rounds up)
        ('resnet50', 4.11),
    ],
)
def test_matches_timm_published_gmacs(name, published_gmacs):
    report = count_flops(timm.create_model(name), (3, 224, 224))
    assert round(report.gmacs, 2) == published_gmacs or abs(report.gmacs - published_gmacs) < 0.005


def test_by_module_breakdown_adds_up():
    model = timm.create_model('resnet50')
    report = count_flops(model)
    assert report.by_module[''] == report.total
    assert report.by_module['fc'] == model.fc.in_features * model.fc.out_features  # one MAC per weight at batch 1
    assert sum(report.by_module[name] for name, _ in model.named_children()) == report.total


def test_input_size_is_used():
    model = timm.create_model('resnet18', num_classes=10)
    small, large = count_flops(model, (3, 32, 32)), count_flops(model, (3, 64, 64))
    fc = model.fc.in_features * model.fc.out_features  # the head does not grow with the image
    assert (large.total - fc) == pytest.approx(4 * (small.total - fc), rel=0.02)


def test_callers_model_untouched():
    torch.manual_seed(0)
    model = timm.create_model('resnet18').train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, (3, 64, 64))
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():  # BN running stats and num_batches_tracked included
        assert torch.equal(value, before[key]), key


def test_count_params_matches_published():
    assert round(count_params(timm.create_model('resnet50')) / 1e6, 2) == 25.56
