"""`kpid-zoo build RECIPE --dry-run` on the shipped recipes, under `accelerate launch` with 2 CPU processes.

A recipe that would fail on the cluster -- a stage that breaks for its architecture, input size, class count,
precision or accumulation, a rank that does not join, a race between ranks on a checkpoint -- fails here first.

Every shipped recipe runs the dry run's code path, once per *code path*: the parent's layer types and the recipe's
switches (weights, parent training, importance method, inexact groups, budget kind, dataset, classes, precision,
accumulation, channels-last). The cheapest recipe of each code path is dry-run; a recipe whose code path another
one runs (EfficientNet-B2 beside EfficientNet-B0: the same layers, wider and deeper) is validated, preflighted
(its FLOPs target against its real parent at its real input size) and planned, in seconds instead of a minute.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from kpid_zoo.build import preflight
from kpid_zoo.core.recipe import Recipe, load_recipe
from kpid_zoo.dry_run import plan_real_run, standin_recipe, standin_sizes

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / 'recipes').glob('*.yaml'))
ACCELERATE = Path(sys.executable).parent / 'accelerate'


@functools.cache
def _parent_layers(model: str) -> tuple[frozenset[str], int]:
    """The layer types of a timm model and its parameter count (built on the meta device: no init)."""
    with torch.device('meta'):
        parent = timm.create_model(model)
    return frozenset(type(m).__name__ for m in parent.modules()), sum(p.numel() for p in parent.parameters())


def code_path(recipe: Recipe) -> tuple:
    """What decides which code a dry run of `recipe` runs (widths, depth, input size and targets only decide how
    long): the parent's layer types and the recipe's switches."""
    layers = _parent_layers(recipe.parent.model)[0]
    weights = (
        recipe.parent.weights
        if recipe.parent.weights in ('timm', 'none') or recipe.parent.weights.startswith('pypi:')
        else 'checkpoint'
    )
    f, d = recipe.finetune, recipe.data
    return (
        layers,
        weights,
        recipe.parent.train.epochs > 0,
        recipe.parent.num_classes is not None,
        recipe.importance.method,
        recipe.importance.allow_inexact,
        recipe.budget is None,
        d.dataset.split('/')[0],
        d.num_classes,
        d.train_subset is None,
        f.mixed_precision,
        f.grad_accum_steps > 1,
        f.channels_last,
        recipe.parent.train.channels_last,
    )


def _cost(recipe: Recipe) -> float:
    return _parent_layers(recipe.parent.model)[1] * recipe.input_size[1] * recipe.input_size[2]


def _split(paths: list[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """(recipes to dry-run: the cheapest of each code path, {other recipe: the dry-run recipe of its code path})."""
    recipes = {path: load_recipe(path) for path in paths}
    runs: dict[tuple, Path] = {}
    covered = {}
    for path in sorted(paths, key=lambda p: _cost(recipes[p])):
        key = code_path(recipes[path])
        if key in runs:
            covered[path] = runs[key]
        else:
            runs[key] = path
    return sorted(runs.values()), covered


DRY_RUN, COVERED = _split(RECIPES)


def _launch_dry_run(recipe_path: Path, tmp_path: Path) -> tuple[str, Path, Path]:
    """`accelerate launch` of the dry run, checked as every dry run is; returns (stdout, work, out)."""
    work, out = tmp_path / 'work', tmp_path / 'out'
    # --multi_gpu: without it, accelerate starts ONE process on a machine without GPUs (they join over gloo)
    cmd = [
        str(ACCELERATE),
        'launch',
        '--multi_gpu',
        '--num_processes',
        '2',
        '--num_machines',
        '1',
        '--mixed_precision',
        'no',
        '--dynamo_backend',
        'no',
        '-m',
        'kpid_zoo.cli',
        'build',
        str(recipe_path),
        '--dry-run',
        '--plan-processes',
        '8',
        '--work',
        str(work),
        '--out',
        str(out),
        '--quiet',
    ]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    recipe = load_recipe(recipe_path)
    assert f'dry run passed: every stage of {recipe_path} ran on stand-in data in 2 processes' in proc.stdout
    assert f'{recipe.name}: what the real run needs on 8 processes' in proc.stdout
    assert proc.stdout.count('dry run passed') == 1  # printed by the main process only
    assert proc.stdout.count('build: pruned: not built yet: running it') == 1  # log lines: the main process's
    assert {'model.safetensors', 'config.json', 'README.md'} <= {p.name for p in out.iterdir()}
    # every training stage ran its steps and checkpointed them
    assert sorted(p.name for p in (work / 'finetune' / 'checkpoints').iterdir()) == ['step_2', 'step_3']
    if recipe.parent.train.epochs > 0:
        assert sorted(p.name for p in (work / 'parent' / 'train' / 'checkpoints').iterdir()) == ['step_2', 'step_3']
    return proc.stdout, work, out


@pytest.mark.launch
@pytest.mark.parametrize('recipe_path', DRY_RUN, ids=[p.stem for p in DRY_RUN])
def test_dry_run_of_every_shipped_code_path_under_accelerate_launch(recipe_path, tmp_path):
    _launch_dry_run(recipe_path, tmp_path)


@pytest.mark.heavy
@pytest.mark.parametrize('recipe_path', sorted(COVERED), ids=[p.stem for p in sorted(COVERED)])
def test_a_recipe_whose_code_path_is_dry_run_is_validated_preflighted_and_planned(recipe_path, tmp_path):
    recipe = load_recipe(recipe_path)
    assert COVERED[recipe_path] in DRY_RUN and code_path(recipe) == code_path(load_recipe(COVERED[recipe_path]))
    preflight(recipe)  # the FLOPs target against the real parent, traced at the recipe's input size
    standin = Recipe.from_dict(standin_recipe(recipe, tmp_path, processes=2))  # what its dry run would run
    assert standin.parent.model == recipe.parent.model and standin.input_size == recipe.input_size
    plan = plan_real_run(recipe, 8, tmp_path, tmp_path)
    assert f'{recipe.name}: what the real run needs on 8 processes' in plan.table()
    assert plan.steps_per_epoch and all(stage.steps > 0 for stage in plan.stages)


def test_every_shipped_recipe_is_dry_run_or_shares_the_code_path_of_one_that_is():
    assert sorted(DRY_RUN + list(COVERED)) == RECIPES
    # the ECA-ResNets' attention is a layer type of its own: one of them runs
    assert any(p.stem.startswith('kpid_ecaresnet') for p in DRY_RUN)


@pytest.mark.launch
def test_dry_run_of_a_wds_recipe_streams_stand_in_shards(tmp_path):
    """The README's CIFAR recipe on WebDataset shards (`wds/cifar10`, a shard folder that is not on this machine):
    the dry run writes its stand-in images as shards (two per process), and every stage reads them as a stream."""
    recipe = yaml.safe_load((REPO / 'recipes' / 'kpid_effnet_lite0_cifar10.yaml').read_text())
    recipe['name'] = 'kpid_effnet_lite0_cifar10_wds'
    for key in ('train_subset', 'val_subset'):
        recipe['data'].pop(key, None)
    recipe['data'].update(dataset='wds/cifar10', root=str(tmp_path / 'cifar10-wds'), num_classes=10, val_split='test')
    path = tmp_path / 'wds.yaml'
    path.write_text(yaml.safe_dump(recipe))
    stdout, work, _ = _launch_dry_run(path, tmp_path)
    shards = sorted(p.name for p in (work / 'standin' / 'shards').glob('*.tar'))
    assert shards == [f'train-{i:06d}.tar' for i in range(4)] + ['val-000000.tar', 'val-000001.tar']
    assert "train images        unknown (no 'train' count in" in stdout


def test_standin_recipe_keeps_what_decides_the_code_path(tmp_path):
    recipe = load_recipe(REPO / 'recipes' / 'kpid_effnet_b0.yaml')
    standin = Recipe.from_dict(standin_recipe(recipe, tmp_path, processes=2))
    for field in ('input_size', 'flops'):
        assert getattr(standin, field) == getattr(recipe, field)
    assert standin.parent.model == recipe.parent.model and standin.parent.weights == 'none'
    assert standin.data.num_classes == recipe.data.num_classes == 1000
    assert (standin.data.mean, standin.data.std, standin.data.crop_pct) == (
        recipe.data.mean,
        recipe.data.std,
        recipe.data.crop_pct,
    )
    for field in ('mixed_precision', 'grad_accum_steps', 'kd_gamma', 'kd_logits_weight', 'temperature', 'optimizer'):
        assert getattr(standin.finetune, field) == getattr(recipe.finetune, field)
    train, val = standin_sizes(recipe, processes=2)
    assert (standin.data.train_subset, standin.data.val_subset) == (train, val) == (6, 5)
    # 6 images / (batch 1 x 2 processes) = 3 batches a process = 3 optimizer steps; 5 validation images leave
    # the last global batch uneven (one process pads it)
    assert standin.data.batch_size == 1
    assert standin.finetune.epochs * train / (1 * 2) == pytest.approx(3)


def test_plan_of_the_imagenet_recipe_on_8_processes(tmp_path):
    plan = plan_real_run(load_recipe(REPO / 'recipes' / 'kpid_effnet_b0.yaml'), 8, tmp_path, tmp_path)
    assert plan.train_images == 1_281_167 and 'ImageNet-1k assumed' in plan.train_images_source
    # 1,281,167 // (128 x 8) = 1251 full global batches per epoch; 100 epochs; a checkpoint every 2000 steps
    assert plan.steps_per_epoch == 1251
    (finetune,) = plan.stages
    assert (finetune.steps, finetune.checkpoints) == (125_100, 63)
