import pytest
import timm
import torch
from engine_utils import FAMILIES, INPUT, random_model, zero_pruned_inputs

from kpid_zoo.budget.prune import knapsack_prune
from kpid_zoo.engine.flops import count_flops
from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.importance import magnitude_importance
from kpid_zoo.engine.surgery import ArchSpec, build_pruned, prune_model


def _random_keep(graph, generator, groups=None):
    keep = {}
    for group in graph.prunable if groups is None else groups:
        k = int(torch.randint(1, group.size + 1, (1,), generator=generator))
        keep[group.name] = torch.randperm(group.size, generator=generator)[:k]
    return keep


def _assert_prunes_exactly(model, graph, keep):
    x = torch.randn(3, *INPUT, dtype=torch.float64)
    pruned = prune_model(model, graph, keep)
    with torch.no_grad():
        expected = zero_pruned_inputs(model, graph, keep)(x)
        got = pruned(x)
    assert expected.abs().max() > 1e-3  # a vanishing output would make the comparison meaningless
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return pruned


@pytest.mark.parametrize('seed,name', list(enumerate(FAMILIES)))
def test_pruned_net_equals_parent_with_pruned_channels_zeroed_random_masks(name, seed):
    model = random_model(name, seed)
    graph = discover_groups(model, INPUT)
    pruned = _assert_prunes_exactly(model, graph, _random_keep(graph, torch.Generator().manual_seed(seed)))
    assert pruned.num_features == pruned.get_classifier().in_features or hasattr(pruned, 'head_hidden_size')
    x = torch.randn(2, *INPUT, dtype=torch.float64)
    for info, feat in zip(pruned.feature_info, pruned.forward_intermediates(x, intermediates_only=True)):
        assert feat.shape[1] == info['num_chs'], info['module']


def test_eca_nets_prune_exactly_in_their_exact_groups_and_validly_in_the_inexact_ones():
    model = random_model('ecaresnet26t')
    graph = discover_groups(model, INPUT)
    exact = [g for g in graph.prunable if g.exact]
    assert len(exact) == len(graph.prunable) - 4  # the four residual streams carry ECA gates
    _assert_prunes_exactly(model, graph, _random_keep(graph, torch.Generator().manual_seed(5), exact))

    # an inexact group: the pruned net runs, but the neighbours' gates changed, so it is not the zeroed parent
    keep = {'layer2.0.conv3': torch.arange(0, graph['layer2.0.conv3'].size, 2)}
    x = torch.randn(3, *INPUT, dtype=torch.float64)
    with torch.no_grad():
        got, zeroed = prune_model(model, graph, keep)(x), zero_pruned_inputs(model, graph, keep)(x)
    # float64 rounding of this net is ~1e-13; a changed gate moves logits by a visible fraction of their scale
    assert got.shape == zeroed.shape and (got - zeroed).abs().max() > 1e-6 * zeroed.abs().max()


@pytest.mark.parametrize('name', ['resnet18', 'efficientnet_b0', 'mobilenetv3_small_100'])
def test_pruned_net_equals_parent_with_pruned_channels_zeroed_knapsack_masks(name):
    model = random_model(name)
    graph = discover_groups(model, INPUT)
    target = 0.5 * count_flops(model, INPUT).gmacs
    result = knapsack_prune(
        model, graph, magnitude_importance(model, graph), target, arch=name, input_size=INPUT, progress=False
    )
    assert result.keep, 'the knapsack pruned nothing'
    _assert_prunes_exactly(model, graph, result.keep)


@pytest.mark.parametrize('name', FAMILIES)
def test_spec_rebuilds_the_pruned_architecture_without_parent_weights(name, tmp_path):
    model = random_model(name)
    graph = discover_groups(model, INPUT)
    keep = _random_keep(graph, torch.Generator().manual_seed(3))
    pruned = prune_model(model, graph, keep)
    spec = ArchSpec(name, {g: len(i) for g, i in keep.items()}, INPUT)
    spec.save(tmp_path / 'spec.json')
    rebuilt = build_pruned(ArchSpec.load(tmp_path / 'spec.json')).double().eval()
    rebuilt.load_state_dict(pruned.state_dict())  # strict: every name and shape must agree
    x = torch.randn(2, *INPUT, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x), atol=0, rtol=0)
    assert rebuilt.num_features == pruned.num_features


def test_rebuild_accepts_timm_kwargs():
    spec = ArchSpec('resnet18', {'layer1.0.conv1': 16, 'conv1': 32}, INPUT)
    model = build_pruned(spec, num_classes=7, in_chans=1).eval()
    assert model(torch.randn(2, 1, *INPUT[1:])).shape == (2, 7)
    model.reset_classifier(3)
    assert model(torch.randn(1, 1, *INPUT[1:])).shape == (1, 3)


def test_parent_is_untouched():
    model = random_model('resnet18')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = discover_groups(model, INPUT)
    prune_model(model, graph, _random_keep(graph, torch.Generator().manual_seed(0)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_keep_and_spec_are_clear_errors():
    model = random_model('resnet18')
    graph = discover_groups(model, INPUT)
    with pytest.raises(ValueError, match="group 'layer1.0.conv1': kept indices"):
        prune_model(model, graph, {'layer1.0.conv1': torch.tensor([0, 0, 1])})
    with pytest.raises(ValueError, match="'fc' cannot be pruned: network output"):
        prune_model(model, graph, {'fc': torch.arange(10)})
    with pytest.raises(KeyError, match="no channel group named 'nope'"):
        prune_model(model, graph, {'nope': torch.arange(3)})
    with pytest.raises(ValueError, match=r"no channel group named \['layer9.conv'\]"):
        build_pruned(ArchSpec('resnet18', {'layer9.conv': 3}))
    with pytest.raises(ValueError, match='keeps 999 channels but the parent has only 64'):
        build_pruned(ArchSpec('resnet18', {'conv1': 999}))
    with pytest.raises(ValueError, match='spec.json: missing field'):
        ArchSpec.from_dict({'parent': 'resnet18'}, source='spec.json')


class _SharedConv(torch.nn.Module):
    """`shared(a(x)) + shared(b(x))`: one conv applied to two different tensors (issue 12's case)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 8, 1)
        self.shared = torch.nn.Conv2d(8, 12, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(12)
        self.head = torch.nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = self.bn(self.shared(torch.relu(self.a(x))) + self.shared(self.b(x)))
        return self.head(torch.relu(y)).mean((2, 3))


def test_a_module_called_twice_ties_its_inputs_and_prunes_exactly():
    torch.manual_seed(0)
    model = _SharedConv().double().eval()
    model.bn.running_mean.normal_(0, 0.1)
    model.bn.running_var.uniform_(0.5, 1.5)
    graph = discover_groups(model, INPUT)
    # both calls read `shared`'s input slice: a's and b's outputs are one group with it, pruned together
    (tied,) = [g for g in graph.groups if 'shared' in g.modules('in')]
    assert set(tied.modules('out')) == {'a', 'b'} and tied.prunable
    # both calls produce the same 12 channels: one group, the conv listed once
    (out,) = [g for g in graph.groups if 'shared' in g.modules('out')]
    assert out.modules('out') == ['shared'] and out.modules('norm') == ['bn']
    keep = {tied.name: torch.tensor([0, 3, 4, 7]), out.name: torch.tensor([1, 2, 5, 6, 8, 11])}
    pruned = _assert_prunes_exactly(model, graph, keep)
    assert (pruned.shared.in_channels, pruned.shared.out_channels) == (4, 6)


def test_spec_of_a_model_that_cannot_run_small_rebuilds_at_its_own_input_size():
    """inception_v3's kernels outgrow a 64 px image: the small trace fails, the spec's 299 px one works."""
    parent = timm.create_model('inception_v3', num_classes=10)
    graph = discover_groups(parent, (3, 299, 299))
    group = graph['Conv2d_2a_3x3.conv']  # a plain conv -> BN -> conv chain in the stem
    assert group.prunable and group.size == 32
    rebuilt = build_pruned(ArchSpec('inception_v3', {group.name: 24}, (3, 299, 299)), num_classes=10)
    assert rebuilt.Conv2d_2a_3x3.conv.out_channels == 24 and rebuilt.Conv2d_2b_3x3.conv.in_channels == 24
    with torch.no_grad():
        assert rebuilt.eval()(torch.randn(1, 3, 299, 299)).shape == (1, 10)
