"""Hostile folders: the user's files are sacred (docs/reliability.md).

A table, one row per way a command was found to delete, replace or upload what kpid-zoo did not write (issue 22,
items 1 and 2). Each row sets the situation up under a folder of its own, runs the command line in-process, and
checks that the command refused in one line naming the path (exit 2, no traceback), before any slow work (the
build's first slow step, `preflight`, which creates a model, is replaced by a tripwire), that nothing reached the
Hub, and that every file, link and folder there is byte for byte what it was. Add a row for every new defect.
The tests after the table check the other side: what kpid-zoo did write is still replaced, cleared and uploaded.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from export_utils import TOKEN, export_pruned, pruned_spec, tiny_recipe
from hub_server import HubServer

from kpid_zoo.cli import main
from kpid_zoo.core.files import replace_dir

NAME = 'kpid_hostile'
REPO = f'kpid-test/{NAME}'
RECIPE = {
    'name': NAME,
    'parent': {'model': 'resnet18', 'weights': 'none', 'num_classes': 10},
    'input_size': [3, 32, 32],
    'flops': {'target_ratio': 0.5, 'tolerance': 0.05},
    'importance': {'method': 'magnitude'},
    'data': {'dataset': 'imagefolder', 'root': 'unused-by-magnitude-importance', 'num_classes': 10},
}


class ReachedSlowWork(Exception):
    """Raised where the build's slow work starts: a refusal must come before it."""


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything below `root`, without following links: file bytes, link targets, folders, special files."""
    seen: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                seen[rel] = ('link', os.readlink(path))
            elif stat.S_ISREG(mode):
                seen[rel] = ('file', path.read_bytes())
            elif stat.S_ISDIR(mode):
                seen[rel] = ('dir',)
            else:
                seen[rel] = ('special', stat.S_IFMT(mode))
    return seen


@dataclass
class Ctx:
    root: Path  # everything a row sets up lies below it, and must be unchanged afterwards
    recipe: Path  # RECIPE, outside root
    export: Path  # a real export of NAME (to copy; outside root)

    def user_folder(self, name: str = 'u') -> Path:
        folder = self.root / name
        folder.mkdir(parents=True)
        (folder / 'notes.txt').write_text('my notes, not a build output\n')
        return folder

    def copy_export(self, name: str = 'out') -> Path:
        return Path(shutil.copytree(self.export, self.root / name, symlinks=True))

    def build(self, out: Path | str, work: Path | str, *extra: str) -> list[str]:
        return ['build', str(self.recipe), '--out', str(out), '--work', str(work), '--quiet', *extra]

    def prune(self, out: Path | str, *extra: str) -> list[str]:
        return ['prune', str(self.recipe), '--out', str(out), '--quiet', *extra]

    def publish(self, folder: Path) -> list[str]:
        return ['publish', str(folder), '--repo-id', REPO]


# Each row: (id, setup) where setup(ctx) -> (argv, the path the one-line refusal must name, and a phrase of it).
Row = tuple[str, Callable[[Ctx], tuple[list[str], Path | str, str]]]


def _out_user_file(c: Ctx):
    u = c.user_folder()
    return c.build(u, c.root / 'w'), u / 'notes.txt', 'kpid-zoo did not write'


def _out_user_readme_and_config(c: Ctx):
    u = c.root / 'project'
    u.mkdir()
    (u / 'README.md').write_text('# my project\n')
    (u / 'config.json').write_text('{"mine": true}\n')
    return c.build(u, c.root / 'w'), u / 'config.json', 'not a config.json kpid-zoo exported'


def _out_other_entrys_export(c: Ctx):
    out = c.copy_export()
    config = json.loads((out / 'config.json').read_text())
    config['kpid']['name'] = 'kpid_other'
    (out / 'config.json').write_text(json.dumps(config))
    return c.build(out, c.root / 'w'), out, "holds the export of 'kpid_other'"


def _out_export_plus_user_file(c: Ctx):
    out = c.copy_export()
    (out / 'notes.md').write_text('my notes\n')
    return c.build(out, c.root / 'w'), out / 'notes.md', 'kpid-zoo did not write'


def _out_export_with_edited_card(c: Ctx):
    out = c.copy_export()
    with open(out / 'README.md', 'a') as f:
        f.write('\nMy own notes on this model.\n')
    return c.build(out, c.root / 'w'), out / 'README.md', 'not the bytes kpid-zoo wrote'


def _out_export_with_subfolder(c: Ctx):
    out = c.copy_export()
    (out / 'extra').mkdir()
    (out / 'extra' / 'data.bin').write_bytes(b'\x00' * 10)
    return c.build(out, c.root / 'w'), out / 'extra', 'a folder that kpid-zoo did not write'


def _out_is_work(c: Ctx):
    w = c.user_folder('w')
    return c.build(w, w), w, 'is the work folder'


def _out_is_parent_of_work(c: Ctx):
    p = c.user_folder('p')
    return c.build(p, p / 'w'), p, 'is inside --out'


def _out_inside_work(c: Ctx):
    w = c.user_folder('w')
    return c.build(w / 'export', w), w / 'export', 'is inside the work folder'


def _out_regular_file(c: Ctx):
    f = c.root / 'file.txt'
    f.write_text('a file, not a folder\n')
    return c.build(f, c.root / 'w'), f, 'a regular file, not a folder'


def _out_fifo(c: Ctx):
    f = c.root / 'pipe'
    os.mkfifo(f)
    return c.build(f, c.root / 'w'), f, 'a FIFO, not a folder'


def _out_device(c: Ctx):
    return c.build('/dev/null', c.root / 'w'), '/dev/null', 'a character device, not a folder'


def _out_symlink_to_user_folder(c: Ctx):
    u = c.user_folder()
    (c.root / 'link').symlink_to(u)
    return c.build(c.root / 'link', c.root / 'w'), u.resolve() / 'notes.txt', 'kpid-zoo did not write'


def _out_below_a_regular_file(c: Ctx):
    f = c.root / 'file.txt'
    f.write_text('a file, not a folder\n')
    return c.build(f / 'out', c.root / 'w'), f, 'a regular file, not a folder'


def _work_regular_file(c: Ctx):
    f = c.root / 'file.txt'
    f.write_text('a file, not a folder\n')
    return c.build(c.root / 'out', f), f, 'a regular file, not a folder'


def _work_holds_users_finetune(c: Ctx):
    w = c.user_folder('w')
    (w / 'finetune').mkdir()
    (w / 'finetune' / 'my_model.pt').write_bytes(b'mine')
    return c.build(c.root / 'out', w), w / 'finetune', 'kpid-zoo did not write'


def _restart_non_kpid_work(c: Ctx):
    w = c.user_folder('w')
    (w / 'src').mkdir()
    (w / 'src' / 'main.py').write_text('print("mine")\n')
    return c.build(c.root / 'out', w, '--restart'), w, 'not a kpid-zoo work folder'


def _prune_out_user_file(c: Ctx):
    u = c.user_folder()
    return c.prune(u), u / 'notes.txt', 'kpid-zoo did not write'


def _prune_out_user_spec(c: Ctx):
    u = c.root / 'u'
    u.mkdir()
    (u / 'spec.json').write_text('{"mine": true}\n')
    return c.prune(u), u / 'spec.json', 'not the bytes kpid-zoo wrote'


def _prune_out_regular_file(c: Ctx):
    f = c.root / 'file.txt'
    f.write_text('a file, not a folder\n')
    return c.prune(f), f, 'a regular file, not a folder'


def _prune_beside_users_parent(c: Ctx):
    # prune keeps its stage records (and a trained parent) in the folder above --out
    d = c.root / 'd'
    (d / 'parent').mkdir(parents=True)
    (d / 'parent' / 'thesis.tex').write_text('mine\n')
    return c.prune(d / 'pruned'), d / 'parent', 'kpid-zoo did not write'


def _publish_symlink_to_outside(c: Ctx):
    secret = c.root / 'secret.json'
    secret.write_text('{"token": "s3cret"}\n')
    out = c.copy_export()
    (out / 'extra.json').symlink_to(secret)
    return c.publish(out), 'extra.json', 'the export did not write'


def _publish_own_file_as_symlink(c: Ctx):
    out = c.copy_export()
    elsewhere = c.root / 'README-elsewhere.md'
    shutil.move(out / 'README.md', elsewhere)  # the same bytes, but reached through a link
    (out / 'README.md').symlink_to(elsewhere)
    return c.publish(out), out / 'README.md', 'a symlink to'


def _publish_config_as_symlink(c: Ctx):
    out = c.copy_export()
    elsewhere = c.root / 'config-elsewhere.json'
    shutil.move(out / 'config.json', elsewhere)
    (out / 'config.json').symlink_to(elsewhere)
    return c.publish(out), out / 'config.json', 'a symlink to'


def _publish_nested_json(c: Ctx):
    out = c.copy_export()
    (out / 'nested').mkdir()
    (out / 'nested' / 'x.json').write_text('{"private": 1}\n')
    return c.publish(out), 'nested/', 'the export did not write'


def _publish_hidden_json(c: Ctx):
    out = c.copy_export()
    (out / '.env.json').write_text('{"HF_TOKEN": "hf_x"}\n')
    return c.publish(out), '.env.json', 'the export did not write'


def _publish_extra_markdown(c: Ctx):
    out = c.copy_export()
    (out / 'notes.md').write_text('drafts\n')
    return c.publish(out), 'notes.md', 'the export did not write'


def _publish_changed_card(c: Ctx):
    out = c.copy_export()
    with open(out / 'README.md', 'a') as f:
        f.write('\nEdited after the export.\n')
    return c.publish(out), out / 'README.md', 'differs from the'


def _out_export_with_users_model_onnx(c: Ctx):
    out = c.copy_export()
    (out / 'model.onnx').write_bytes(b'my own graph')  # the name an export writes, bytes it did not
    return c.build(out, c.root / 'w'), out / 'model.onnx', 'not the bytes kpid-zoo wrote'


def _publish_planted_model_onnx_symlink(c: Ctx):
    secret = c.root / 'secret.onnx'
    secret.write_bytes(b'private graph')
    out = c.copy_export()
    (out / 'model.onnx').symlink_to(secret)
    return c.publish(out), 'model.onnx', 'the export did not write'


def _export_onnx_over_users_model_onnx(c: Ctx):
    out = c.copy_export()
    (out / 'model.onnx').write_bytes(b'my own graph')
    return ['export-onnx', str(out)], out / 'model.onnx', 'did not write'


def _export_onnx_over_a_symlink(c: Ctx):
    mine = c.root / 'mine.onnx'
    mine.write_bytes(b'my own graph')
    out = c.copy_export()
    (out / 'model.onnx').symlink_to(mine)
    return ['export-onnx', str(out)], out / 'model.onnx', 'a symlink to'


ROWS: list[Row] = [
    # item 1: nothing the build did not write is deleted or replaced
    ('build-out-holds-a-user-file', _out_user_file),
    ('build-out-holds-a-users-readme-and-config', _out_user_readme_and_config),
    ('build-out-holds-another-entrys-export', _out_other_entrys_export),
    ('build-out-holds-the-export-and-a-user-file', _out_export_plus_user_file),
    ('build-out-holds-the-export-with-an-edited-card', _out_export_with_edited_card),
    ('build-out-holds-the-export-and-a-subfolder', _out_export_with_subfolder),
    ('build-out-is-the-work-folder', _out_is_work),
    ('build-out-is-a-parent-of-the-work-folder', _out_is_parent_of_work),
    ('build-out-inside-the-work-folder', _out_inside_work),
    ('build-out-is-a-regular-file', _out_regular_file),
    ('build-out-is-a-fifo', _out_fifo),
    ('build-out-is-a-device', _out_device),
    ('build-out-is-a-symlink-to-a-user-folder', _out_symlink_to_user_folder),
    ('build-out-below-a-regular-file', _out_below_a_regular_file),
    ('build-work-is-a-regular-file', _work_regular_file),
    ('build-work-holds-a-users-finetune-folder', _work_holds_users_finetune),
    ('build-restart-of-a-folder-no-build-wrote', _restart_non_kpid_work),
    ('prune-out-holds-a-user-file', _prune_out_user_file),
    ('prune-out-holds-a-users-spec', _prune_out_user_spec),
    ('prune-out-is-a-regular-file', _prune_out_regular_file),
    ('prune-beside-a-users-parent-folder', _prune_beside_users_parent),
    # item 2: publish uploads exactly the export's own files
    ('publish-symlink-to-a-file-outside', _publish_symlink_to_outside),
    ('publish-an-own-file-replaced-by-a-symlink', _publish_own_file_as_symlink),
    ('publish-config-replaced-by-a-symlink', _publish_config_as_symlink),
    ('publish-subfolder-matching-the-patterns', _publish_nested_json),
    ('publish-hidden-file-matching-the-patterns', _publish_hidden_json),
    ('publish-extra-file-matching-the-patterns', _publish_extra_markdown),
    ('publish-a-file-changed-after-the-export', _publish_changed_card),
    # model.onnx (issue 24): one of the export's file names, never a user's file of that name
    ('build-out-holds-the-export-and-a-users-model-onnx', _out_export_with_users_model_onnx),
    ('publish-a-planted-model-onnx-symlink', _publish_planted_model_onnx_symlink),
    ('export-onnx-over-a-users-model-onnx', _export_onnx_over_users_model_onnx),
    ('export-onnx-over-a-model-onnx-symlink', _export_onnx_over_a_symlink),
]


@pytest.fixture(scope='module')
def exported(tmp_path_factory) -> Path:
    """A real export of NAME (a pruned resnet10t, random weights: the bytes only need to be its own)."""
    _, folder = export_pruned(
        tmp_path_factory.mktemp('hostile') / NAME,
        pruned_spec('resnet10t', 0.5),
        tiny_recipe(NAME),
        name=NAME,
        num_classes=10,
    )
    return folder


@pytest.fixture
def hub(hf_env):
    with HubServer(token=TOKEN) as server:
        hf_env.set_endpoint(server.url)
        yield server


@pytest.fixture
def tripwire(monkeypatch):
    """The build's first slow step (preflight creates a timm model) raises: a refusal must come before it."""
    import kpid_zoo.build

    def reached(*_a, **_k):
        raise ReachedSlowWork('the command reached the slow work before refusing')

    monkeypatch.setattr(kpid_zoo.build, 'preflight', reached)


@pytest.fixture
def ctx(tmp_path, exported) -> Ctx:
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump(RECIPE))
    (tmp_path / 'case').mkdir()
    return Ctx(tmp_path / 'case', recipe, exported)


@pytest.mark.parametrize('setup', [r[1] for r in ROWS], ids=[r[0] for r in ROWS])
def test_hostile_folder_is_refused_in_one_line_and_left_as_it_was(ctx, hub, tripwire, capsys, setup):
    argv, named, phrase = setup(ctx)
    before = snapshot(ctx.root)
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and 'Traceback' not in captured.err + captured.out, err
    assert str(named) in err and phrase in err, err
    assert snapshot(ctx.root) == before
    assert REPO not in hub.repos and not [r for r in hub.requests if r[0] in ('POST', 'PUT')]


# ---------------------------------------------------------------------------------------------------------------
# The other side: what kpid-zoo wrote is still replaced, cleared and uploaded, and only that.


def test_publish_uploads_exactly_the_listed_files_from_their_checked_bytes(ctx, hub):
    out = ctx.copy_export()
    assert main(ctx.publish(out)) == 0
    listed = json.loads((out / 'config.json').read_text())['kpid']['files']
    stored = set(hub.repos[REPO].resolve('main').files) - {'.gitattributes'}  # the Hub's own, made with the repo
    assert stored == set(listed) | {'config.json'}
    for name in (*listed, 'config.json'):
        assert hub.file(REPO, name).content == (out / name).read_bytes(), name


@pytest.mark.parametrize('record', ['kpid-work.json', 'legacy'])
def test_restart_clears_only_what_the_build_recorded(ctx, monkeypatch, capsys, record):
    """A work folder with the build's entries and the user's: --restart removes the former only. 'legacy' is a work
    folder written before kpid-work.json was kept (its stages/ manifests mark it)."""
    import kpid_zoo.build

    def stop(*_a, **_k):
        raise ReachedSlowWork('stopped where the stages start')

    monkeypatch.setattr(kpid_zoo.build, '_build', stop)
    w = ctx.user_folder('w')
    (w / 'src').mkdir()
    (w / 'src' / 'main.py').write_text('print("mine")\n')
    for rel in ('finetune/checkpoints/step_2/model.safetensors', 'pruned/spec.json', 'eval.json'):
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text('written by a build\n')
    (w / 'stages').mkdir()
    (w / 'stages' / 'eval.json').write_text(json.dumps({'stage': 'eval', 'inputs': {}, 'files': None}))
    if record == 'kpid-work.json':
        (w / 'kpid-work.json').write_text(json.dumps({'entries': ['eval.json', 'finetune', 'pruned', 'stages']}))
    mine = {k: v for k, v in snapshot(w).items() if k.split('/')[0] in ('notes.txt', 'src')}
    assert main(ctx.build(ctx.root / 'out', w, '--restart')) == 1  # ReachedSlowWork: an internal error
    assert 'ReachedSlowWork' in capsys.readouterr().err
    after = snapshot(w)
    assert {k: v for k, v in after.items() if k.split('/')[0] in ('notes.txt', 'src')} == mine
    assert not any(k.split('/')[0] in ('finetune', 'pruned', 'eval.json') for k in after), sorted(after)
    assert set(json.loads((w / 'kpid-work.json').read_text())['entries']) >= {'finetune', 'pruned', 'stages'}


def test_export_replaces_only_a_proven_previous_export(exported, tmp_path):
    """config.json naming the entry proves a folder; damaged, the caller's record of the hashes still does."""
    from kpid_zoo.core.files import file_sha256
    from kpid_zoo.zoo.export import check_export_folder

    out = Path(shutil.copytree(exported, tmp_path / 'out'))
    check_export_folder(out, NAME)  # a previous export of NAME
    with pytest.raises(ValueError, match="holds the export of 'kpid_hostile', not of 'other'"):
        check_export_folder(out, 'other')
    recorded = {p.name: file_sha256(p) for p in out.iterdir()}
    (out / 'config.json').write_text('{}')
    with pytest.raises(ValueError, match="config.json: not a config.json kpid-zoo exported for 'kpid_hostile'"):
        check_export_folder(out, NAME)
    check_export_folder(out, NAME, recorded)  # the build's record vouches for every other file
    (out / 'model.safetensors').write_bytes(b'not the weights')
    with pytest.raises(ValueError, match='config.json: not a config.json kpid-zoo exported'):
        check_export_folder(out, NAME, recorded)  # no longer: the weights are not the recorded ones
    shutil.copy(exported / 'config.json', out / 'config.json')
    with pytest.raises(ValueError, match='model.safetensors: not the bytes kpid-zoo wrote'):
        check_export_folder(out, NAME)  # config.json names the entry, but its weights are not these


def test_the_swap_itself_refuses_a_file_that_arrived_after_the_checks(tmp_path):
    """The last line of defence (files.replace_dir): whatever the callers checked, a folder is swapped out only
    while it holds nothing but the owned files, and is left as it was otherwise."""
    dest, new = tmp_path / 'dest', tmp_path / 'new'
    dest.mkdir()
    new.mkdir()
    (dest / 'model.safetensors').write_bytes(b'old')
    (new / 'model.safetensors').write_bytes(b'new')
    (dest / 'late.txt').write_text('arrived after the checks\n')
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match='late.txt: not written by kpid-zoo'):
        replace_dir(new, dest, owned=('model.safetensors',))
    assert snapshot(tmp_path) == before
    (dest / 'late.txt').unlink()
    replace_dir(new, dest, owned=('model.safetensors',))
    assert sorted(os.listdir(tmp_path)) == ['dest'] and (dest / 'model.safetensors').read_bytes() == b'new'


def test_prune_replaces_its_own_output_and_nothing_else(ctx, capsys):
    """A real pruning (magnitude, resnet18 at 32 px), again over its own output, then with a user's file in it."""
    out = ctx.root / 'runs' / 'pruned'
    assert main(ctx.prune(out)) == 0
    first = snapshot(out)
    assert sorted(first) == ['model.safetensors', 'report.json', 'spec.json', 'widths.png']
    assert main(ctx.prune(out, '--force')) == 0
    assert snapshot(out) == first  # the same pruning again, swapped in
    (out / 'notes.txt').write_text('mine\n')
    capsys.readouterr()
    assert main(ctx.prune(out, '--force')) == 2
    assert f'{out / "notes.txt"}: a regular file that kpid-zoo did not write' in capsys.readouterr().err
    assert (out / 'notes.txt').read_text() == 'mine\n'
