"""Data and schedules that used to give silently wrong results: an undecodable image replaced by its neighbour,
changed images behind an "up to date" stage, schedules that cannot run, a card that claims a fine-tune that did
not happen. Each now fails with one line naming the file (or the recipe field and the numbers), reruns saying
which split changed, or says what ran.

The builds are micro-sized (resnet18 at 32 px, 96 real CIFAR-10 training JPEGs in 4 classes, 3 steps per training
stage) and run in this process, from a folder holding the recipe, its data (`data.root: data`) and the build.
kpid_zoo.core.datasource is imported inside the tests that need it, so that each test shows its own failure on a
kpid-zoo without it."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from kpid_zoo.cli import main
from kpid_zoo.core.recipe import DataSpec, FinetuneSpec, RecipeError, load_recipe
from kpid_zoo.training.data import create_loaders
from kpid_zoo.training.evaluate import evaluate

# 96 training images in batches of 16: 6 batches per epoch; half an epoch is 3 optimizer steps per stage
MICRO = {
    'name': 'kpid_micro_hostile',
    'parent': {'model': 'resnet18', 'weights': 'none', 'num_classes': 4, 'train': {'epochs': 0.5, 'lr': 0.01}},
    'input_size': [3, 32, 32],
    'flops': {'target_ratio': 0.5, 'tolerance': 0.05},
    'importance': {'method': 'taylor', 'batches': 1, 'batch_size': 16},
    'data': {
        'dataset': 'imagefolder',
        'root': 'data',
        'num_classes': 4,
        'batch_size': 16,
        'workers': 0,
        'crop_pct': 1.0,
    },
    'finetune': {'epochs': 0.5, 'lr': 0.01, 'checkpoint_every': 50},
}
BUILD = ['build', 'recipe.yaml', '--out', 'out', '--work', 'work', '--quiet']
STAGES = ('parent', 'pruned', 'finetune', 'eval', 'export')


def _case(folder: Path, images: Path, **changes) -> Path:
    """`folder` with recipe.yaml (MICRO with `section__key=value` changes) and a copy of `images` as data/."""
    recipe = copy.deepcopy(MICRO)
    for dotted, value in changes.items():
        *sections, key = dotted.split('__')
        target = recipe
        for section in sections:
            target = target[section]
        target[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'recipe.yaml').write_text(yaml.safe_dump(recipe))
    if not (folder / 'data').exists():
        shutil.copytree(images, folder / 'data')  # copy2: sizes and mtimes kept, so the same fingerprint
    return folder


def _build(folder: Path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with contextlib.chdir(folder):
        code = main(BUILD)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _break(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({'truncated': data[: len(data) // 2], 'garbage': os.urandom(len(data)), 'empty': b''}[how])


@pytest.fixture(scope='module')
def reference(real_jpeg_folder, tmp_path_factory):
    """A finished micro build (its folder), built once for the cases below to copy."""
    folder = _case(tmp_path_factory.mktemp('hostile') / 'reference', real_jpeg_folder)
    with contextlib.chdir(folder):
        assert main(BUILD) == 0
    return folder


def _copy(reference: Path, tmp_path: Path) -> Path:
    shutil.copytree(reference, tmp_path / 'case')
    return tmp_path / 'case'


# ---------------------------------------------------------------------------------------------------------------
# Undecodable images: never replaced by a neighbour


# one case in loader workers: torch takes ~5 s a worker to shut a loader down after a worker raised
@pytest.mark.parametrize('how, workers', [('truncated', 0), ('garbage', 0), ('empty', 0), ('truncated', 2)])
def test_an_undecodable_validation_image_fails_the_evaluation_naming_it(real_jpeg_folder, tmp_path, how, workers):
    """timm's ImageDataset logs a warning and returns the next image instead: the evaluation scored the neighbour
    twice and counted it in `n`. A metric over other images than the split's is not the metric asked for."""
    root = shutil.copytree(real_jpeg_folder, tmp_path / 'data')
    bad = sorted((root / 'val' / 'cat').iterdir())[3]
    _break(bad, how)
    spec = DataSpec(dataset='imagefolder', root=str(root), num_classes=4, batch_size=8, workers=workers)
    bundle = create_loaders(spec, input_size=(3, 32, 32))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(ValueError) as info:
        evaluate(model, bundle.val_loader)
    message = str(info.value)
    assert type(info.value).__name__ == 'UnreadableImageError'
    assert str(bad) in message and 'cannot read the image' in message
    assert '\n' not in message and 'Traceback' not in message  # one line, also out of a loader worker


def test_an_undecodable_training_image_fails_the_epoch_naming_it(real_jpeg_folder, tmp_path):
    root = shutil.copytree(real_jpeg_folder, tmp_path / 'data')
    bad = sorted((root / 'train' / 'ship').iterdir())[0]
    _break(bad, 'truncated')
    bundle = create_loaders(
        DataSpec(dataset='imagefolder', root=str(root), num_classes=4, batch_size=8, workers=0), input_size=(3, 32, 32)
    )
    with pytest.raises(ValueError, match=f'{bad}: cannot read the image'):
        for _ in bundle.train_loader:
            pass


@pytest.mark.heavy
def test_a_build_with_an_undecodable_validation_image_exits_2_naming_it(real_jpeg_folder, tmp_path, capsys):
    """A prune-only build (no training: it reaches the evaluation in seconds) through the CLI."""
    folder = _case(
        tmp_path / 'case', real_jpeg_folder, parent__train__epochs=0, importance__method='magnitude', finetune__epochs=0
    )
    bad = sorted((folder / 'data' / 'val' / 'bird').iterdir())[5]
    _break(bad, 'garbage')
    code, _, err = _build(folder, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and str(Path('data') / 'val' / 'bird' / bad.name) in err, err
    assert not (folder / 'work' / 'eval.json').exists() and not (folder / 'out').exists()


# ---------------------------------------------------------------------------------------------------------------
# The data is part of each stage's provenance


def _file(folder: Path, rel: str) -> Path:
    """`split/class/#i`: the i-th image of the class folder (the CIFAR-10 names are not known in advance)."""
    path = folder / 'data' / rel
    return sorted(path.parent.iterdir())[int(path.name[1:])] if path.name.startswith('#') else path


def _replace(folder: Path, rel: str) -> None:
    """Another image's bytes in the place of `rel`."""
    path = _file(folder, rel)
    other = sorted(path.parent.iterdir())[-1]
    assert other != path
    path.write_bytes(other.read_bytes())


def _add(folder: Path, rel: str) -> None:
    path = _file(folder, rel)
    assert not path.exists()
    shutil.copyfile(sorted(path.parent.iterdir())[0], path)


def _remove(folder: Path, rel: str) -> None:
    _file(folder, rel).unlink()


def _touch(folder: Path, rel: str) -> None:
    path = _file(folder, rel)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


DATA_CHANGES = [
    # (change, file, stages redone, stages reused, what the log says, validation images counted)
    (
        _replace,
        'val/cat/#0',
        ('eval', 'export'),
        ('parent', 'pruned', 'finetune'),
        "eval: stale: the 'val' split changed: changed files in cat: running it",
        36,
    ),
    (
        _add,
        'val/ship/extra.jpg',
        ('eval', 'export'),
        ('parent', 'pruned', 'finetune'),
        "eval: stale: the 'val' split changed: 36 -> 37 files (+1 in ship): running it",
        37,
    ),
    (
        _remove,
        'val/bird/#1',
        ('eval', 'export'),
        ('parent', 'pruned', 'finetune'),
        "eval: stale: the 'val' split changed: 36 -> 35 files (-1 in bird)",
        35,
    ),
    # a touched file counts as changed: nothing short of reading every image could say it is not
    (
        _touch,
        'val/airplane/#3',
        ('eval', 'export'),
        ('parent', 'pruned', 'finetune'),
        "eval: stale: the 'val' split changed: changed files in airplane",
        36,
    ),
    (
        _replace,
        'train/ship/#8',
        STAGES,
        (),
        "parent: stale: the 'train' split changed: changed files in ship: running it",
        36,
    ),
]


@pytest.mark.parametrize(
    'change, rel, redone, reused, said, n',
    DATA_CHANGES,
    ids=['val-replaced', 'val-added', 'val-removed', 'val-touched', 'train-replaced'],
)
def test_changed_data_reruns_the_stages_that_read_it_saying_which_split(
    reference, tmp_path, capsys, change, rel, redone, reused, said, n
):
    folder = _copy(reference, tmp_path)
    change(folder, rel)
    code, log, err = _build(folder, capsys)
    assert code == 0, err
    assert said in log, log
    for stage in redone:
        assert f'build: {stage}: up to date' not in log, log
    for stage in reused:
        assert f'build: {stage}: up to date' in log, log
    assert json.loads((folder / 'work' / 'eval.json').read_text())['n'] == n


def test_unchanged_data_in_a_copied_folder_is_up_to_date(reference, tmp_path, capsys):
    """The control for the table above: a copy that keeps sizes and mtimes reuses every stage."""
    code, log, err = _build(_copy(reference, tmp_path), capsys)
    assert code == 0, err
    assert all(f'build: {stage}: up to date' in log for stage in STAGES), log


def test_fingerprints_name_what_changed_in_a_shard_set(real_jpeg_folder, tmp_path):
    """WebDataset shards: the shard index and each shard's size and mtime."""
    pytest.importorskip('webdataset')
    from kpid_zoo.core.datasource import describe_data_change, fingerprint
    from kpid_zoo.training.data import folder_samples
    from kpid_zoo.training.shards import write_shards
    from kpid_zoo.training.streams import split_shards

    samples, classes = folder_samples(real_jpeg_folder / 'val')
    write_shards(samples, tmp_path, 'val', shard_size=12, class_names=classes)

    def shards_fingerprint():
        shards, total = split_shards('wds/micro', str(tmp_path), 'val')
        return fingerprint(type('Stream', (), {'shards': shards, 'num_samples': total})(), 'val')

    before = shards_fingerprint()
    assert before['kind'] == 'shards' and before['files'] == 3 and 'unverified' not in before
    assert shards_fingerprint() == before
    write_shards(samples[::-1], tmp_path, 'val', shard_size=12, class_names=classes, seed=1)  # same names, new bytes
    after = shards_fingerprint()
    assert after['sha256'] != before['sha256']
    assert describe_data_change(before, after).startswith("the 'val' split changed: changed shards in val-000000.tar")


def test_a_stage_recorded_without_a_fingerprint_says_so():
    from kpid_zoo.core.datasource import describe_data_change

    new = {'kind': 'files', 'split': 'val', 'files': 3, 'parts': {}}
    assert (
        describe_data_change(None, new)
        == "the 'val' split was not recorded when the stage ran (an older kpid-zoo): it is now"
    )


# ---------------------------------------------------------------------------------------------------------------
# Schedules that cannot run are recipe errors, raised before any training

SCHEDULES = [
    (
        {'parent__train__grad_accum_steps': 7},
        'parent.train.grad_accum_steps: 7 batches per optimizer step, but an '
        'epoch holds 6 (96 training images in batches of 16 x 1 process): expected at most 6',
    ),
    (
        {'finetune__grad_accum_steps': 8},
        'finetune.grad_accum_steps: 8 batches per optimizer step, but an epoch holds 6',
    ),
    (
        {'finetune__epochs': 0.05},
        'finetune.epochs: 0.05 epochs of 6 optimizer steps round to 0 steps (96 training '
        'images in batches of 16 x 1 process): expected 0 (no training) or at least 0.167 (one step)',
    ),
    ({'parent__train__epochs': 0.01}, 'parent.train.epochs: 0.01 epochs of 6 optimizer steps round to 0 steps'),
    (
        {'importance__batches': 10},
        "importance.batches: 10 batches of 16 images, but the 'train' split holds 96 "
        'images (6 batches): expected at most 6',
    ),
    (
        {'data__batch_size': 128},
        'data.batch_size: an epoch holds no full batch (96 training images in batches of 128 x 1 process)',
    ),
]


@pytest.mark.parametrize(
    'changes, expected',
    SCHEDULES,
    ids=['parent-accum', 'finetune-accum', 'finetune-0-steps', 'parent-0-steps', 'importance-batches', 'no-full-batch'],
)
def test_a_schedule_the_data_cannot_run_is_a_recipe_error_before_any_work(
    real_jpeg_folder, tmp_path, capsys, changes, expected
):
    folder = _case(tmp_path / 'case', real_jpeg_folder, **changes)
    code, _, err = _build(folder, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f'kpid-zoo build: error: recipe.yaml: {expected}'), err
    assert not (folder / 'work' / 'stages').exists()  # no stage began
    assert not (folder / 'out').exists()


@pytest.mark.parametrize('field', ['epochs', 'warmup_epochs'])
@pytest.mark.parametrize('section', ['finetune', 'parent.train'])
def test_absurd_epochs_are_refused_when_the_recipe_is_read(tmp_path, section, field):
    recipe = copy.deepcopy(MICRO)
    (recipe['finetune'] if section == 'finetune' else recipe['parent']['train'])[field] = 1e12
    path = tmp_path / 'recipe.yaml'
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f'{path}: {section}.{field}: expected at most 100,000 epochs, got 1000000000000.0'


def test_a_schedule_past_a_billion_steps_is_refused():
    """Epochs within the recipe bound can still make an absurd run on a large split (ImageNet at batch 1)."""
    from kpid_zoo.training.train import MAX_TOTAL_STEPS, plan_schedule

    with pytest.raises(
        RecipeError,
        match=r'finetune\.epochs: 100000 epochs of 1281167 optimizer steps are '
        r'1\.28e\+11 steps: expected at most 1e\+09 steps',
    ):
        plan_schedule(FinetuneSpec(epochs=100_000), 1_281_167, 'finetune')
    assert plan_schedule(FinetuneSpec(epochs=1000), MAX_TOTAL_STEPS // 1000, 'finetune').total_steps == MAX_TOTAL_STEPS


def test_taylor_importance_refuses_a_loader_shorter_than_asked():
    from engine_utils import INPUT, random_model

    from kpid_zoo.engine.groups import discover_groups
    from kpid_zoo.engine.importance import taylor_importance

    model = random_model('resnet18')
    batches = [(torch.randn(2, *INPUT, dtype=torch.float64), torch.randint(0, 1000, (2,))) for _ in range(2)]
    with pytest.raises(ValueError, match='importance.batches: 3 batches asked, but the data loader held 2'):
        taylor_importance(model, discover_groups(model, INPUT), batches, num_batches=3, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# The card says what ran


def test_finetune_epochs_0_is_a_prune_only_build_whose_card_says_not_fine_tuned(real_jpeg_folder, tmp_path, capsys):
    folder = _case(
        tmp_path / 'case', real_jpeg_folder, parent__train__epochs=0, importance__method='magnitude', finetune__epochs=0
    )
    code, log, err = _build(folder, capsys)
    assert code == 0, err
    assert 'finetune: finetune.epochs is 0: skipped' in log
    assert not (folder / 'work' / 'finetune').exists()
    card = (folder / 'out' / 'README.md').read_text()
    assert 'It is **not fine-tuned** (`finetune.epochs: 0`)' in card
    assert '| Fine-tune | none: not fine-tuned (`finetune.epochs: 0`) |' in card
    assert 'fine-tuned with' not in card and 'fine-tuned for' not in card
    metrics = json.loads((folder / 'out' / 'config.json').read_text())['kpid']['metrics']
    assert metrics['finetune_steps'] == 0 and metrics['n'] == 36
    # the pruned weights are what was exported and scored
    from safetensors.torch import load_file

    exported, pruned = (
        load_file(str(p))
        for p in (folder / 'out' / 'model.safetensors', folder / 'work' / 'pruned' / 'model.safetensors')
    )
    assert exported.keys() == pruned.keys() and all(torch.equal(exported[k], pruned[k]) for k in exported)


def test_the_card_of_a_fine_tuned_build_states_the_steps_that_ran(reference):
    card = (reference / 'out' / 'README.md').read_text()
    assert 'It was then fine-tuned for 3 optimizer steps (0.5 epochs) with inner distillation from its parent.' in card
    assert '| Fine-tune | 3 optimizer steps (0.5 epochs), inner distillation from its parent |' in card
    training = json.loads((reference / 'work' / 'finetune' / 'training.json').read_text())
    assert training == {
        'steps': 3,
        'epochs': 0.5,
        'steps_per_epoch': 6,
        'batches_per_epoch': 6,
        'grad_accum_steps': 1,
        'batch_size': 16,
        'processes': 1,
    }
