"""The KPID authors' released ImageNet models, which timm hosts, re-expressed as zoo records.

    python -m kpid_zoo.zoo.sources        # rewrites kpid_zoo/zoo/<name>.json and model_cards/<name>/README.md

timm builds each `*_pruned` model by narrowing its unpruned architecture to the widths in its
`timm/models/_pruned/<name>.txt`. Here the same widths are read off timm's model, group by group of our own
engine (every member of a channel group must agree, else it is an error), so the record's `ArchSpec` rebuilds
that architecture with `surgery.build_pruned`; tests check it tensor by tensor and output by output against
timm's model. GMACs and params are counted with `kpid_zoo.engine.flops` at the entry's input size.

Names: the zoo's, which are its recipes' (see `zoo.py`): `kpid_effnet_bN` is an EfficientNet pruned to
EfficientNet-BN's FLOPs (EfficientNet-B1 pruned to B0's FLOPs is the paper's EfficientNet-B0-FLOPs model,
released as `efficientnet_b1_pruned`), `kpid_ecaresnet50d` the pruned ECA-ResNet-50-D.
One name, one architecture (these widths); the weights are the tag timm gives them. The recipe of the same name
(`recipes/<name>.yaml`) sets out the same parent and budget for a kpid-zoo build.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ['TimmRelease', 'RELEASES', 'RESULTS_SOURCE', 'spec_from_timm_pruned', 'record_for', 'main']

# ImageNet-1k validation top-1/top-5 of each release, as timm publishes them (at the eval size given)
RESULTS_SOURCE = 'timm results/results-imagenet.csv (huggingface/pytorch-image-models@0173a139)'
_TF_BN_EPS = 1e-3  # timm.layers.BN_EPS_TF_DEFAULT, what timm's efficientnet_b*_pruned entrypoints set


@dataclass(frozen=True)
class TimmRelease:
    name: str  # our timm name
    timm_model: str  # timm's `model.tag` of the released weights
    parent: str  # the unpruned timm architecture the widths narrow
    top1: float
    top5: float
    eval_size: int
    description: str
    parent_kwargs: dict = field(default_factory=dict)  # what timm's *_pruned entrypoint sets on top of the parent


RELEASES: tuple[TimmRelease, ...] = (
    TimmRelease(
        'kpid_effnet_b0',
        'efficientnet_b1_pruned.in1k',
        'efficientnet_b1',
        78.242,
        93.836,
        240,
        "EfficientNet-B1 pruned by KPID to EfficientNet-B0's FLOPs (the paper's EfficientNet-B0-FLOPs model)",
        dict(bn_eps=_TF_BN_EPS, pad_type='same'),
    ),
    TimmRelease(
        'kpid_effnet_b1',
        'efficientnet_b2_pruned.in1k',
        'efficientnet_b2',
        79.920,
        94.852,
        260,
        "EfficientNet-B2 pruned by KPID to EfficientNet-B1's FLOPs",
        dict(bn_eps=_TF_BN_EPS, pad_type='same'),
    ),
    TimmRelease(
        'kpid_effnet_b2',
        'efficientnet_b3_pruned.in1k',
        'efficientnet_b3',
        80.852,
        95.244,
        300,
        "EfficientNet-B3 pruned by KPID to EfficientNet-B2's FLOPs",
        dict(bn_eps=_TF_BN_EPS, pad_type='same'),
    ),
    TimmRelease(
        'kpid_ecaresnet50d',
        'ecaresnet50d_pruned.miil_in1k',
        'ecaresnet50d',
        80.790,
        95.570,
        288,
        'ECA-ResNet-50-D pruned by KPID',
    ),
    TimmRelease(
        'kpid_ecaresnet101d',
        'ecaresnet101d_pruned.miil_in1k',
        'ecaresnet101d',
        81.998,
        96.160,
        288,
        'ECA-ResNet-101-D pruned by KPID',
    ),
)
_TRACE = (3, 64, 64)  # channel groups do not depend on the resolution


def spec_from_timm_pruned(release: TimmRelease, timm_pruned=None):
    """The `ArchSpec` of timm's pruned model (built here unless given): its width in every channel group of the
    parent that it narrows."""
    import timm

    from ..engine.groups import ROLE_IN, ROLE_NORM, discover_groups
    from ..engine.surgery import ArchSpec

    parent = timm.create_model(release.parent, **release.parent_kwargs)
    timm_pruned = timm_pruned or timm.create_model(release.timm_model.split('.')[0])
    pruned = dict(timm_pruned.named_modules())
    graph = discover_groups(parent, _TRACE)
    widths = {}
    for group in graph.groups:
        seen = set()
        for m in group.members:
            w = pruned[m.module].weight
            seen.add(
                w.shape[1]
                if m.role == ROLE_IN
                else pruned[m.module].num_features
                if m.role == ROLE_NORM
                else w.shape[0]
            )
        if len(seen) != 1:
            raise ValueError(f'{release.timm_model}: widths {sorted(seen)} inside channel group {group.name!r}')
        width = seen.pop()
        if width != group.size:
            if not group.prunable:
                raise ValueError(
                    f'{release.timm_model}: narrows {group.name!r}, which cannot be pruned ({group.reason})'
                )
            widths[group.name] = width
    cfg = timm.models.get_pretrained_cfg(release.timm_model)
    return ArchSpec(release.parent, widths, tuple(cfg.input_size), dict(release.parent_kwargs))


def record_for(release: TimmRelease):
    """The zoo record of one release: spec, timm's pretrained cfg for it, fvcore GMACs and params."""
    import timm

    from ..core.files import WEIGHTS_FILE
    from ..engine.flops import count_flops, count_params
    from ..engine.surgery import build_pruned
    from .records import CFG_KEYS, ZooRecord

    spec = spec_from_timm_pruned(release)
    cfg = timm.models.get_pretrained_cfg(release.timm_model).to_dict()
    model = build_pruned(spec).eval()
    return ZooRecord(
        name=release.name,
        tag=release.timm_model.split('.')[1],
        description=release.description,
        spec=spec.to_dict(),
        source='timm',
        source_model=release.timm_model,
        hf_hub_id=cfg['hf_hub_id'],
        weights_file=WEIGHTS_FILE,
        pretrained_cfg={k: cfg[k] for k in CFG_KEYS if cfg.get(k) is not None},
        gmacs=count_flops(model, spec.input_size).gmacs,
        params=count_params(model),
        top1=release.top1,
        top5=release.top5,
        eval_size=release.eval_size,
        metrics_source=RESULTS_SOURCE,
    )


def main(argv: list[str] | None = None) -> int:
    from .card import build_zoo_card
    from .records import ZOO_DIR

    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--zoo-dir', type=Path, default=ZOO_DIR)
    parser.add_argument('--cards-dir', type=Path, default=Path('model_cards'))
    args = parser.parse_args(argv)
    for release in RELEASES:
        record = record_for(release)
        print(
            f'{record.save(args.zoo_dir)}: {record.gmacs:.3f} GMACs, {record.params / 1e6:.2f} M params at '
            f'{record.input_size}'
        )
        card = args.cards_dir / record.name / 'README.md'
        card.parent.mkdir(parents=True, exist_ok=True)
        build_zoo_card(record).save(card)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
