"""Hostile and mistaken input to the command line: each is a user error -- one line on stderr, exit code 2, no
traceback, nothing of a file's content -- found before any slow work; and what the real run does, the dry run
does too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import registered_models  # noqa: F401  (registers the hostile_* parents in timm)
import yaml

from kpid_zoo.cli import main

SECRET = 'hf_SECRETTOKEN123'

RECIPE = {
    'name': 'hostile_resnet18',
    'parent': {'model': 'resnet18', 'weights': 'none', 'num_classes': 10},
    'input_size': [3, 64, 64],
    'flops': {'target_ratio': 0.5},
    'importance': {'method': 'magnitude'},
    'data': {'dataset': 'imagefolder', 'root': 'unused-by-magnitude-importance', 'num_classes': 10},
}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusals exit from inside main
        return e.code if isinstance(e.code, int) else 1


def _one_line_user_error(capsys, argv: list[str], *expected: str) -> str:
    rc = _run(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, captured.err[-2000:]
    assert len(lines) == 1, captured.err[-2000:]
    assert 'Traceback' not in captured.err + captured.out
    for word in expected:
        assert word in lines[0], lines[0]
    return lines[0]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- files given as a recipe ----------------------------------------------------------------------------------------


def _nested_lists(tmp_path: Path) -> Path:
    return _write(tmp_path, 'nested.yaml', 'name: ' + '[' * 10_000 + ']' * 10_000 + '\n')


def _nested_mappings(tmp_path: Path) -> Path:
    return _write(tmp_path, 'nested.yaml', 'a:\n' + ''.join('  ' * i + f'k{i}:\n' for i in range(1, 3000)))


def _nested_through_aliases(tmp_path: Path) -> Path:
    """Each anchor 20 deep and holding the one before: 100 levels once expanded, in a few hundred bytes."""
    lines = ['a: &a ' + '[' * 20 + ']' * 20]
    for i, prev in enumerate(['a', 'b1', 'b2', 'b3', 'b4'], start=1):
        lines.append(f'b{i}: &b{i} ' + '[' * 20 + f'*{prev}' + ']' * 20)
    return _write(tmp_path, 'nested.yaml', '\n'.join(lines) + '\n')


@pytest.mark.parametrize(
    'make, expected',
    [
        (_nested_lists, 'nested more than 32 levels deep'),
        (_nested_mappings, 'nested more than 32 levels deep'),
        (_nested_through_aliases, 'aliases nest the document more than 32 levels deep'),
    ],
    ids=['lists-10000-deep', 'mappings-3000-deep', 'aliases'],
)
def test_deeply_nested_yaml_is_a_recipe_error(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    _one_line_user_error(
        capsys,
        ['build', str(path), '--work', str(tmp_path / 'w'), '--out', str(tmp_path / 'o')],
        f'{path}: line ',
        'invalid YAML',
        expected,
    )
    assert not (tmp_path / 'w').exists()


def test_deeply_nested_json_is_a_value_error_naming_the_file(tmp_path):
    """The stage manifests, reports and eval results a build reads back go through read_json: a ValueError (a
    stage redone, or one line) rather than a RecursionError."""
    from kpid_zoo.core.files import read_json

    path = _write(tmp_path, 'report.json', '[' * 100_000 + ']' * 100_000)
    with pytest.raises(ValueError, match=f'{path}: not valid JSON'):
        read_json(path)


@pytest.mark.parametrize(
    'name, text, expected',
    [
        ('token', SECRET + '\n', 'the file holds one string of 17 characters'),
        (
            'id_ed25519',
            f'-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET}\n{SECRET}\n-----END OPENSSH PRIVATE KEY-----\n',
            'the file holds one string of',
        ),
        ('.env', f'HF_TOKEN={SECRET}\nOTHER=1\n', 'the file holds one string of'),
        ('list.yaml', f'- {SECRET}\n', 'the file holds a list of 1 item'),
        ('credentials.json', json.dumps({SECRET: {'token': SECRET}}), 'its one top-level key is not a recipe field'),
        ('config.yaml', f'user: me\ntoken: {SECRET}\n', 'none of its 2 top-level keys is a recipe field'),
    ],
)
def test_a_file_that_is_no_recipe_is_described_never_quoted(tmp_path, capsys, name, text, expected):
    path = _write(tmp_path, name, text)
    line = _one_line_user_error(capsys, ['build', str(path)], str(path), 'expected a mapping', expected)
    assert SECRET not in line and 'hf_' not in line


# --- flops / groups and the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'argv, expected',
    [
        (['flops', 'resnet18', '--input-size', '0'], '--input-size: expected H and W from 1 to 2048 px, got 0'),
        (['flops', 'resnet18', '--input-size', '-1'], 'got -1'),
        (['flops', 'resnet18', '--input-size', '100000'], 'got 100000'),
        (
            ['flops', 'resnet18', '--input-size', '3 32'],
            "expected SIZE or C H W in whole numbers, e.g. 224 or 3 224 224, got 2 numbers ('3 32')",
        ),
        (['flops', 'resnet18', '--input-size', '3', '32'], "got 2 numbers ('3 32')"),
        (['flops', 'resnet18', '--input-size', '3', '32', 'px'], "got '3 32 px'"),
        (['flops', 'resnet18', '--input-size', '3', '0', '32'], 'got 0'),
        (['flops', 'resnet18', '--input-size', '1', '64', '64'], 'resnet18 takes 3-channel images, got C = 1'),
        (
            ['flops', 'vit_tiny_patch16_224', '--input-size', '64'],
            'vit_tiny_patch16_224 does not run on a 3x64x64 image: Input height (64)',
        ),
        (['flops', 'resnt50'], "'resnt50' is not a timm model nor a kpid-zoo name (did you mean resnet50"),
        (['flops', 'no_such_network_at_all'], "'no_such_network_at_all' is not a timm model"),
        (['groups', 'resnet18', '--input-size', '0'], '--input-size: expected H and W from 1 to 2048 px, got 0'),
        (
            ['groups', 'inception_v3', '--input-size', '16'],
            'inception_v3 does not run on a 3x16x16 image: Calculated padded input size',
        ),
        (['groups', 'resnt18'], "'resnt18' is not a timm model nor a kpid-zoo name (did you mean resnet18"),
        # argparse's own refusals: one line too, the usage a --help away
        (['flops'], 'the following arguments are required: model (see kpid-zoo flops --help)'),
        (['flops', 'resnet18', '--per-layer', '-2'], "argument --per-layer: expected a whole number >= 0, got '-2'"),
        (
            ['build', 'recipe.yaml', '--dry-run', '--plan-processes', '0'],
            "argument --plan-processes: expected a whole number >= 1, got '0'",
        ),
    ],
    ids=lambda v: ' '.join(v) if isinstance(v, list) else '',
)
def test_flops_and_groups_usage_errors(capsys, argv, expected):
    _one_line_user_error(capsys, argv, f'kpid-zoo {argv[0]}: error: ', expected)


@pytest.mark.parametrize('size', [['64'], ['3', '64', '64'], ['3,64,64'], ['3x64x64']])
def test_input_size_forms_in_the_help_all_count_the_same(capsys, size):
    import timm

    from kpid_zoo.engine.flops import count_flops

    gmacs = count_flops(timm.create_model('resnet18'), (3, 64, 64)).gmacs
    assert main(['flops', 'resnet18', '--input-size', *size]) == 0
    assert capsys.readouterr().out == f'resnet18 at 3x64x64: {gmacs:.4f} GMACs, 11.690M params\n'


@pytest.mark.launch
def test_input_size_error_is_one_line_from_the_entry_point_too(tmp_path, repo_root):
    proc = subprocess.run(
        [sys.executable, '-m', 'kpid_zoo.cli', 'flops', 'resnet18', '--input-size', '3 32'],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, 'PYTHONPATH': str(repo_root), 'OMP_NUM_THREADS': '1'},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        (
            'kpid-zoo flops: error: --input-size: expected SIZE or C H W in whole numbers, e.g. 224 or 3 224 224, '
            "got 2 numbers ('3 32')"
        )
    ]


# --- the build lock -------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_may_be_made(monkeypatch):
    """Fails the command (an internal error, exit 1) if any timm model is made: the parent, or the preflight's."""
    import timm

    made = []

    def refuse(name, *args, **kwargs):
        made.append(name)
        raise AssertionError(f'timm.create_model({name!r}) ran before the lock was checked')

    monkeypatch.setattr(timm, 'create_model', refuse)
    return made


@pytest.mark.parametrize('command', ['build', 'prune'])
def test_a_locked_folder_is_refused_before_any_model_is_made(tmp_path, capsys, no_model_may_be_made, command):
    recipe = _write(tmp_path, 'recipe.yaml', yaml.safe_dump(RECIPE))
    work = tmp_path / 'work'
    work.mkdir()
    (work / 'build.lock').write_text(
        json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': '2026-01-01T00:00:00+00:00'})
    )
    argv = (
        ['build', str(recipe), '--work', str(work), '--out', str(tmp_path / 'out')]
        if command == 'build'
        else ['prune', str(recipe), '--out', str(work / 'pruned')]
    )
    _one_line_user_error(capsys, argv, f'{work} is being built by process {os.getpid()}')
    assert no_model_may_be_made == []
    assert sorted(p.name for p in work.iterdir()) == ['build.lock']


def test_the_lock_appears_with_its_holder_so_the_other_ranks_never_see_an_empty_one(tmp_path, monkeypatch):
    """Under `accelerate launch` every rank checks the work folder (read-only) while the main process takes the
    lock. A lock file that existed empty for a moment read as a file the build did not write, and the launch failed
    now and then; the lock now comes into being with its content, so the check right after it appears accepts it."""
    from kpid_zoo import _workdir
    from kpid_zoo.core import lock
    from kpid_zoo.core.ownership import check_work

    work = tmp_path / 'work'
    seen = []
    real_link = os.link

    def link_then_check(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        seen.append((json.loads(Path(dst).read_text())['pid'], check_work(work, _workdir.BUILD_ENTRIES)))

    monkeypatch.setattr(lock.os, 'link', link_then_check)
    path = lock.acquire(work)
    assert seen == [(os.getpid(), set())]
    assert sorted(p.name for p in work.iterdir()) == ['build.lock']  # the staging file is gone
    lock.release(path)
    assert not path.exists()


def test_checks_under_the_lock_leave_no_empty_folders_behind(tmp_path, capsys):
    """The preflight now runs under the lock, which makes the work and export folders' parents: a refused recipe
    removes what it made, as it did when the preflight came first."""
    recipe = _write(tmp_path, 'recipe.yaml', yaml.safe_dump({**RECIPE, 'flops': {'target_gmacs': 50.0}}))
    work, out = tmp_path / 'runs' / 'hostile', tmp_path / 'outputs' / 'hostile'
    _one_line_user_error(
        capsys, ['build', str(recipe), '--work', str(work), '--out', str(out)], str(recipe), "is not below the parent's"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ['recipe.yaml']


# --- the parent: any timm model the engine can prune -----------------------------------------------------------------


@pytest.fixture
def no_parent_may_be_made(monkeypatch):
    """Fails the command (exit 1) if the parent is made: the preflight's refusal must come before it."""
    import kpid_zoo.build
    import kpid_zoo.training.parent

    def refuse(recipe, *args, **kwargs):
        raise AssertionError(f'the parent {recipe.parent.model} was made before the preflight refused it')

    monkeypatch.setattr(kpid_zoo.build, 'create_parent', refuse)
    monkeypatch.setattr(kpid_zoo.training.parent, 'create_parent', refuse)


@pytest.mark.parametrize('command', ['build', 'dry-run', 'prune'])
@pytest.mark.parametrize(
    'parent, sections, expected',
    [
        (  # a layer no handler follows: the engine's reason, the layer and the op
            'hostile_fftnet',
            {},
            'hostile_fftnet: no prunable channel group was found (fft_fft2: call_function fft_fft2 is not understood',
        ),
        (  # only inexact groups (an ECA gate; a LayerNorm over the channels): the field that opts in
            'hostile_ecanet',
            {},
            'hostile_ecanet: every prunable channel group is inexact (eca: EcaModule mixes neighbouring channels): '
            'set importance.allow_inexact: true to prune it',
        ),
        (  # exact groups too narrow for the target, inexact ones that reach it: the same field
            'hostile_ecanet_stem',
            {'flops': {'target_ratio': 0.25}},
            'GMACs (every group at 8 channels) with exact groups only; set importance.allow_inexact: true to also '
            'prune its 1 inexact groups, which reach it',
        ),
        (  # a timm name that is no model: the closest names, as the recipe check always said
            'convnxt_atto',
            {},
            "parent.model: 'convnxt_atto' is not a timm model (did you mean 'convnext_atto'?)",
        ),
    ],
)
def test_a_parent_the_engine_cannot_prune_is_refused_before_it_is_made(
    tmp_path, capsys, no_parent_may_be_made, command, parent, sections, expected
):
    recipe = _write(
        tmp_path,
        'recipe.yaml',
        yaml.safe_dump({**RECIPE, **sections, 'parent': {**RECIPE['parent'], 'model': parent}}),
    )
    work = tmp_path / 'runs' / 'hostile'
    argv = {
        'build': ['build', str(recipe), '--work', str(work), '--out', str(tmp_path / 'outputs' / 'hostile')],
        'dry-run': ['build', str(recipe), '--dry-run', '--work', str(work), '--out', str(tmp_path / 'dry')],
        'prune': ['prune', str(recipe), '--out', str(work / 'pruned')],
    }[command]
    # the user's recipe is named (a dry run's stand-in recipe is not), and nothing is left behind: no stand-in data
    _one_line_user_error(capsys, argv, f'{recipe}: ', expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['recipe.yaml']


@pytest.mark.parametrize('dry_run', [False, True])
def test_a_fine_tune_without_distillation_points_is_refused_before_the_parent_is_made(
    tmp_path, capsys, no_parent_may_be_made, dry_run
):
    """The engine prunes it, but no timm feature_info (nor a known layout) names points to distil it at: a build
    that would fine-tune with inner distillation is refused at once, not after the pruning."""
    data = {
        **RECIPE,
        'parent': {**RECIPE['parent'], 'model': 'hostile_ecanet'},
        'importance': {'method': 'magnitude', 'allow_inexact': True},
        'finetune': {'epochs': 1, 'kd_gamma': 1.0},
    }
    recipe = _write(tmp_path, 'recipe.yaml', yaml.safe_dump(data))
    argv = ['build', str(recipe), '--work', str(tmp_path / 'runs' / 'w'), '--out', str(tmp_path / 'outputs' / 'o')]
    _one_line_user_error(
        capsys,
        argv + ['--dry-run'] * dry_run,
        f'{recipe}: finetune.kd_gamma: cannot find inner-distillation points in EcaNet: it has no timm feature_info',
        'finetune.kd_gamma: 0 fine-tunes without inner distillation',
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ['recipe.yaml']


@pytest.mark.parametrize(
    'parent, importance',
    [
        ('regnety_002', {}),  # outside the families recipes once took; the engine prunes it exactly
        ('hostile_ecanet', {'allow_inexact': True}),  # inexact groups, opted in
    ],
)
def test_any_timm_parent_the_engine_prunes_is_a_recipe_parent(tmp_path, capsys, parent, importance):
    recipe = _write(
        tmp_path,
        'recipe.yaml',
        yaml.safe_dump(
            {
                **RECIPE,
                'parent': {**RECIPE['parent'], 'model': parent},
                'importance': {**RECIPE['importance'], **importance},
            }
        ),
    )
    out = tmp_path / 'work' / 'pruned'
    assert _run(['prune', str(recipe), '--out', str(out), '--quiet']) == 0, capsys.readouterr().err[-2000:]
    report = json.loads((out / 'report.json').read_text())
    assert report['parent'] == parent
    assert 0.99 * report['target_gmacs'] <= report['achieved_gmacs'] <= report['target_gmacs']


# --- the dry run ----------------------------------------------------------------------------------------------------


def _resnet_at_32px(batch_size: int = 64) -> dict:
    return {
        **RECIPE,
        'name': 'hostile_resnet18_32px',
        'input_size': [3, 32, 32],
        'data': {'dataset': 'cifar10', 'batch_size': batch_size, 'workers': 0},
        'parent': {**RECIPE['parent'], 'train': {'epochs': 1}},
        'finetune': {'epochs': 1},
    }


@pytest.mark.parametrize(
    'model, size, batch_size, expected',
    [
        ('resnet18', 32, 64, 2),  # layer4 is 1x1 at 32 px: one image is one value per channel
        ('resnet18', 32, 1, 1),  # the real run's batch of 1 fails; so must the dry run
        ('resnet18', 64, 64, 1),  # 2x2 at 64 px
        ('efficientnet_b0', 224, 128, 1),
    ],
)
def test_the_dry_runs_batch_gives_every_batchnorm_more_than_one_value(model, size, batch_size, expected):
    from kpid_zoo.core.recipe import Recipe
    from kpid_zoo.dry_run import standin_batch

    recipe = Recipe.from_dict(
        {
            **_resnet_at_32px(batch_size),
            'input_size': [3, size, size],
            'parent': {'model': model, 'weights': 'none', 'num_classes': 10},
        }
    )
    assert standin_batch(recipe) == expected


def test_dry_run_of_a_32px_resnet_recipe_passes(tmp_path, capsys, monkeypatch):
    """Its real build trains at batch 64; the dry run's batch of one left layer4's BatchNorms one value each."""
    monkeypatch.chdir(tmp_path)
    recipe = _write(tmp_path, 'recipe.yaml', yaml.safe_dump(_resnet_at_32px()))
    rc = main(['build', str(recipe), '--dry-run', '--work', 'work', '--out', 'out', '--quiet'])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert f'dry run passed: every stage of {recipe} ran on stand-in data' in captured.out
    assert yaml.safe_load((tmp_path / 'work' / 'standin' / 'recipe.yaml').read_text())['data']['batch_size'] == 2
    assert sorted(p.name for p in (tmp_path / 'work' / 'finetune' / 'checkpoints').iterdir()) == ['step_2', 'step_3']


@pytest.mark.heavy
def test_dry_run_of_a_regnet_recipe_passes(tmp_path, capsys, monkeypatch):
    """A parent outside the families recipes once took, end to end: preflight, prune, a fine-tune distilled at its
    feature_info stages, evaluation, export."""
    monkeypatch.chdir(tmp_path)
    data = {**_resnet_at_32px(), 'name': 'hostile_regnety_002'}
    data['parent'] = {**data['parent'], 'model': 'regnety_002', 'train': {'epochs': 0}}
    recipe = _write(tmp_path, 'recipe.yaml', yaml.safe_dump(data))
    rc = main(['build', str(recipe), '--dry-run', '--work', 'work', '--out', 'out', '--quiet'])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert f'dry run passed: every stage of {recipe} ran on stand-in data' in captured.out
    assert json.loads((tmp_path / 'work' / 'pruned' / 'report.json').read_text())['parent'] == 'regnety_002'
    assert sorted(p.name for p in (tmp_path / 'work' / 'finetune' / 'checkpoints').iterdir()) == ['step_2', 'step_3']
