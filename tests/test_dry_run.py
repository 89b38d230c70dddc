"""`kpid-zoo build RECIPE --dry-run` on every shipped recipe, under `accelerate launch` with 2 CPU processes.

A recipe that would fail on the cluster -- a stage that breaks for its architecture, input size, class count,
precision or accumulation, a rank that does not join, a race between ranks on a checkpoint -- fails here first.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kpid_zoo.dry_run import plan_real_run, standin_recipe, standin_sizes
from kpid_zoo.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / 'recipes').glob('*.yaml'))
ACCELERATE = Path(sys.executable).parent / 'accelerate'


def _launch_dry_run(recipe_path: Path, tmp_path: Path) -> tuple[str, Path, Path]:
    """`accelerate launch` of the dry run, checked as every dry run is; returns (stdout, work, out)."""
    work, out = tmp_path / 'work', tmp_path / 'out'
    # --multi_gpu: without it, accelerate starts ONE process on a machine without GPUs (they join over gloo)
    cmd = [str(ACCELERATE), 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '-m', 'kpid_zoo.cli', 'build', str(recipe_path),
           '--dry-run', '--plan-processes', '8', '--work', str(work), '--out', str(out), '--quiet']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    recipe = load_recipe(recipe_path)
    assert f'dry run passed: every stage of {recipe_path} ran on stand-in data in 2 processes' in proc.stdout
    assert f'{recipe.name}: what the real run needs on 8 processes' in proc.stdout
    assert proc.stdout.count('dry run passed') == 1  # printed by the main process only
    assert {'model.safetensors', 'config.json', 'README.md'} <= {p.name for p in out.iterdir()}
    # every training stage ran its steps and checkpointed them
    assert sorted(p.name for p in (work / 'finetune' / 'checkpoints').iterdir()) == ['step_2', 'step_3']
    if recipe.parent.train.epochs > 0:
        assert sorted(p.name for p in (work / 'parent' / 'train' / 'checkpoints').iterdir()) == ['step_2', 'step_3']
    return proc.stdout, work, out


@pytest.mark.parametrize('recipe_path', RECIPES, ids=[p.stem for p in RECIPES])
def test_dry_run_of_every_shipped_recipe_under_accelerate_launch(recipe_path, tmp_path):
    _launch_dry_run(recipe_path, tmp_path)


def test_dry_run_of_a_wds_recipe_streams_stand_in_shards(tmp_path):
    """The README's CIFAR recipe on WebDataset shards (`wds/cifar10`, a shard folder that is not on this machine):
    the dry run writes its stand-in images as shards (two per process), and every stage reads them as a stream."""
    recipe = yaml.safe_load((REPO / 'recipes' / 'kpid_effnet_lite0_cifar10.yaml').read_text())
    recipe['name'] = 'kpid_effnet_lite0_cifar10_wds'
    for key in ('train_subset', 'val_subset'):
        recipe['data'].pop(key, None)
    recipe['data'].update(dataset='wds/cifar10', root=str(tmp_path / 'cifar10-wds'), num_classes=10,
                          val_split='test')
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
    assert (standin.data.mean, standin.data.std, standin.data.crop_pct) == \
        (recipe.data.mean, recipe.data.std, recipe.data.crop_pct)
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
