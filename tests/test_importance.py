import torch
import torch.nn.functional as F
from engine_utils import INPUT, random_model

from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.importance import magnitude_importance, taylor_importance


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, *INPUT, generator=gen, dtype=torch.float64), torch.randint(0, 1000, (4,), generator=gen))
        for _ in range(n)
    ]


def test_taylor_sums_w_times_grad_over_every_member_and_batch():
    model = random_model('resnet18')
    graph = discover_groups(model, INPUT)
    batches = _batches(2)
    scores = taylor_importance(model, graph, batches, num_batches=2, progress=False)

    group = graph['layer1.0.conv1']  # conv1 out, bn1, conv2 in
    expected = torch.zeros(group.size, dtype=torch.float64)
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        conv1, bn1, conv2 = (model.get_submodule(f'layer1.0.{n}') for n in ('conv1', 'bn1', 'conv2'))
        expected += (conv1.weight * conv1.weight.grad).abs().sum((1, 2, 3))
        expected += (bn1.weight * bn1.weight.grad).abs() + (bn1.bias * bn1.bias.grad).abs()
        expected += (conv2.weight * conv2.weight.grad).abs().sum((0, 2, 3))
    torch.testing.assert_close(scores[group.name], expected.detach())
    assert set(scores) == {g.name for g in graph.prunable}


def test_taylor_leaves_the_model_as_it_found_it():
    model = random_model('mobilenetv3_small_100').train()
    graph = discover_groups(model, INPUT)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    taylor_importance(model, graph, _batches(1), num_batches=1, progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN statistics included


def test_magnitude_is_the_l1_norm_of_the_producing_filters():
    model = random_model('efficientnet_b0')
    graph = discover_groups(model, INPUT)
    scores = magnitude_importance(model, graph)
    group = graph['blocks.1.0.conv_pw']  # producers: conv_pw, conv_dw (depthwise), se.conv_expand
    expected = sum(
        model.get_submodule(f'blocks.1.0.{n}').weight.abs().flatten(1).sum(1)
        for n in ('conv_pw', 'conv_dw', 'se.conv_expand')
    )
    torch.testing.assert_close(scores[group.name], expected.detach())
