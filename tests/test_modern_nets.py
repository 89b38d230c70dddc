"""ConvNeXt (v1, v2) and ViT / DeiT: channels followed through permutes, transposes and reshapes, LayerNorm and
GlobalResponseNorm groups marked inexact, attention heads pruned whole. Exact groups are checked as everywhere else:
in float64, the pruned net equals its parent with the pruned channels (heads) zeroed, for random and knapsack masks.
Models are shrunk through their timm arguments (depths, img_size) so that the file runs in seconds."""

import pytest
import timm
import torch
import torch.nn as nn
from engine_utils import random_keep, random_model, zero_pruned_inputs
from timm.layers import GluMlp
from timm.layers.grn import GlobalResponseNorm

from kpid_zoo.budget.prune import knapsack_prune
from kpid_zoo.engine.flops import count_flops
from kpid_zoo.engine.groups import ROLE_DW, ROLE_HEADS, ROLE_NORM, ROLE_OUT, ROLE_PARAM, discover_groups
from kpid_zoo.engine.importance import magnitude_importance
from kpid_zoo.engine.surgery import ArchSpec, build_pruned, prune_model

SMALL_CONVNEXT = {'depths': [1, 1, 2, 1]}
SMALL_VIT = {'img_size': 32, 'depth': 2}
# (timm name, model arguments, input size)
MODELS = {
    'convnext_atto': ('convnext_atto', SMALL_CONVNEXT, (3, 64, 64)),  # 1x1 convs and LayerNorm2d (NCHW)
    'convnext_atto_cl': ('convnext_atto', {**SMALL_CONVNEXT, 'conv_mlp': False}, (3, 64, 64)),  # permutes, Linear
    'convnextv2_atto': ('convnextv2_atto', SMALL_CONVNEXT, (3, 64, 64)),
    'vit_tiny': ('vit_tiny_patch16_224', SMALL_VIT, (3, 32, 32)),
    'vit_tiny_ls_avg': ('vit_tiny_patch16_224', {**SMALL_VIT, 'init_values': 0.1, 'global_pool': 'avg'}, (3, 32, 32)),
    'deit_tiny': ('deit_tiny_patch16_224', SMALL_VIT, (3, 32, 32)),
    'deit_tiny_distilled': ('deit_tiny_distilled_patch16_224', SMALL_VIT, (3, 32, 32)),
}
EXACT = ['convnext_atto', 'convnext_atto_cl', 'vit_tiny', 'vit_tiny_ls_avg', 'deit_tiny', 'deit_tiny_distilled']


def _model(key: str, seed: int = 0):
    """The model in float64, eval mode, with every norm, layer scale and token randomised (fresh ones are the
    identity, 1e-6 or zero, which would hide a slicing mistake)."""
    name, kwargs, size = MODELS[key]
    model = random_model(name, seed, **kwargs)
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
        if isinstance(module, GlobalResponseNorm):
            module.weight.data.normal_(0, 0.5)
            module.bias.data.normal_(0, 0.1)
    for name, p in model.named_parameters():
        if name.rpartition('.')[2] == 'gamma':  # ConvNeXt's and timm LayerScale's
            p.data.uniform_(0.5, 1.5)
        if name in ('cls_token', 'dist_token', 'pos_embed'):
            p.data.normal_(0, 1)
    return model, size


def _assert_exact(model, graph, keep, size):
    x = torch.randn(2, *size, dtype=torch.float64)
    pruned = prune_model(model, graph, keep)
    with torch.no_grad():
        expected, got = zero_pruned_inputs(model, graph, keep)(x), pruned(x)
    assert expected.abs().max() > 1e-3
    # a few thousand float64 multiply-adds (and a softmax) per output: rounding stays near 1e-14, far below 1e-9
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    return pruned


@pytest.mark.parametrize('key', EXACT)
def test_exact_groups_prune_exactly_with_random_masks(key):
    model, size = _model(key)
    graph = discover_groups(model, size)
    exact = [g for g in graph.prunable if g.exact]
    assert exact and len(exact) < len(graph.prunable)  # the residual streams are inexact (LayerNorm)
    pruned = _assert_exact(model, graph, random_keep(graph, torch.Generator().manual_seed(1), exact), size)
    x = torch.randn(2, *size, dtype=torch.float64)
    assert pruned.forward_head(pruned.forward_features(x), pre_logits=True).shape[-1] == pruned.num_features


@pytest.mark.parametrize('key', ['vit_tiny', 'deit_tiny_distilled'])
def test_attention_heads_are_pruned_whole(key):
    model, size = _model(key)
    graph = discover_groups(model, size)
    heads = graph['blocks.0.attn']
    assert heads.unit == 'heads' and heads.size == 3 and heads.exact
    assert {(m.module, m.role) for m in heads.members} == {
        ('blocks.0.attn', ROLE_HEADS),
        ('blocks.0.attn.qkv', ROLE_OUT),
        ('blocks.0.attn.proj', 'in'),
    }
    keep = {'blocks.0.attn': torch.tensor([0, 2]), 'blocks.1.attn': torch.tensor([1])}
    pruned = _assert_exact(model, graph, keep, size)
    attn = pruned.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (2, 64, 128)
    assert attn.qkv.weight.shape == (3 * 128, 192) and attn.proj.weight.shape == (192, 128)
    # rows of q, k and v of head 1 went, in each of the three
    kept_rows = torch.cat([torch.arange(p * 192 + h * 64, p * 192 + (h + 1) * 64) for p in range(3) for h in (0, 2)])
    torch.testing.assert_close(attn.qkv.weight, model.blocks[0].attn.qkv.weight[kept_rows], atol=0, rtol=0)
    assert pruned.blocks[1].attn.num_heads == 1


@pytest.mark.parametrize('key', ['convnext_atto', 'vit_tiny'])
def test_exact_groups_prune_exactly_with_knapsack_masks(key):
    model, size = _model(key)
    graph = discover_groups(model, size).exact_only()  # what a recipe prunes by default
    target = 0.6 * count_flops(model, size).gmacs
    result = knapsack_prune(
        model, graph, magnitude_importance(model, graph), target, arch=key, input_size=size, progress=False
    )
    assert result.keep and all(graph[g].exact for g in result.keep)
    _assert_exact(model, graph, result.keep, size)


@pytest.mark.parametrize('key', ['convnext_atto_cl', 'deit_tiny'])
def test_knapsack_prunes_inexact_groups_only_when_allowed_and_lands_on_the_target(key):
    model, size = _model(key)
    graph = discover_groups(model, size)
    target = 0.5 * count_flops(model, size).gmacs
    importance = magnitude_importance(model, graph)
    for g in graph.inexact:  # make the inexact groups the cheapest to cut, so the knapsack wants them
        importance[g.name] = importance[g.name] * 1e-6
    allowed = knapsack_prune(model, graph, importance, target, arch=key, input_size=size, round_to=1, progress=False)
    assert any(not graph[g].exact for g in allowed.keep)
    assert 0.99 * target <= count_flops(allowed.model, size).gmacs <= target
    exact_only = graph.exact_only()
    result = knapsack_prune(model, exact_only, importance, target, arch=key, input_size=size, progress=False)
    assert result.keep and all(graph[g].exact for g in result.keep)


def test_layer_norm_and_grn_groups_are_inexact_with_their_reasons():
    vit, size = _model('vit_tiny')
    graph = discover_groups(vit, size)
    embedding = graph['patch_embed.proj']  # the residual stream: one group, tokens and position embedding included
    assert {('cls_token', ROLE_PARAM), ('pos_embed', ROLE_PARAM), ('norm', ROLE_NORM), ('head', 'in')} <= {
        (m.module, m.role) for m in embedding.members
    }
    assert 'blocks.0.norm1: LayerNorm normalises over the channels' in embedding.inexact
    assert {g.name for g in graph.inexact} == {'patch_embed.proj'}
    assert 'importance.allow_inexact: true' in graph.exact_only()['patch_embed.proj'].reason

    convnext = discover_groups(*_model('convnext_atto'))
    assert 'stem.1: LayerNorm2d normalises over the channels' in convnext['stem.0'].inexact
    assert {g.name for g in convnext.inexact} == {
        'stem.0',
        'stages.1.downsample.1',
        'stages.2.downsample.1',
        'stages.3.downsample.1',
    }
    v2 = discover_groups(*_model('convnextv2_atto'))
    hidden = v2['stages.0.blocks.0.mlp.fc1']  # the MLP hidden width passes a GlobalResponseNorm
    assert 'mlp.grn: GlobalResponseNorm divides each channel by the mean response' in hidden.inexact
    assert len(v2.prunable) == 9 and not v2.exact_only().prunable


@pytest.mark.parametrize('key', ['convnextv2_atto', 'vit_tiny'])
def test_inexact_groups_prune_to_a_valid_net_that_differs_from_the_zeroed_parent(key):
    model, size = _model(key)
    graph = discover_groups(model, size)
    keep = random_keep(graph, torch.Generator().manual_seed(2), graph.inexact)
    x = torch.randn(2, *size, dtype=torch.float64)
    with torch.no_grad():
        got, zeroed = prune_model(model, graph, keep)(x), zero_pruned_inputs(model, graph, keep)(x)
    # float64 rounding is ~1e-14; a norm over fewer channels moves the logits by a visible share of their scale
    assert got.shape == zeroed.shape and (got - zeroed).abs().max() > 1e-6 * zeroed.abs().max()


def test_glu_mlp_hidden_width_is_one_group_of_both_halves():
    model = random_model('vit_tiny_patch16_224', **SMALL_VIT, mlp_layer=GluMlp, mlp_ratio=2)
    size = MODELS['vit_tiny'][2]
    graph = discover_groups(model, size)
    hidden = graph['blocks.0.mlp.fc1']
    assert hidden.exact and hidden.size == 192  # fc1 writes 384: value and gate halves, channel c of each tied
    pruned = _assert_exact(model, graph, {'blocks.0.mlp.fc1': torch.arange(0, 192, 3)}, size)
    assert pruned.blocks[0].mlp.fc1.out_features == 128 and pruned.blocks[0].mlp.fc2.in_features == 64


@pytest.mark.parametrize('key', ['convnext_atto', 'convnext_atto_cl', 'vit_tiny', 'deit_tiny_distilled'])
def test_spec_rebuilds_the_pruned_net_and_its_head_can_be_reset(key):
    model, size = _model(key)
    graph = discover_groups(model, size)
    keep = random_keep(graph, torch.Generator().manual_seed(3))
    pruned = prune_model(model, graph, keep)
    name, kwargs = MODELS[key][:2]
    rebuilt = build_pruned(ArchSpec(name, {g: len(i) for g, i in keep.items()}, size, kwargs)).double().eval()
    rebuilt.load_state_dict(pruned.state_dict())  # strict: every name and shape agrees
    x = torch.randn(2, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x), atol=0, rtol=0)
    rebuilt.reset_classifier(7)
    assert rebuilt(x).shape == (2, 7)


def _torch_pruning_groups(model, size) -> set[frozenset]:
    tp = pytest.importorskip('torch_pruning')
    names = {m: n for n, m in model.named_modules()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *size))
    groups = set()
    for group in dg.get_all_groups(ignored_layers=[model.get_classifier()], root_module_types=(nn.Conv2d, nn.Linear)):
        members = set()
        for item in group:
            mod = item.dep.target.module
            if mod not in names:
                continue  # Torch-Pruning's pseudo-modules for adds, reshapes and the like
            if isinstance(mod, nn.LayerNorm):
                role = ROLE_NORM
            elif isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels > 1:
                role = ROLE_DW
            else:
                role = ROLE_OUT if dg.is_out_channel_pruning_fn(item.dep.handler) else 'in'
            members.add((names[mod], role))
        groups.add(frozenset(members))
    return groups


@pytest.mark.parametrize('key', ['convnext_atto', 'convnext_atto_cl', 'vit_tiny', 'deit_tiny'])
def test_groups_match_torch_pruning_dependency_graph(key):
    name, kwargs, size = MODELS[key]
    model = timm.create_model(name, **kwargs).eval()
    # Torch-Pruning lists modules only: bare parameters (gamma, cls_token, pos_embed) and the attention layer that
    # owns the heads are ours alone; it prunes qkv / proj as channels, we as whole heads, with the same members
    ours = {
        frozenset((m.module, m.role) for m in g.members if m.role not in (ROLE_PARAM, ROLE_HEADS))
        for g in discover_groups(model, size).prunable
    }
    assert ours == _torch_pruning_groups(model, size)


def test_fused_attention_is_counted_as_its_matmuls():
    model = timm.create_model('vit_tiny_patch16_224', **SMALL_VIT).eval()
    size = MODELS['vit_tiny'][2]
    assert model.blocks[0].attn.fused_attn  # timm runs F.scaled_dot_product_attention
    fused = count_flops(model, size)
    for block in model.blocks:
        block.attn.fused_attn = False  # q @ k^T and attn @ v as matmuls, which fvcore counts itself
    assert fused.total == count_flops(model, size).total
    tokens, heads, head_dim = 5, 3, 64  # 4 patches and the class token
    assert (
        fused.by_module['blocks.0.attn'] - fused.by_module['blocks.0.attn.qkv'] - fused.by_module['blocks.0.attn.proj']
        == 2 * heads * tokens * tokens * head_dim
    )


class _ChannelsLastTrouble(nn.Module):
    def __init__(self, flatten: bool):
        super().__init__()
        self.flatten = flatten
        self.conv, self.conv2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(30, 4, 1), nn.Linear(8 * 30 * 30, 4)

    def forward(self, x):
        x = self.conv(x)
        if self.flatten:
            return self.fc(x.flatten(1))  # merges the channels with the positions
        return self.conv2(x.permute(0, 2, 3, 1)).mean((1, 2, 3))  # a conv fed channels-last reads rows as channels


def test_ops_that_cannot_be_followed_fix_their_channels_with_a_reason():
    conv = discover_groups(_ChannelsLastTrouble(flatten=False), (3, 32, 32))['conv']
    assert (
        not conv.prunable and conv.reason == 'conv2: Conv2d reads channels on dim 1, but they are on dim 3 of its input'
    )
    conv = discover_groups(_ChannelsLastTrouble(flatten=True), (3, 32, 32))['conv']
    assert not conv.prunable and conv.reason == 'flatten: flatten merges or splits the channel dimension'


class _ScaledBy(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        if self.how == 'view':
            g = self.gamma.view(1, -1, 1, 1).to(x.dtype)
        elif self.how == 'literal':  # sized for 8 channels only
            g = self.gamma.view(1, 8, 1, 1)
        elif self.how == 'double':
            g = (self.gamma * 2).view(1, -1, 1, 1)
        else:
            g = self.gamma.exp().view(1, -1, 1, 1)
        return self.b(self.a(x) * g)


@pytest.mark.parametrize('how', ['double', 'exp'])
def test_a_parameter_changed_by_more_than_a_view_fixes_the_channels_it_meets(how):
    graph = discover_groups(_ScaledBy(how), (3, 8, 8))
    assert not graph['a'].prunable
    assert graph['a'].reason.endswith('gamma meets 8 channels through an op other than a view (reshape, a cast...)')


def test_a_parameter_reached_through_views_is_sliced_with_its_channels():
    model = _ScaledBy('view').double().eval()
    graph = discover_groups(model, (3, 8, 8))
    assert ('gamma', ROLE_PARAM) in {(m.module, m.role) for m in graph['a'].members}
    pruned = _assert_exact(model, graph, {'a': torch.tensor([1, 4, 5])}, (3, 8, 8))
    assert pruned.gamma.shape == (3,)


def test_sizes_written_into_the_code_fix_the_channels():
    graph = discover_groups(_ScaledBy('literal'), (3, 8, 8))
    assert graph['a'].reason == 'mul: view sizes gamma with a constant of the code'

    class Literal(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.a(x).mean((2, 3)).reshape(-1, 8))  # a pruned net has fewer than 8

    graph = discover_groups(Literal(), (3, 8, 8))
    assert graph['a'].reason == 'reshape: reshape sizes the channels with a constant of the code'


def test_layer_scale_and_pooled_norm_are_sliced_with_the_embedding():
    model, size = _model('vit_tiny_ls_avg')  # timm LayerScale (x * gamma), avg pooling over tokens, fc_norm
    graph = discover_groups(model, size)
    members = {(m.module, m.role) for m in graph['patch_embed.proj'].members}
    assert {('blocks.0.ls1.gamma', ROLE_PARAM), ('blocks.1.ls2.gamma', ROLE_PARAM), ('fc_norm', ROLE_NORM)} <= members
    pruned = prune_model(model, graph, {'patch_embed.proj': torch.arange(0, 192, 2)})
    assert pruned.blocks[0].ls1.gamma.shape == (96,) and pruned.pos_embed.shape == (1, 5, 96)
    assert pruned(torch.randn(2, *size, dtype=torch.float64)).shape == (2, 1000)
