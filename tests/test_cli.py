import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kpid_zoo.cli import main
from kpid_zoo.engine.surgery import ArchSpec, build_pruned
from kpid_zoo.errors import UserError


def _recipe(tmp_path, **overrides):
    recipe = {
        'name': 'cli_resnet18',
        'parent': {'model': 'resnet18', 'weights': 'none'},
        'input_size': [3, 64, 64],
        'flops': {'target_ratio': 0.5, 'tolerance': 0.02},
        'importance': {'method': 'magnitude'},
        'data': {'dataset': 'imagefolder', 'root': 'unused-by-magnitude-importance'},
    }
    recipe.update(overrides)
    path = tmp_path / 'recipe.yaml'
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.launch
def test_help_reads_well_from_the_installed_entry_point():
    out = subprocess.run([sys.executable, '-m', 'kpid_zoo.cli', '--help'], capture_output=True, text=True, check=True)
    for command in ('flops', 'groups', 'prune', 'build', 'publish', 'export-onnx'):
        assert command in out.stdout
    assert 'examples:' in out.stdout


def test_flops_prints_timm_gmacs(capsys):
    assert main(['flops', 'resnet50']) == 0
    assert 'resnet50 at 3x224x224: 4.1115 GMACs, 25.557M params' in capsys.readouterr().out


def test_unknown_model_suggests_the_right_name(capsys):
    assert main(['flops', 'efficentnet_b0']) == 2  # bad input: one line, exit 2
    err = capsys.readouterr().err
    assert 'did you mean efficientnet_b0' in err and len(err.splitlines()) == 1


def test_groups_lists_fixed_groups_with_their_reason(capsys):
    assert main(['groups', 'resnet18', '--input-size', '64']) == 0
    out = capsys.readouterr().out
    assert 'resnet18: 13 channel groups, 12 prunable' in out
    assert '[fixed: network output]' in out


def test_prune_writes_weights_spec_report_and_plot(tmp_path, capsys):
    out = tmp_path / 'pruned'
    assert main(['prune', str(_recipe(tmp_path)), '--out', str(out), '--quiet']) == 0
    assert 'FLOPs error vs target' in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ['model.safetensors', 'report.json', 'spec.json', 'widths.png']
    report = json.loads((out / 'report.json').read_text())
    assert report['target_gmacs'] * 0.98 <= report['achieved_gmacs'] <= report['target_gmacs']
    assert (out / 'widths.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    model = build_pruned(ArchSpec.load(out / 'spec.json'))
    model.load_state_dict(load_file(out / 'model.safetensors'))  # strict: the spec rebuilds exactly these tensors
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert not list(tmp_path.glob('.pruned.tmp-*')), 'a temporary folder was left behind'


def test_bad_recipe_is_a_clear_error_naming_file_and_field(tmp_path, capsys):
    path = _recipe(tmp_path, flops={'target_ratio': 1.5})
    assert main(['prune', str(path), '--out', str(tmp_path / 'x')]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and 'flops.target_ratio' in err
    assert not (tmp_path / 'x').exists()


def test_zoo_prints_the_zoo_table(capsys):
    import csv

    from kpid_zoo.zoo.records import recipe_names
    from kpid_zoo.zoo.registry import zoo_records

    assert main(['zoo']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        'model',
        'weights',
        'source',
        'parent',
        'img_size',
        'gmacs',
        'param_count',
        'top1',
        'top5',
        'eval_size',
        'budget',
        'build',
    ]
    buildable = [n for n in recipe_names() if n not in zoo_records]
    assert buildable and len(lines) == 1 + len(zoo_records) + len(buildable)
    assert lines[1:] and all(line.startswith('kpid_') for line in lines[1:])
    row = next(re.split(r'\s{2,}', line) for line in lines if line.startswith('kpid_effnet_b0.'))  # cells hold spaces
    assert row == [
        'kpid_effnet_b0.in1k',
        "authors' release",
        'efficientnet_b1_pruned.in1k',
        'efficientnet_b1',
        '240',
        '0.404',
        '6.33',
        '78.242',
        '93.836',
        '240',
    ]
    assert main(['zoo', '--csv']) == 0
    out = capsys.readouterr().out
    assert (
        out.splitlines()[0] == 'model,weights,source,parent,img_size,gmacs,param_count,top1,top5,eval_size,budget,build'
    )
    rows = {r['model']: r for r in csv.DictReader(out.splitlines())}
    assert {r['weights'] for n, r in rows.items() if '.' in n} == {"authors' release"}
    # a recipe with no record is buildable: no numbers yet, its parent, budget and the command that builds it
    assert rows['kpid_mobilenetv3'] == dict(
        model='kpid_mobilenetv3',
        weights='none (buildable)',
        source='recipes/kpid_mobilenetv3.yaml',
        parent='efficientnet_b0.ra_in1k',
        img_size='224',
        gmacs='',
        param_count='',
        top1='',
        top5='',
        eval_size='',
        budget='0.22 GMACs',
        build='kpid-zoo build kpid_mobilenetv3',
    )
    assert rows['kpid_effnet_lite0_cifar10']['budget'] == "50% of the parent's GMACs"
    assert set(buildable) <= set(rows) and not any(n.split('.')[0] in buildable for n in rows if '.' in n)


def test_flops_of_a_zoo_entry_and_a_bad_tag(capsys):
    assert main(['flops', 'kpid_effnet_b0', '--input-size', '64']) == 0
    assert 'kpid_effnet_b0 at 3x64x64:' in capsys.readouterr().out
    assert main(['flops', 'kpid_effnet_b0.nope']) == 2  # bad input: one line, exit 2
    err = capsys.readouterr().err
    assert re.search(r'kpid_effnet_b0\.nope: Invalid pretrained tag \(nope\)', err) and len(err.splitlines()) == 1


def test_build_and_prune_find_a_packaged_recipe_by_name(monkeypatch, tmp_path, capsys):
    import kpid_zoo.build
    from kpid_zoo.zoo.records import RECIPES_DIR

    seen = []
    monkeypatch.setattr(
        kpid_zoo.build,
        'build',
        lambda recipe, **kw: seen.append(recipe) or (_ for _ in ()).throw(UserError('stop here')),
    )
    monkeypatch.chdir(tmp_path)  # no recipes/ folder around: only the packaged copy can answer
    assert main(['build', 'kpid_effnet_b0']) == 2
    assert seen == [RECIPES_DIR / 'kpid_effnet_b0.yaml']
    assert main(['build', 'kpid_nope']) == 2
    err = capsys.readouterr().err
    assert (
        'kpid_nope: no such recipe file, nor a packaged recipe of that name (packaged: kpid_ecaresnet101d, '
        'kpid_ecaresnet50d, kpid_effnet_b0,' in err
    )


@pytest.mark.parametrize(
    'argv, message',
    [
        (
            ['build', 'kpid_efect_b1'],
            'kpid_efect_b1: no such recipe file, nor a packaged recipe of that name (did you mean kpid_effnet_b1,',
        ),
        (['prune', 'kpid_resnet50_3g'], '(did you mean kpid_resnet50_2g, kpid_resnet50_1g'),
        (['build', 'kpid_efficientnet_b1'], '(kpid_efficientnet_b1 is now kpid_effnet_b0)'),
        (
            ['flops', 'kpid_effnet_b9'],
            "'kpid_effnet_b9' is not a timm model nor a kpid-zoo name (did you mean kpid_effnet_b",
        ),
        (['groups', 'kpid_mobilenetv4'], '(did you mean kpid_mobilenetv3 (buildable: kpid-zoo build kpid_mobilenetv3)'),
        (
            ['flops', 'kpid_mobilenetv3'],
            'kpid_mobilenetv3 is a recipe whose network has not been built, so it has no '
            'registered name yet: `kpid-zoo build kpid_mobilenetv3` builds it',
        ),
    ],
)
def test_an_unknown_name_suggests_the_closest_registered_and_buildable_names(
    argv, message, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1 and err.startswith(f'kpid-zoo {argv[0]}: error: ')
