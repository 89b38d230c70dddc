"""Inner distillation: points by timm conventions and feature_info (maps and tokens), scatter-initialised
projections, the KPID loss."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.surgery import prune_model
from kpid_zoo.training.distill import (
    InnerDistillLoss,
    build_distillation,
    capture_outputs,
    distill_points,
    scatter_projection,
)

INPUT = (3, 32, 32)


def test_distill_points_follow_timm_layouts():
    assert distill_points(timm.create_model('resnet18')) == ['maxpool', 'layer1', 'layer2', 'layer3', 'layer4']
    assert distill_points(timm.create_model('efficientnet_b0')) == ['bn1'] + [f'blocks.{i}' for i in range(7)]
    assert distill_points(timm.create_model('mobilenetv3_small_050')) == ['bn1'] + [f'blocks.{i}' for i in range(6)]
    pool_free = timm.create_model('resnet18')
    pool_free.maxpool = nn.Identity()  # a stem without pooling ends at act1
    assert distill_points(pool_free)[0] == 'act1'


def test_distill_points_unknown_layout_names_the_class():
    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3))

    with pytest.raises(ValueError, match='TinyNet'):
        distill_points(TinyNet())


def test_scatter_projection_places_student_channels_at_kept_parent_channels():
    kept = torch.tensor([5, 0, 3])
    proj = scatter_projection(3, 6, kept, 'p')
    assert proj.bias is None and proj.weight.shape == (6, 3, 1, 1)
    x = torch.randn(2, 3, 4, 4)
    y = proj(x)
    assert torch.equal(y[:, kept], x)
    assert torch.equal(y[:, [1, 2, 4]], torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize(
    'student_ch,kept,match',
    [
        (3, torch.tensor([0, 1]), '2 kept channel indices but student width is 3'),
        (2, torch.tensor([0, 6]), 'in \\[0, 6\\)'),
        (2, torch.tensor([1, 1]), 'unique'),
        (4, None, 'no kept channels given but student width 4 != parent width 6'),
    ],
)
def test_scatter_projection_rejects_bad_kept(student_ch, kept, match):
    with pytest.raises(ValueError, match=match):
        scatter_projection(student_ch, 6, kept, 'layer2')


def test_unpruned_copy_has_zero_inner_loss_at_step_zero():
    torch.manual_seed(0)
    teacher = timm.create_model('resnet18', num_classes=10).eval()
    wrapper = build_distillation(copy.deepcopy(teacher), teacher, input_size=INPUT).eval()
    x, y = torch.randn(2, *INPUT), torch.tensor([1, 7])
    logits, projected = wrapper(x)
    with torch.no_grad(), capture_outputs(teacher, wrapper.points) as t_feats:
        t_logits = teacher(x)
    loss, parts = InnerDistillLoss(gamma=1.0, kd_logits_weight=1.0, temperature=4.0)(
        logits, projected, y, t_logits, t_feats
    )
    assert set(projected) == {'maxpool', 'layer1', 'layer2', 'layer3', 'layer4'}
    assert parts['inner'].item() == 0.0
    assert parts['kl'].abs().item() < 1e-6
    assert loss.item() == pytest.approx(F.cross_entropy(t_logits, y).item(), abs=1e-5)


def test_pruned_stem_matches_parent_kept_channels_at_step_zero():
    """Prune the stem of efficientnet_b0 with the real surgery: at step 0 the projected student stem equals the
    parent's stem on the kept channels and is zero on the dropped ones (so the MSE is the dropped energy)."""
    torch.manual_seed(0)
    teacher = timm.create_model('efficientnet_b0', num_classes=10).eval()
    for m in teacher.modules():  # fresh BNs are the identity; make a slicing mistake visible
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.bias.data.normal_(0, 0.2)
    graph = discover_groups(teacher, INPUT)
    stem_group = graph.module_out_group['bn1']
    kept_idx = torch.randperm(graph[stem_group].size)[:24].sort().values
    student = prune_model(teacher, graph, {stem_group: kept_idx}).eval()
    assert student.conv_stem.out_channels == 24

    wrapper = build_distillation(student, teacher, kept={'bn1': kept_idx}, input_size=INPUT).eval()
    x = torch.randn(2, *INPUT)
    with torch.no_grad():
        _, projected = wrapper(x)
        with capture_outputs(teacher, ['bn1']) as t_feats:
            teacher(x)
    t_stem, s_stem = t_feats['bn1'], projected['bn1']
    dropped = torch.ones(t_stem.shape[1], dtype=torch.bool)
    dropped[kept_idx] = False
    torch.testing.assert_close(s_stem[:, kept_idx], t_stem[:, kept_idx], rtol=1e-5, atol=1e-5)
    assert torch.equal(s_stem[:, dropped], torch.zeros_like(s_stem[:, dropped]))
    mse = F.mse_loss(s_stem, t_stem)
    assert mse.item() == pytest.approx((t_stem[:, dropped] ** 2).sum().item() / t_stem.numel(), rel=1e-5)


def test_width_mismatch_without_kept_is_an_error_naming_the_point():
    teacher = timm.create_model('resnet18', num_classes=10)
    student = timm.create_model('resnet18', num_classes=10, channels=(32, 64, 128, 256))
    with pytest.raises(ValueError, match="'layer1'.*32 != parent width 64"):
        build_distillation(student, teacher, input_size=INPUT)
    with pytest.raises(KeyError, match='layer9'):
        build_distillation(student, teacher, kept={'layer9': None}, input_size=INPUT)


def test_loss_is_ce_plus_gamma_over_k_sum_of_mse():
    logits, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    s = {'a': torch.zeros(1, 2, 1, 1), 'b': torch.zeros(1, 2, 1, 1)}
    t = {'a': torch.ones(1, 2, 1, 1), 'b': torch.full((1, 2, 1, 1), 3.0)}  # MSEs 1 and 9 -> mean 5
    total, parts = InnerDistillLoss(gamma=0.5)(logits, s, y, None, t)
    ce = F.cross_entropy(logits, y).item()
    assert parts['inner'].item() == pytest.approx(5.0)
    assert total.item() == pytest.approx(ce + 0.5 * 5.0)
    assert 'kl' not in parts


def test_kl_term_uses_temperature_squared():
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    total, parts = InnerDistillLoss(gamma=0.0, kd_logits_weight=2.0, temperature=2.0)(s, {}, y, t, None)
    p_t = torch.softmax(t / 2, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 2, -1))).sum().item() * 4
    assert parts['kl'].item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(F.cross_entropy(s, y).item() + 2.0 * kl, rel=1e-5)


def test_gradients_reach_student_and_projections_not_teacher_and_hooks_are_removed():
    torch.manual_seed(0)
    teacher = timm.create_model('mobilenetv3_small_050', num_classes=4).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    wrapper = build_distillation(student, teacher, input_size=INPUT)
    x, y = torch.randn(2, *INPUT), torch.tensor([0, 3])
    logits, projected = wrapper(x)
    with torch.no_grad(), capture_outputs(teacher, wrapper.points) as t_feats:
        t_logits = teacher(x)
    t_feats = {k: v + 0.1 for k, v in t_feats.items()}  # non-zero inner loss
    loss, _ = InnerDistillLoss(gamma=1.0, kd_logits_weight=1.0)(logits, projected, y, t_logits, t_feats)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapper.projections.parameters())
    assert wrapper.student.conv_stem.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


def test_wrapper_trains_projections_but_exports_student_only():
    teacher = timm.create_model('resnet18', num_classes=10)
    wrapper = build_distillation(copy.deepcopy(teacher), teacher, input_size=INPUT)
    keys = wrapper.state_dict().keys()
    assert any(k.startswith('projections.') for k in keys) and any(k.startswith('student.') for k in keys)
    wrapper.eval()
    x = torch.randn(2, *INPUT)
    with torch.no_grad():
        logits, projected = wrapper(x)
        assert torch.equal(logits, wrapper.student(x))  # the wrapper's logits are the student's own
    assert set(projected) == set(wrapper.points) and all(v.shape[0] == 2 for v in projected.values())
    exported = wrapper.student.state_dict().keys()
    assert exported == teacher.state_dict().keys()  # the projections are not part of the exported model


# --- any timm parent: points from feature_info, tokens as well as maps ----------------------------------------------

# (model, create_model kwargs, the points expected): timm's feature_info names a ConvNeXt's and a RegNet's stages and
# a ViT's blocks; MobileNetV4 keeps the EfficientNet/MobileNet rule (bn1 + every stage), as every existing parent does
ANY_PARENT = [
    ('convnext_atto', {}, [f'stages.{i}' for i in range(4)]),
    ('vit_tiny_patch16_224', {'img_size': 32}, [f'blocks.{i}' for i in range(12)]),
    ('regnety_002', {}, ['stem', 's1', 's2', 's3', 's4']),
    ('mobilenetv4_conv_small', {}, ['bn1'] + [f'blocks.{i}' for i in range(5)]),
]


def _unpruned_student(teacher: nn.Module) -> nn.Module:
    """The parent through the engine with every channel kept (the surgery's copy); the parent's own copy where the
    engine cannot trace it."""
    try:
        graph = discover_groups(teacher, INPUT)
    except ValueError:
        return copy.deepcopy(teacher)
    return prune_model(teacher, graph, {})


@pytest.mark.parametrize('name, kwargs, points', ANY_PARENT, ids=[p[0] for p in ANY_PARENT])
def test_any_parent_distils_from_its_feature_info_starting_at_zero_inner_loss(name, kwargs, points):
    torch.manual_seed(0)
    teacher = timm.create_model(name, num_classes=10, **kwargs).eval()
    assert distill_points(teacher) == points
    student = _unpruned_student(teacher).eval()
    wrapper = build_distillation(student, teacher, input_size=INPUT).eval()
    tokens = name.startswith('vit')
    assert all(isinstance(p, nn.Linear if tokens else nn.Conv2d) for p in wrapper.projections.values())
    x, y = torch.randn(2, *INPUT), torch.tensor([1, 7])
    criterion = InnerDistillLoss(gamma=1.0)
    with torch.no_grad():
        logits, projected = wrapper(x)
        with capture_outputs(teacher, points) as t_feats:
            teacher(x)
    assert all(projected[p].shape == t_feats[p].shape for p in points)
    assert all(t_feats[p].dim() == (3 if tokens else 4) for p in points)  # tokens (B, N, C), not maps
    _, parts = criterion(logits, projected, y, None, t_feats)
    assert parts['inner'].item() == 0.0  # identity-kept channels: the projection copies the student exactly

    # one optimizer step of the student and its projections against the frozen parent
    teacher.requires_grad_(False)
    wrapper.train()
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    logits, projected = wrapper(x)
    with torch.no_grad(), capture_outputs(teacher, points) as t_feats:
        teacher(x)
    t_feats = {k: v + 0.1 for k, v in t_feats.items()}  # a non-zero inner loss, so that gradients flow
    loss, parts = criterion(logits, projected, y, None, t_feats)
    loss.backward()
    assert parts['inner'].item() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapper.projections.parameters())
    before = {k: v.clone() for k, v in wrapper.projections.state_dict().items()}
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in wrapper.projections.state_dict().items())


def test_token_projection_places_student_channels_at_kept_parent_channels_on_the_last_dim():
    kept = torch.tensor([4, 0, 2])
    proj = scatter_projection(3, 6, kept, 'blocks.3', channels_last=True)
    assert isinstance(proj, nn.Linear) and proj.bias is None
    tokens = torch.randn(2, 5, 3)  # (B, N, C): the channel dimension is the last
    with torch.no_grad():
        out = proj(tokens)
    assert out.shape == (2, 5, 6)
    for i, k in enumerate(kept.tolist()):
        assert torch.equal(out[..., k], tokens[..., i])
    assert torch.equal(out[..., [1, 3, 5]], torch.zeros(2, 5, 3))


def test_points_from_feature_info_that_name_no_module_are_an_error():
    model = timm.create_model('regnety_002')
    model.feature_info = [{'module': 's9', 'num_chs': 8, 'reduction': 2}]
    with pytest.raises(ValueError, match=r"RegNet.feature_info names \['s9'\]"):
        distill_points(model)
