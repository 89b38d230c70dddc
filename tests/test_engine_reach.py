"""Grouped convs, concatenations and splits (ResNeXt, RegNet, DenseNet, GhostNet, MixNet, SKNet): pruned nets
equal their parents with the pruned channels zeroed, in float64, for random and knapsack masks; the FLOPs
target is met; specs rebuild them. One grouped-conv and one concat/split family run by default, the rest with
KPID_TEST_SLOW=1."""

import pytest
import torch
from engine_utils import INPUT, assert_pruned_exact, random_keep, random_model

from kpid_zoo.budget.prune import knapsack_prune
from kpid_zoo.engine.flops import count_flops
from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.importance import magnitude_importance
from kpid_zoo.engine.surgery import ArchSpec, build_pruned, prune_model

DEFAULT = ['regnety_002', 'mixnet_s']  # grouped convs; split -> convs -> concat
SLOW = ['resnext50_32x4d', 'densenet121', 'ghostnet_100', 'skresnet18']
ALL = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in DEFAULT + SLOW]


@pytest.mark.parametrize('name', ALL)
def test_random_masks_prune_exactly_and_specs_rebuild_them(name):
    model = random_model(name, 1)
    graph = discover_groups(model, INPUT)
    keep = random_keep(graph, torch.Generator().manual_seed(1))
    pruned = assert_pruned_exact(model, graph, keep, INPUT)
    x = torch.randn(1, *INPUT, dtype=torch.float64)
    for info, feat in zip(pruned.feature_info, pruned.forward_intermediates(x, intermediates_only=True)):
        assert feat.shape[1] == info['num_chs'], info['module']
    rebuilt = build_pruned(ArchSpec(name, {g: len(i) for g, i in keep.items()}, INPUT)).double().eval()
    rebuilt.load_state_dict(pruned.state_dict())  # strict: every name and shape agrees
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x), atol=0, rtol=0)
    assert rebuilt.num_features == pruned.num_features


@pytest.mark.parametrize(
    'name', [n if n == 'regnety_002' else pytest.param(n, marks=pytest.mark.slow) for n in DEFAULT + SLOW]
)
def test_knapsack_masks_prune_exactly_within_the_flops_target(name):
    model = random_model(name, 2)
    graph = discover_groups(model, INPUT)
    target = 0.5 * count_flops(model, INPUT).gmacs
    result = knapsack_prune(
        model, graph, magnitude_importance(model, graph), target, arch=name, input_size=INPUT, progress=False
    )
    assert target * 0.99 <= count_flops(result.model, INPUT).gmacs <= target
    for name_, idx in result.keep.items():  # grouped convs: as many kept in each conv-group
        per_block = [len(set(idx.tolist()) & set(b.tolist())) for b in graph[name_].block_index()]
        assert len(set(per_block)) == 1, name_
    # blocks come from grouped convs (ResNeXt, RegNet) and from SKNet's equal split of its input between paths
    assert any(graph[g].parts > 1 for g in result.keep) == (name in ('regnety_002', 'resnext50_32x4d', 'skresnet18'))
    assert_pruned_exact(model, graph, result.keep, INPUT)


def test_grouped_conv_groups_keep_their_conv_groups_balanced():
    graph = discover_groups(random_model('regnety_002'), INPUT)
    group = graph['s1.b1.conv1.conv']  # conv1 -> grouped conv2 (group width 8): 24 channels in 3 conv-groups
    assert group.prunable and group.parts == 3 and group.size == 24
    with pytest.raises(ValueError, match='as many channels kept in each of its 3 conv-groups'):
        prune_model(random_model('regnety_002'), graph, {group.name: torch.tensor([0, 1, 8])})
    with pytest.raises(ValueError, match='keeps 7 channels, not a multiple of the 3 conv-groups'):
        build_pruned(ArchSpec('regnety_002', {group.name: 7}, INPUT))


def test_a_split_that_cuts_a_group_makes_each_piece_a_group():
    graph = discover_groups(random_model('mixnet_s'), INPUT)
    # the stem's 16 channels go to the two 8-channel convs of the next block's mixed pointwise conv
    halves = [g for g in graph.prunable if g.name.startswith('conv_stem')]
    assert [(g.name, g.size) for g in halves] == [('conv_stem', 8), ('conv_stem#1', 8)]
    assert ('blocks.1.0.conv_pw.0', 'in') in {(m.module, m.role) for m in halves[0].members}
    assert ('blocks.1.0.conv_pw.1', 'in') in {(m.module, m.role) for m in halves[1].members}
