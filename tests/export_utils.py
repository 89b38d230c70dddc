"""Shared scaffolding for the export / publish / registry tests: small real pruned exports and a Hub env."""

from __future__ import annotations

from pathlib import Path

import timm

from kpid_zoo.budget._result import layer_widths
from kpid_zoo.budget.prune import PruneReport
from kpid_zoo.core.recipe import Recipe, load_recipe
from kpid_zoo.engine.flops import count_flops, count_params
from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.surgery import ArchSpec, build_pruned
from kpid_zoo.zoo.export import export_model

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = 'hf_loopbackSECRETtoken0123456789abcdef'  # a token-shaped string to hunt for in logs and files
SMALL_INPUT = (3, 64, 64)  # GMAC counting at 64 px keeps fvcore quick; the nets are fully convolutional


def pruned_spec(parent: str, fraction: float = 0.5, input_size=(3, 224, 224), round_to: int = 4) -> ArchSpec:
    """A real ArchSpec: every prunable group of `parent` cut to `fraction` of its width."""
    graph = discover_groups(timm.create_model(parent), input_size)
    widths = {g.name: max(round_to, int(g.size * fraction) // round_to * round_to) for g in graph.prunable}
    return ArchSpec(parent=parent, widths=widths, input_size=tuple(input_size))


def make_report(spec: ArchSpec, model, num_classes: int) -> PruneReport:
    parent = timm.create_model(spec.parent, num_classes=num_classes)
    graph = discover_groups(parent, SMALL_INPUT)
    pg, kg = count_flops(parent, SMALL_INPUT).gmacs, count_flops(model, SMALL_INPUT).gmacs
    widths = layer_widths(parent, model, graph)
    return PruneReport(
        parent=spec.parent,
        input_size=SMALL_INPUT,
        parent_gmacs=pg,
        target_gmacs=kg * 1.01,
        achieved_gmacs=kg,
        parent_params=count_params(parent),
        params=count_params(model),
        value=1.0,
        lp_bound=1.0,
        gap=0.0,
        layer_widths=widths,
    )


def tiny_recipe(name: str = 'kpid_tiny_test', parent: str = 'resnet10t') -> Recipe:
    return Recipe.from_dict(
        dict(
            name=name,
            parent=dict(model=parent, weights='none', num_classes=10),
            input_size=[3, 32, 32],
            flops=dict(target_ratio=0.5),
            data=dict(dataset='cifar10', crop_pct=1.0),
            hub=dict(repo_id=f'kpid-test/{name}'),
        )
    )


def export_pruned(
    out_dir: Path,
    spec: ArchSpec,
    recipe: Recipe,
    *,
    name: str,
    num_classes: int,
    input_size=(3, 224, 224),
    crop_pct: float = 0.875,
    **kw,
):
    """Build `spec` (random init: the bytes only need to round-trip), export it; returns (model, folder).

    Without model.onnx unless `onnx=True` is passed: its export and check take seconds per call, and
    tests/test_onnx_export.py covers it."""
    kw.setdefault('onnx', False)
    model = build_pruned(spec, num_classes=num_classes).eval()
    folder = export_model(
        model,
        spec,
        out_dir,
        name=name,
        pretrained_cfg=dict(
            input_size=input_size,
            crop_pct=crop_pct,
            interpolation='bicubic',
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
        metrics=dict(top1=71.25, top5=90.5, loss=1.2, n=50000),
        report=make_report(spec, model, num_classes),
        recipe=recipe,
        **kw,
    )
    return model, folder


def zoo_recipe(name: str) -> Recipe:
    return load_recipe(REPO_ROOT / 'recipes' / f'{name}.yaml')
