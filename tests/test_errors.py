"""Every failure a user can cause is one line on stderr naming the file, field or repo, exit code 2, no traceback
(unless --debug), and it comes before any expensive work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from export_utils import export_pruned, pruned_spec, tiny_recipe
from safetensors.torch import save_file

from kpid_zoo.cli import main

BASE = {
    'name': 'err_resnet18',
    'parent': {'model': 'resnet18', 'weights': 'none', 'num_classes': 10},
    'input_size': [3, 32, 32],
    'flops': {'target_ratio': 0.5},
    'importance': {'method': 'magnitude'},
    'data': {'dataset': 'imagefolder', 'root': 'unused-by-magnitude-importance', 'num_classes': 10},
}


def _recipe(tmp_path: Path, text: str | None = None, **sections) -> Path:
    path = tmp_path / 'recipe.yaml'
    if text is None:
        data = {**BASE}
        for name, value in sections.items():
            data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
        text = yaml.safe_dump(data)
    path.write_text(text)
    return path


def _fails_in_one_line(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert 'Traceback' not in captured.err + captured.out
    for word in expected:
        assert word in err, err
    return err


def _build(recipe: Path, tmp_path: Path) -> list[str]:
    return ['build', str(recipe), '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'work'), '--quiet']


def test_publish_errors_are_one_line(tmp_path, capsys):
    _fails_in_one_line(
        capsys, ['publish', str(tmp_path / 'nope'), '--repo-id', 'org/name'], str(tmp_path / 'nope'), 'not a folder'
    )
    (tmp_path / 'half').mkdir()
    _fails_in_one_line(capsys, ['publish', str(tmp_path / 'half'), '--repo-id', 'org/name'], 'missing')


def test_garbage_export_config_names_the_file(tmp_path, capsys):
    _, folder = export_pruned(
        tmp_path / 'exp', pruned_spec('resnet10t', 0.5), tiny_recipe(), name='kpid_tiny_test', num_classes=10
    )
    (folder / 'config.json').write_text('{"architecture": "kpid_pruned", ')
    _fails_in_one_line(
        capsys, ['publish', str(folder), '--repo-id', 'org/name'], str(folder / 'config.json'), 'not valid JSON'
    )


def test_unreachable_hub_is_one_line_naming_the_endpoint(hf_env, tmp_path, capsys):
    _, folder = export_pruned(
        tmp_path / 'exp', pruned_spec('resnet10t', 0.5), tiny_recipe(), name='kpid_tiny_test', num_classes=10
    )
    _fails_in_one_line(
        capsys, ['publish', str(folder), '--repo-id', 'org/name'], 'cannot reach http://127.0.0.1:9', 'org/name'
    )


def test_truncated_parent_checkpoint_names_the_file(tmp_path, capsys):
    path = tmp_path / 'parent.safetensors'
    save_file({'w': torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    recipe = _recipe(tmp_path, parent={'weights': str(path)})
    _fails_in_one_line(capsys, _build(recipe, tmp_path), str(path), 'not a readable checkpoint')


def test_empty_image_folder_names_the_folder(tmp_path, capsys):
    for split in ('train', 'val'):
        (tmp_path / 'imgs' / split / 'cat').mkdir(parents=True)
    recipe = _recipe(tmp_path, importance={'method': 'taylor'}, data={'root': str(tmp_path / 'imgs')})
    _fails_in_one_line(capsys, _build(recipe, tmp_path), str(tmp_path / 'imgs' / 'train'), 'no images')


def test_missing_explicit_cifar10_root_is_an_error_even_with_a_cache(tmp_path, capsys, monkeypatch):
    cache = tmp_path / 'cache'
    for split in ('train', 'test'):
        (cache / 'cifar10-jpg' / split / 'cat').mkdir(parents=True)  # an unpacked copy is already cached
    monkeypatch.setenv('KPID_CACHE', str(cache))
    recipe = _recipe(
        tmp_path, importance={'method': 'taylor'}, data={'dataset': 'cifar10', 'root': str(tmp_path / 'typo.tar.gz')}
    )
    _fails_in_one_line(capsys, _build(recipe, tmp_path), 'data.root', str(tmp_path / 'typo.tar.gz'), 'does not exist')


@pytest.mark.parametrize(
    'sections, expected',
    [
        ({'finetune': {'epochs': float('inf')}}, 'finetune.epochs: expected a finite non-negative number, got inf'),
        ({'finetune': {'warmup_epochs': float('inf')}}, 'finetune.warmup_epochs: expected a finite number, got inf'),
        (
            {'parent': {'model': 'vit_smal_patch16_224'}},
            "parent.model: 'vit_smal_patch16_224' is not a timm model (did you mean 'vit_small_patch16_224'?)",
        ),
        ({'input_size': [3, 50000, 50000]}, 'input_size: expected [3, H, W] (RGB) with H and W from 16 to 2048'),
        ({'input_size': [1, 32, 32]}, 'input_size: expected [3, H, W]'),
    ],
)
def test_recipe_bounds_fail_before_any_work(tmp_path, capsys, sections, expected):
    recipe = _recipe(tmp_path, **sections)
    _fails_in_one_line(capsys, _build(recipe, tmp_path), str(recipe), expected)
    assert not (tmp_path / 'work').exists()


def test_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip('abcdefgh', 'bcdefghi'):
        lines.append(f'{name}: &{name} [' + ','.join([f'*{prev}'] * 9) + ']')
    bomb = _recipe(tmp_path, '\n'.join(lines) + '\nname: *i\n')
    assert len(bomb.read_bytes()) < 400
    start = time.monotonic()
    err = _fails_in_one_line(capsys, _build(bomb, tmp_path), str(bomb), 'aliases')
    assert len(err) < 300 and time.monotonic() - start < 10

    # fewer aliases, each expanding further: bounded by the expanded size
    lines = ['a: &a [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]']
    for prev, name in zip('abcdef', 'bcdefg'):
        lines.append(f'{name}: &{name} [' + ','.join([f'*{prev}'] * 8) + ']')
    _fails_in_one_line(capsys, _build(_recipe(tmp_path, '\n'.join(lines) + '\n'), tmp_path), 'expand to more than')


@pytest.mark.parametrize('kind', ['folder', 'binary'])
def test_recipe_path_that_is_no_recipe(tmp_path, capsys, kind):
    path = tmp_path / 'thing'
    if kind == 'folder':
        path.mkdir()
        expected = 'is a folder'
    else:
        path.write_bytes(bytes(range(256)) * 4)
        expected = 'not a text file'
    _fails_in_one_line(capsys, _build(path, tmp_path), str(path), expected)


def test_debug_shows_the_traceback(tmp_path):
    recipe = _recipe(tmp_path, finetune={'epochs': float('inf')})
    with pytest.raises(ValueError, match='finite'):
        main(['--debug'] + _build(recipe, tmp_path))


@pytest.mark.launch
def test_the_cli_says_so_in_one_line_as_a_subprocess(tmp_path, repo_root):
    """The entry point itself: one stderr line, exit 2, no warnings or tracebacks around it."""
    import os
    import subprocess
    import sys

    recipe = _recipe(tmp_path, parent={'model': 'vit_smal_patch16_224'})
    proc = subprocess.run(
        [sys.executable, '-m', 'kpid_zoo.cli', 'build', str(recipe)],
        capture_output=True,
        text=True,
        env={**os.environ, 'PYTHONPATH': str(repo_root)},
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"kpid-zoo build: error: {recipe}: parent.model: 'vit_smal_patch16_224' is not a timm model "
        f"(did you mean 'vit_small_patch16_224'?)"
    ], proc.stderr


def test_zoo_record_refuses_weights_its_config_does_not_describe(tmp_path):
    from kpid_zoo.zoo.export import write_zoo_entry

    _, folder = export_pruned(
        tmp_path / 'exp', pruned_spec('resnet10t', 0.5), tiny_recipe(), name='kpid_tiny_test', num_classes=10
    )
    weights = folder / 'model.safetensors'
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f'{weights} does not match the sha256'):
        write_zoo_entry(folder, zoo_dir=tmp_path / 'zoo')
    assert not (tmp_path / 'zoo').exists()


@pytest.mark.parametrize('bug', [ValueError('boom'), KeyError('boom')])
def test_an_internal_bug_exits_1_in_one_line_naming_the_traceback_file(bug, tmp_path, monkeypatch, capsys):
    import kpid_zoo.zoo.records as records
    from kpid_zoo.core.files import CACHE_ENV

    def broken():
        raise bug

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))
    monkeypatch.setattr(records, 'zoo_table', broken)
    assert main(['zoo']) == 1  # a ValueError from kpid-zoo's own code is a bug, not the user's input
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert err.startswith(f'kpid-zoo zoo: internal error: {type(bug).__name__}: '), err
    logs = list((tmp_path / 'cache' / 'logs').iterdir())
    assert len(logs) == 1 and f'traceback written to {logs[0]};' in err and '--debug prints it' in err, err
    text = logs[0].read_text()
    assert text.startswith('Traceback (most recent call last):') and 'in broken' in text and 'boom' in text


def test_a_user_error_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    import kpid_zoo.zoo.records as records
    from kpid_zoo.core.files import CACHE_ENV
    from kpid_zoo.errors import UserError

    def wrong():
        raise UserError('zoo: expected this, got that')

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))
    monkeypatch.setattr(records, 'zoo_table', wrong)
    assert _fails_in_one_line(capsys, ['zoo']) == 'kpid-zoo zoo: error: zoo: expected this, got that'
    assert not (tmp_path / 'cache').exists()  # no traceback file for a user's error


def test_every_error_class_is_in_the_hierarchy():
    import kpid_zoo.errors as errors

    classes = [getattr(errors, name) for name in errors.__all__]
    assert all(issubclass(c, errors.KpidError) for c in classes)
    # every class kpid-zoo raises on purpose today is the user's to fix, and still a ValueError for old callers
    assert all(issubclass(c, (errors.UserError, ValueError)) for c in classes if c is not errors.KpidError)
    assert all(issubclass(c, errors.UserError) for c in classes if c not in (errors.KpidError, errors.UserError))
    from kpid_zoo.core.lock import LockedError
    from kpid_zoo.core.recipe import RecipeError
    from kpid_zoo.zoo.publish import PublishError
    from kpid_zoo.zoo.registry import KpidHubError

    assert (LockedError, RecipeError, PublishError, KpidHubError) == (
        errors.LockedError,
        errors.RecipeError,
        errors.PublishError,
        errors.KpidHubError,
    )
    assert issubclass(LockedError, RuntimeError) and issubclass(KpidHubError, OSError)  # the old bases are kept


def test_the_errors_module_imports_only_the_standard_library():
    import ast
    import sys

    import kpid_zoo.errors as errors

    tree = ast.parse(Path(errors.__file__).read_text())
    imported = {
        alias.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split('.')[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    assert all(name in sys.stdlib_module_names or name == '__future__' for name in imported), imported
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))  # nothing of ours
