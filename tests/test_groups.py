import pytest
import timm
import torch
import torch.nn as nn
from engine_utils import FAMILIES, INPUT

from kpid_zoo.engine.groups import ROLE_CONV_GROUPS, ROLE_DW, ROLE_IN, ROLE_NORM, ROLE_OUT, Member, discover_groups
from kpid_zoo.engine.surgery import ArchSpec, build_pruned

GOLDEN = FAMILIES + ['efficientnet_b3', 'resnet50', 'regnety_002']
# grouped convs, concatenations and splits: the same groups as Torch-Pruning's, but slow to build there
REACH = ['resnext50_32x4d', 'densenet121', 'ghostnet_100', 'skresnet18']


def _torch_pruning_groups(model: nn.Module) -> set[frozenset]:
    tp = pytest.importorskip('torch_pruning')
    names = {m: n for n, m in model.named_modules()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *INPUT))
    groups = set()
    for group in dg.get_all_groups(ignored_layers=[model.get_classifier()], root_module_types=(nn.Conv2d, nn.Linear)):
        members = set()
        for item in group:
            mod = item.dep.target.module
            if mod not in names:
                continue  # Torch-Pruning's pseudo-modules for adds and muls
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                role = ROLE_NORM
            elif isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels > 1:
                role = ROLE_DW
            else:
                role = ROLE_OUT if dg.is_out_channel_pruning_fn(item.dep.handler) else ROLE_IN
            members.add((names[mod], role))
        groups.add(frozenset(members))
    return groups


@pytest.mark.parametrize('name', GOLDEN)
def test_groups_match_torch_pruning_dependency_graph(name):
    model = timm.create_model(name).eval()
    ours = {frozenset((m.module, m.role) for m in g.members) for g in discover_groups(model, INPUT).prunable}
    assert ours == _torch_pruning_groups(model)


@pytest.mark.slow
@pytest.mark.parametrize('name', REACH)
def test_groups_match_torch_pruning_through_grouped_convs_concats_and_splits(name):
    test_groups_match_torch_pruning_dependency_graph(name)


def test_residual_depthwise_and_se_channels_are_grouped():
    graph = discover_groups(timm.create_model('efficientnet_b0'), INPUT)
    expansion = graph['blocks.1.0.conv_pw']  # expansion = depthwise = SE expand
    assert set(expansion.modules()) >= {'blocks.1.0.conv_dw', 'blocks.1.0.se.conv_expand', 'blocks.1.0.se.conv_reduce'}
    assert graph['blocks.1.0.se.conv_reduce'].modules(ROLE_OUT) == ['blocks.1.0.se.conv_reduce']
    stage = graph['blocks.2.0.conv_pwl']  # all block outputs of a stage, tied by the residual adds
    assert stage.modules(ROLE_OUT) == ['blocks.2.0.conv_pwl', 'blocks.2.1.conv_pwl']

    resnet = discover_groups(timm.create_model('resnet50d'), INPUT)
    stage2 = resnet['layer2.0.conv3']
    assert 'layer2.0.downsample.1' in stage2.modules(ROLE_OUT)  # -d variant: avgpool then conv
    assert [m for m in stage2.modules(ROLE_OUT) if m.endswith('conv3')] == [f'layer2.{i}.conv3' for i in range(4)]
    assert resnet.global_pool_group == 'layer4.0.conv3'


def test_timm_efficientnet_b1_pruned_widths_are_a_valid_assignment_of_our_groups():
    parent = timm.create_model('efficientnet_b1')
    timm_pruned = timm.create_model('efficientnet_b1_pruned')
    graph = discover_groups(parent, INPUT)
    modules = dict(timm_pruned.named_modules())

    def width(module, role):
        if role == ROLE_IN:
            return module.weight.shape[1]
        return module.num_features if role == ROLE_NORM else module.weight.shape[0]

    widths = {}
    for group in graph.prunable:
        seen = {width(modules[m.module], m.role) for m in group.members}
        assert len(seen) == 1, f"{group.name}: timm's pruned widths disagree inside one of our groups: {seen}"
        widths[group.name] = seen.pop()
        assert widths[group.name] <= group.size
    rebuilt = build_pruned(ArchSpec('efficientnet_b1', {g: w for g, w in widths.items() if w < graph[g].size}))
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in timm_pruned.state_dict().items()}


def test_channel_multiplier_convs_cut_whole_conv_groups_and_unknown_layers_are_not_prunable():
    class Unknown(nn.Module):  # no handler: the engine cannot know what it does to channels
        def forward(self, x):
            return torch.roll(x, 1, dims=1)

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, groups=8),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
        Unknown(),
        nn.Conv2d(8, 4, 1),
    )
    graph = discover_groups(model, INPUT)
    # a channel multiplier (groups == in < out): each input channel and the two outputs of its conv-group go together
    assert graph['0'].prunable and ('2', ROLE_CONV_GROUPS) in {(m.module, m.role) for m in graph['0'].members}
    assert graph.layouts[Member('4', ROLE_IN)].multiplicity(graph.index('0')) == 2
    assert not graph['4'].prunable and 'roll is not understood' in graph['4'].reason
    assert all(g.reason for g in graph.groups if not g.prunable)


def test_weight_standardized_convs_keep_their_inputs():
    from timm.layers import StdConv2d

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        StdConv2d(8, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    )
    graph = discover_groups(model, INPUT)
    assert not graph['0'].prunable and 'StdConv2d standardises filters' in graph['0'].reason
    assert graph['3'].prunable  # its output channels are still free to go


def test_division_and_subtraction_tie_channels():
    class Normalise(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head((self.a(x) - self.b(x)) / (self.b(x).abs() + 1))

    graph = discover_groups(Normalise(), INPUT)
    assert set(graph['a'].modules(ROLE_OUT)) == {'a', 'b'}


def test_network_input_and_logits_are_never_prunable():
    graph = discover_groups(timm.create_model('resnet18'), INPUT)
    assert 'fc' in graph and not graph['fc'].prunable
    assert graph['conv1'].prunable and not any(
        m.module == 'conv1' and m.role == ROLE_IN for g in graph.prunable for m in g.members
    )


def test_untraceable_model_gives_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow cannot be traced

    with pytest.raises(ValueError, match='cannot trace Branchy'):
        discover_groups(Branchy(), INPUT)


def test_eca_gates_leave_their_channels_prunable_but_inexact():
    # ECA's gate is a Conv1d over the channel axis: channel c's gate reads channels c-k//2 .. c+k//2
    graph = discover_groups(timm.create_model('ecaresnet26t'), INPUT)
    stage = graph['layer1.0.conv3']  # a residual stream: every block's conv3 output passes an ECA gate
    assert stage.prunable and not stage.exact
    assert 'layer1.0.se: EcaModule mixes neighbouring channels' in stage.inexact
    assert {g.name for g in graph.inexact} == {'layer1.0.conv3', 'layer2.0.conv3', 'layer3.0.conv3', 'layer4.0.conv3'}
    assert all(g.exact for g in graph.prunable if g.name.endswith(('conv1', 'conv2')))

    # what the knapsack sees unless a recipe opts in: the inexact groups fixed, everything else unchanged
    exact = graph.exact_only()
    assert {g.name for g in exact.prunable} == {g.name for g in graph.prunable} - {g.name for g in graph.inexact}
    assert 'importance.allow_inexact: true' in exact['layer2.0.conv3'].reason
    assert not exact.inexact and exact.module_out_group == graph.module_out_group
