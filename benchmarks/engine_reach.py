"""Engine reach: the share of each architecture's channels that the pruning engine can prune, before and after
the layer-handler engine (grouped convs, concatenations and splits), beside Torch-Pruning 1.6.1's on the same models.

Share = conv/linear output channels (depthwise convs included) that lie in a prunable group / all of them (the
classifier excluded: logits are never pruned). "Before" is the engine as it was at `--before` (default: the
last commit before the handler engine), loaded from git; "after" is the working tree's, with its exact and inexact
prunable groups counted apart. Torch-Pruning's share is that of the output channels its `DependencyGraph` puts in a
prunable group with its default ignored layers (the classifier); attention's q/k/v projections join through its
`num_heads` option (`MetaPruner(num_heads=..., prune_num_heads=True)`: whole heads, as kpid-zoo prunes them). All
trace at 64 px (the ViTs built for 64 px: 16 patches). A model an engine cannot trace gets its one-line reason.

    python benchmarks/engine_reach.py          # prints the table and writes docs/engine_reach.md
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import timm
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kpid_zoo.engine.groups import ROLE_DW, ROLE_OUT, Member, discover_groups
from kpid_zoo.errors import one_line

ROOT = Path(__file__).resolve().parents[1]
BEFORE = 'a8ee61b'  # main before the handler engine
ARCHS = [
    'resnet50',
    'efficientnet_b0',
    'mobilenetv3_large_100',
    'ecaresnet50d',  # covered before
    'resnext50_32x4d',
    'seresnext26d_32x4d',
    'regnetx_002',
    'regnety_002',  # grouped convs
    'densenet121',
    'ghostnet_100',
    'mixnet_s',
    'mixnet_m',
    'skresnet18',
    'skresnet34',  # concat / split
    'convnext_atto',
    'convnextv2_atto',  # permute, LayerNorm, layer scale, GRN
    'vit_tiny_patch16_224',
    'deit_tiny_patch16_224',  # tokens, attention heads, position embedding, class token
    'mobilenetv4_conv_small',
    'fastvit_t8',  # reparameterisable blocks
    'efficientvit_b0',  # linear attention, not traceable by plain torch.fx
]
INPUT = (3, 64, 64)
KWARGS = {name: {'img_size': INPUT[1]} for name in ('vit_tiny_patch16_224', 'deit_tiny_patch16_224')}
REASON_CHARS = 60  # a failure's reason, cut to fit a table cell


def old_engine(rev: str):
    """The engine's groups module as it was at `rev`, as a module (it imports only torch and timm): at
    kpid_zoo/groups.py before the layers moved it to kpid_zoo/engine/groups.py."""
    for where in ('kpid_zoo/engine/groups.py', 'kpid_zoo/groups.py'):
        found = subprocess.run(['git', '-C', str(ROOT), 'show', f'{rev}:{where}'], capture_output=True, text=True)
        if found.returncode == 0:
            source = found.stdout
            break
    else:
        raise SystemExit(f'{rev}: no kpid_zoo/engine/groups.py or kpid_zoo/groups.py there ({found.stderr.strip()})')
    path = Path(tempfile.mkdtemp()) / 'groups_before.py'
    path.write_text(source)
    spec = importlib.util.spec_from_file_location('groups_before', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def producers(model: nn.Module) -> dict[str, int]:
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    return {
        n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not classifier
    }


def share_before(engine, model: nn.Module) -> float:
    graph = engine.discover_groups(model, INPUT)
    prunable = {m.module for g in graph.prunable for m in g.members if m.role in (ROLE_OUT, ROLE_DW)}
    out = producers(model)
    return sum(c for n, c in out.items() if n in prunable) / sum(out.values())


def share_after(model: nn.Module) -> tuple[float, float, int, int, int]:
    """(share in any prunable group, share in exact ones, prunable groups, inexact among them, all groups)."""
    graph = discover_groups(model, INPUT)
    prunable = {graph.index(g.name) for g in graph.prunable}
    exact = {graph.index(g.name) for g in graph.prunable if g.exact}
    out = producers(model)
    kept = kept_exact = 0
    for name in out:
        channels = graph.layouts.get(Member(name, ROLE_OUT)) or graph.layouts.get(Member(name, ROLE_DW))
        if channels is not None:
            kept += sum(int(g) in prunable for g in channels.group)
            kept_exact += sum(int(g) in exact for g in channels.group)
    total = sum(out.values())
    return kept / total, kept_exact / total, len(graph.prunable), len(graph.inexact), len(graph.groups)


def share_torch_pruning(model: nn.Module) -> float:
    """The share of output channels in Torch-Pruning's prunable groups (classifier ignored; attention by heads)."""
    import torch_pruning as tp

    warnings.filterwarnings('ignore', module='torch_pruning')  # one per unwrapped parameter (the class token...)
    classifier = model.get_classifier()
    example = torch.randn(1, *INPUT)
    heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(getattr(m, 'qkv', None), nn.Linear)}
    if heads:  # the option Torch-Pruning's ViT examples use: q/k/v pruned by whole heads, the head dim kept
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(),
            ignored_layers=[classifier],
            num_heads=heads,
            prune_num_heads=True,
            prune_head_dims=False,
        )
        graph, ignored, roots = pruner.DG, pruner.ignored_layers, pruner.root_module_types
    else:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        ignored, roots = [classifier], (nn.Conv2d, nn.Linear)
    pruned = {
        id(item.dep.target.module)
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=roots)
        for item in group
        if graph.is_out_channel_pruning_fn(item.dep.handler)
    }
    modules = dict(model.named_modules())
    out = producers(model)
    return sum(c for n, c in out.items() if id(modules[n]) in pruned) / sum(out.values())


def _cell(measure, *args) -> tuple:
    """What `measure` returns, or its failure as a table cell (a model one engine cannot trace)."""
    try:
        return measure(*args), ''
    except Exception as e:  # the engines' own errors, whatever their type: the row says why
        return None, one_line(e, REASON_CHARS).replace('|', '/')


def row(engine, name: str) -> str:
    """One table row: kpid-zoo before and after, the groups after, Torch-Pruning."""

    def fresh() -> nn.Module:  # each engine traces a model of its own: none leaves hooks or state on another's
        torch.manual_seed(0)
        return timm.create_model(name, **KWARGS.get(name, {})).eval()

    before, why_before = _cell(share_before, engine, fresh())
    after, why_after = _cell(share_after, fresh())
    theirs, why_theirs = _cell(share_torch_pruning, fresh())
    if after is None:
        now, exact, groups = f'fails: {why_after}', '', ''
    else:
        share, share_exact, prunable, inexact, total = after
        now, exact = f'{share:.0%}', f'{share_exact:.0%}'
        groups = f'{prunable}/{total}' + (f' ({inexact} inexact)' if inexact else '')
    return (
        f'| {name} | {"fails" if before is None else f"{before:.0%}"} | {now} | {exact} | {groups} | '
        f'{f"fails: {why_theirs}" if theirs is None else f"{theirs:.0%}"} |'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--before', default=BEFORE, help='git revision of the engine to compare with')
    parser.add_argument('--out', type=Path, default=ROOT / 'docs' / 'engine_reach.md')
    parser.add_argument('--archs', nargs='+', default=ARCHS, help='timm models to measure (default: the table)')
    args = parser.parse_args(argv)
    engine = old_engine(args.before)
    rows = [row(engine, name) for name in tqdm(args.archs, desc='architectures')]
    table = [
        '| architecture | prunable channels before | after | of them exact | prunable groups after | '
        'Torch-Pruning 1.6.1 |',
        '|---|---|---|---|---|---|',
    ]
    text = '\n'.join(
        [
            '# Engine reach: prunable channels per architecture',
            '',
            f'`python benchmarks/engine_reach.py`: the share of conv/linear output channels (classifier excluded) '
            f'that lie in a prunable channel group, traced at {INPUT[1]} px (the ViTs built for {INPUT[1]} px), with '
            f'the engine before the layer handlers (`{args.before}`) and now, and beside it the share that '
            f"Torch-Pruning 1.6.1's `DependencyGraph` puts in a prunable group with its default ignored layers (the "
            f'classifier; attention by whole heads through its `num_heads` option). Before, everything meeting a '
            f'grouped conv, a concatenation or a split was fixed; now grouped convs keep as many channels in each '
            f'conv-group, and concatenations and splits map kept channels through. What stays fixed now is the '
            f'logits and whatever a reason in `kpid-zoo groups MODEL` names. Inexact groups (a LayerNorm or an ECA '
            f"gate over their channels) are prunable but change the kept channels' values, so the knapsack takes "
            f'them only with `importance.allow_inexact: true`: "of them exact" is the share pruned by default. '
            f"Torch-Pruning does not tell the two apart. Groups equal Torch-Pruning 1.6.1's on every CNN here where "
            f"both prune (tests/test_groups.py), except that where a split hands parts of one conv's output to "
            f"different convs (MixNet), each part is a group of its own, so that widths fix every layer's shape. "
            f'The run takes about 3 minutes of one core of a 2-core AMD EPYC (OMP_NUM_THREADS=1).',
            '',
            *table,
            *rows,
            '',
        ]
    )
    print('\n'.join(table + rows))
    args.out.write_text(text)
    print(f'wrote {args.out}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
