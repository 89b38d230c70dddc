"""MobileNetV4, FastViT (reparameterisable blocks, channel-multiplier convs, layer scale), EfficientViT (timm's
untraceable LiteMLA, traced as one layer with its own handler) and RegNetY at 64 px: pruned nets equal their
parents with the pruned channels (heads) zeroed, in float64, for random and knapsack masks; specs rebuild them;
the groups equal Torch-Pruning 1.6's where both prune."""

import pytest
import timm
import torch
import torch.nn as nn
from engine_utils import assert_pruned_exact, random_keep, random_model
from test_groups import _torch_pruning_groups

from kpid_zoo.budget.prune import knapsack_prune
from kpid_zoo.engine.flops import count_flops
from kpid_zoo.engine.groups import ROLE_CONV_GROUPS, ROLE_IN, ROLE_OUT, Member, discover_groups
from kpid_zoo.engine.importance import magnitude_importance
from kpid_zoo.engine.surgery import ArchSpec, build_pruned

MODELS = ['mobilenetv4_conv_small', 'fastvit_t8', 'efficientvit_b0', 'regnety_002']
INPUT = (3, 64, 64)  # EfficientViT's and FastViT's strides leave 2 px at the last stage


@pytest.mark.parametrize('name', MODELS)
def test_random_masks_prune_exactly_and_specs_rebuild_them(name):
    model = random_model(name, 1)
    graph = discover_groups(model, INPUT)
    # groups normalised by a LayerNorm (EfficientViT's head, once LayerNorm has a handler) are inexact by design
    keep = random_keep(graph, torch.Generator().manual_seed(1), [g for g in graph.prunable if g.exact])
    pruned = assert_pruned_exact(model, graph, keep, INPUT)
    rebuilt = build_pruned(ArchSpec(name, {g: len(i) for g, i in keep.items()}, INPUT)).double().eval()
    rebuilt.load_state_dict(pruned.state_dict())  # strict: every name and shape agrees
    x = torch.randn(1, *INPUT, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x), atol=0, rtol=0)
        # timm's width attributes stay true: features, feature_info, and a new classifier on the pruned features
        assert pruned.forward_features(x).shape[1] == pruned.num_features == rebuilt.num_features
        for info, feat in zip(pruned.feature_info, pruned.forward_intermediates(x, intermediates_only=True)):
            assert feat.shape[1] == info['num_chs'], info['module']
        pruned.reset_classifier(7)
        assert pruned.double()(x).shape == (1, 7)


# regnety_002's knapsack masks: tests/test_engine_reach.py
@pytest.mark.parametrize('name', [n for n in MODELS if n != 'regnety_002'])
def test_knapsack_masks_prune_exactly_within_the_flops_target(name):
    model = random_model(name, 2)
    graph = discover_groups(model, INPUT).exact_only()  # what the knapsack sees unless a recipe allows inexact groups
    target = 0.5 * count_flops(model, INPUT).gmacs
    result = knapsack_prune(
        model, graph, magnitude_importance(model, graph), target, arch=name, input_size=INPUT, progress=False
    )
    assert target * 0.99 <= count_flops(result.model, INPUT).gmacs <= target
    assert_pruned_exact(model, graph, result.keep, INPUT)


def _special(model: nn.Module):
    """Modules where the two engines part on purpose: the attentions' insides (we cut whole heads; Torch-Pruning
    cuts channels through their reshapes into heads), channel-multiplier convs (we cut whole conv-groups; Torch-Pruning
    cuts their inputs and outputs by the same indices although there are twice as many outputs) and LayerNorm
    (whose groups are not exact)."""
    special = set()
    for n, m in model.named_modules():
        if type(m).__name__ in ('LiteMLA', 'MultiQueryAttention2d'):
            special |= {f'{n}.{c}' for c, _ in m.named_modules() if c}
        elif isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels < m.out_channels or isinstance(m, nn.LayerNorm):
            special.add(n)
    return special


@pytest.mark.parametrize('name', MODELS + ['mobilenetv4_hybrid_medium'])
def test_groups_match_torch_pruning_where_both_prune(name, monkeypatch):
    import test_groups

    monkeypatch.setattr(test_groups, 'INPUT', INPUT)
    model = timm.create_model(name).eval()
    special = _special(model)
    # Torch-Pruning slices a layer scale's gamma as a bare parameter, never as a member of its group
    scales = {n for n, m in model.named_modules() if type(m).__name__ == 'LayerScale2d'}
    ours = {
        frozenset((m.module, m.role) for m in g.members if m.module not in scales)
        for g in discover_groups(model, INPUT).prunable
        if g.exact and not any(m.module in special for m in g.members)
    }
    theirs = {g for g in _torch_pruning_groups(model) if not any(m in special for m, _ in g)}
    assert ours == theirs
    least = {'mobilenetv4_conv_small': 21, 'fastvit_t8': 11, 'efficientvit_b0': 14, 'mobilenetv4_hybrid_medium': 28}
    assert len(ours) >= least.get(name, 44)


def test_efficientvit_lite_mla_prunes_whole_heads():
    model = random_model('efficientvit_b0', 3)
    graph = discover_groups(model, INPUT)
    mla = 'stages.3.blocks.1.context_module.main'
    heads = graph[mla]  # 8 heads of 3 x 16 qkv channels, a group named by the attention layer
    assert heads.prunable and heads.size == 8 and heads.unit == 'heads'
    assert graph.layouts[Member(f'{mla}.qkv.conv', ROLE_OUT)].multiplicity(graph.index(heads.name)) == 48
    assert graph.layouts[Member(f'{mla}.proj.conv', ROLE_IN)].multiplicity(graph.index(heads.name)) == 32  # 2 scales
    stream = graph['stages.3.blocks.0.main.point_conv.conv']  # the residual stream runs through the LiteMLA
    assert stream.prunable and f'{mla}.proj.conv' in stream.modules(ROLE_OUT)
    pruned = assert_pruned_exact(model, graph, {heads.name: torch.tensor([1, 4, 6])}, INPUT)
    block = pruned.get_submodule(mla)
    assert block.qkv.conv.out_channels == 3 * 3 * 16 and block.proj.conv.in_channels == 2 * 3 * 16
    assert block.aggreg[0][1].groups == 3 * 3 and block.aggreg[0][0].groups == 3 * 3 * 16


def test_fastvit_multiplier_convs_tie_the_trunk_and_pruned_nets_still_fuse():
    from timm.utils.model import reparameterize_model

    model = random_model('fastvit_t8', 4)
    graph = discover_groups(model, INPUT)
    trunk = graph['stem.0.conv_scale.conv']  # the stem's 48 channels: every stage doubles them with a multiplier
    assert trunk.prunable and trunk.size == 48
    gi = graph.index(trunk.name)
    large = Member('stages.3.downsample.proj.0.large_conv.conv', ROLE_CONV_GROUPS)
    assert graph.layouts[large].multiplicity(gi) == 8  # 48 -> 96 -> 192 -> 384: each stem channel 8 times
    assert graph.layouts[Member('head.fc', ROLE_IN)].multiplicity(gi) == 16  # and the final conv doubles again
    assert 'stages.2.blocks.1.layer_scale.gamma' in trunk.modules()
    keep = random_keep(graph, torch.Generator().manual_seed(4))
    pruned = assert_pruned_exact(model, graph, keep, INPUT)
    kept = len(keep[trunk.name])
    assert pruned.stages[3].blocks[0].layer_scale.gamma.shape == (8 * kept, 1, 1)
    assert pruned.stages[1].downsample.proj[0].in_chs == kept  # what reparameterize() reads, kept true
    # a pruned FastViT still fuses into plain convs for inference, computing the same
    fused = reparameterize_model(pruned)
    x = torch.randn(2, *INPUT, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), pruned(x), atol=1e-10, rtol=1e-10)
    # a parent fused before pruning is plain convs: its identity branches are folded, so each stage is its own group
    fused_parent = reparameterize_model(model)
    fused_graph = discover_groups(fused_parent, INPUT)
    assert len(fused_graph.prunable) > len(graph.prunable)
    assert_pruned_exact(fused_parent, fused_graph, random_keep(fused_graph, torch.Generator().manual_seed(5)), INPUT)


class _Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow cannot be traced


def test_an_untraceable_module_is_named_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.ReLU(), _Branchy()))
    with pytest.raises(ValueError) as info:
        discover_groups(model, INPUT)
    message = str(info.value)
    assert '\n' not in message and 'in 1.1 (_Branchy) at test_mobile_hybrids.py:' in message
    assert 'x if x.sum() > 0 else -x' in message and 'cannot be used as inputs to control flow' in message
    assert 'register a layer handler for _Branchy' in message


def test_a_timm_leaf_without_a_handler_fixes_its_channels_with_its_name(monkeypatch):
    from timm.models.efficientvit_mit import LiteMLA

    from kpid_zoo.engine import handlers

    monkeypatch.delitem(handlers._REGISTRY, LiteMLA)
    graph = discover_groups(timm.create_model('efficientvit_b0'), INPUT)
    stream = graph['stages.3.blocks.0.main.point_conv.conv']
    assert not stream.prunable
    assert stream.reason == (
        'stages.3.blocks.1.context_module.main: LiteMLA is traced as one layer (timm marks it not traceable) and '
        'has no layer handler'
    )


def test_a_latency_table_times_channel_multiplier_convs_at_their_narrowed_widths():
    from kpid_zoo.budget import latency as lat
    from kpid_zoo.budget.timing import LatencySetting, Timing

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=8), nn.ReLU(), nn.Conv2d(16, 4, 1))
    graph = discover_groups(net.eval(), (3, 16, 16))
    shapes = []

    def run_once(fn, setting, *, warmup, repeats):  # runs the narrowed layer on the input it was given, once
        shapes.append(tuple(fn().shape))
        return Timing.of([1.0])

    setting = LatencySetting(device='cpu', batch_size=1, threads=1)
    table = lat.build_table(
        net,
        graph,
        'multiplier',
        (3, 16, 16),
        setting,
        fractions=(0.5, 1.0),
        warmup=0,
        repeats=1,
        timer=run_once,
        progress=False,
    )
    terms = {t.module: t for t in table.terms}
    assert terms['2'].groups == ('0',) and len(shapes) == sum(t.values.size for t in table.terms) + 2
    assert (1, 8, 12, 12) in shapes  # the multiplier conv at half width: 4 conv-groups of 2 outputs each


def test_mobilenetv4_hybrid_attention_prunes_query_heads_and_layer_scales_exactly():
    model = random_model('mobilenetv4_hybrid_medium', 6)
    for name, p in model.named_parameters():
        if name.endswith('layer_scale.gamma'):  # 1e-5 at init: the attention would hardly reach the output
            p.data.uniform_(0.5, 1.5)
    graph = discover_groups(model, INPUT)
    heads = graph['blocks.3.8.attn']  # 4 query heads of 64
    assert heads.prunable and heads.size == 4 and heads.unit == 'heads'
    assert graph.layouts[Member('blocks.3.8.attn.output.proj', ROLE_IN)].multiplicity(graph.index(heads.name)) == 64
    key = graph['blocks.3.8.attn.key.proj']
    assert not key.prunable and key.reason == 'blocks.3.8.attn.key.proj: one key head, shared by every query head'
    stream = graph['blocks.3.0.pw_proj.conv']  # the stage's residual stream, through attention blocks' layer scales
    assert stream.prunable and ('blocks.3.8.layer_scale', 'channel') in {(m.module, m.role) for m in stream.members}
    keep = random_keep(graph, torch.Generator().manual_seed(6))
    pruned = assert_pruned_exact(model, graph, keep, INPUT)
    assert pruned.blocks[3][8].attn.num_heads == len(keep[heads.name])
    assert pruned.blocks[3][8].layer_scale.gamma.shape == (len(keep[stream.name]),)


class _Odd(nn.Module):
    def forward(self, x):
        return x


def test_a_graph_the_engine_cannot_follow_is_one_line_naming_the_node(monkeypatch):
    from kpid_zoo.engine import handlers
    from kpid_zoo.errors import UserError

    class Mismatched(handlers.LayerHandler):  # a handler tying spaces of different widths: nothing can follow it
        def propagate(self, ctx, name, module, x):
            return ctx.merge(x, ctx.new(len(x) + 1), name)

    monkeypatch.setitem(handlers._REGISTRY, _Odd, Mismatched())
    with pytest.raises(UserError) as info:
        discover_groups(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(_Odd())), INPUT)
    assert str(info.value) == (
        'cannot follow the channels of Sequential: node _1_0 (call_module 1.0) in 1.0: 1.0: ties channel spaces of '
        'different sizes (8 vs 9)'
    )


def test_the_knapsack_keeps_any_number_of_whole_heads():
    from kpid_zoo.budget._rounds import group_width_choices

    graph = discover_groups(timm.create_model('efficientvit_b0'), INPUT)
    choices = group_width_choices(graph, min_channels=8, round_to=8)
    # one head is already 3 x 16 qkv channels: any number of whole heads may stay
    assert choices['stages.3.blocks.1.context_module.main'] == list(range(1, 9))
    assert choices['stages.3.blocks.1.local_module.main.inverted_conv.conv'] == list(range(8, 513, 8))
