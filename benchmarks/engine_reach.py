"""Engine reach: the share of each architecture's channels that the pruning engine can prune, before and after
the layer-handler engine (grouped convs, concatenations and splits).

Share = conv/linear output channels (depthwise convs included) that lie in a prunable group / all of them (the
classifier excluded: logits are never pruned). "Before" is the engine as it was at `--before` (default: the
last commit before the handler engine), loaded from git; "after" is the working tree's. Both trace at 64 px.

    python benchmarks/engine_reach.py          # prints the table and writes docs/engine_reach.md
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import timm
import torch.nn as nn
from tqdm.auto import tqdm

from kpid_zoo.engine.groups import ROLE_DW, ROLE_OUT, Member, discover_groups

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
    'skresnet34',
]  # concat / split
INPUT = (3, 64, 64)


def old_engine(rev: str):
    """kpid_zoo/engine/groups.py as it was at `rev`, as a module (it imports only torch and timm)."""
    source = subprocess.run(
        ['git', '-C', str(ROOT), 'show', f'{rev}:kpid_zoo/engine/groups.py'], check=True, capture_output=True, text=True
    ).stdout
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


def share_after(model: nn.Module) -> tuple[float, int, int]:
    graph = discover_groups(model, INPUT)
    prunable = {graph.index(g.name) for g in graph.prunable}
    out = producers(model)
    kept = 0
    for name in out:
        channels = graph.layouts.get(Member(name, ROLE_OUT)) or graph.layouts.get(Member(name, ROLE_DW))
        if channels is not None:
            kept += sum(int(g) in prunable for g in channels.group)
    return kept / sum(out.values()), len(graph.prunable), len(graph.groups)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--before', default=BEFORE, help='git revision of the engine to compare with')
    parser.add_argument('--out', type=Path, default=ROOT / 'docs' / 'engine_reach.md')
    args = parser.parse_args(argv)
    engine = old_engine(args.before)
    rows = []
    for name in tqdm(ARCHS, desc='architectures'):
        model = timm.create_model(name).eval()
        before = share_before(engine, model)
        after, prunable, total = share_after(model)
        rows.append(f'| {name} | {before:.0%} | {after:.0%} | {prunable}/{total} |')
    table = ['| architecture | prunable channels before | after | prunable groups after |', '|---|---|---|---|']
    text = '\n'.join(
        [
            '# Engine reach: prunable channels per architecture',
            '',
            f'`python benchmarks/engine_reach.py`: the share of conv/linear output channels (classifier excluded) '
            f'that lie in a prunable channel group, traced at {INPUT[1]} px, with the engine before the layer '
            f'handlers (`{args.before}`) and now. Before, everything meeting a grouped conv, a concatenation or a '
            f'split was fixed; now grouped convs keep as many channels in each conv-group, and concatenations and '
            f'splits map kept channels through. What stays fixed now is the logits and whatever a reason in '
            f"`kpid-zoo groups MODEL` names. Groups equal Torch-Pruning 1.6.1's on every one of these where both "
            f"prune (tests/test_groups.py), except that where a split hands parts of one conv's output to "
            f"different convs (MixNet), each part is a group of its own, so that widths fix every layer's shape.",
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
