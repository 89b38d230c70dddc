"""export_model: a Hub-repo-shaped folder that timm loads back exactly, written atomically."""

from __future__ import annotations

import json
import os

import pytest
import safetensors
import timm
import torch
import yaml
from export_utils import export_pruned, make_report, pruned_spec, tiny_recipe
from huggingface_hub import ModelCard

import kpid_zoo  # noqa: F401  (registers kpid_pruned)
from kpid_zoo.zoo.card import WIDTHS_PLOT
from kpid_zoo.zoo.export import export_model, file_sha256, read_export_config, write_zoo_entry


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    spec = pruned_spec('resnet10t', 0.5)
    recipe = tiny_recipe()
    out = tmp_path_factory.mktemp('export') / 'kpid_tiny_test'
    model, folder = export_pruned(out, spec, recipe, name='kpid_tiny_test', num_classes=10)
    return model, spec, recipe, folder


def test_folder_layout_and_safetensors(tiny):
    model, spec, _, folder = tiny
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ['model.safetensors', 'config.json', 'README.md', WIDTHS_PLOT]
    )
    with safetensors.safe_open(str(folder / 'model.safetensors'), framework='pt') as f:
        assert f.metadata() == {'format': 'pt'}
        keys = set(f.keys())
        assert keys == set(model.state_dict())
        for k in keys:
            assert torch.equal(f.get_tensor(k), model.state_dict()[k]), k
    # no pickle anywhere: the weights file starts with a little-endian header length, then JSON
    head = (folder / 'model.safetensors').read_bytes()[:9]
    assert head[8:9] == b'{'
    assert (folder / WIDTHS_PLOT).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_config_is_timm_format_with_rebuild_args(tiny):
    model, spec, recipe, folder = tiny
    config = read_export_config(folder)
    assert config['architecture'] == 'kpid_pruned'
    assert config['num_classes'] == 10
    assert config['num_features'] == model.num_features < timm.create_model('resnet10t').num_features
    assert config['model_args']['kpid_spec'] == json.loads(json.dumps(spec.to_dict()))
    pcfg = config['pretrained_cfg']
    assert pcfg['paper_ids'] == 'arXiv:2002.08258'
    assert pcfg['input_size'] == [3, 224, 224] and pcfg['crop_pct'] == 0.875 and pcfg['interpolation'] == 'bicubic'
    assert pcfg['first_conv'] == 'conv1.0' and pcfg['classifier'] == 'fc' and pcfg['license'] == 'apache-2.0'
    # timm's convention: the final feature map of the input size (224 / 32), which timm's own export leaves null
    assert pcfg['pool_size'] == [7, 7]
    assert 'hf_hub_id' not in pcfg and 'tag' not in pcfg  # the parent's source must not leak into the export
    kpid = config['kpid']
    assert kpid['weights_sha256'] == file_sha256(folder / 'model.safetensors')
    assert kpid['recipe_sha256'] == recipe.sha256() and kpid['parent'] == 'resnet10t'


def test_local_dir_roundtrip_is_exact(tiny):
    model, _, _, folder = tiny
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.pretrained_cfg['crop_pct'] == 0.875
    cfg = timm.data.resolve_model_data_config(loaded)
    assert cfg['input_size'] == (3, 224, 224) and cfg['interpolation'] == 'bicubic'


def test_model_card(tiny):
    _, spec, recipe, folder = tiny
    card = ModelCard.load(folder / 'README.md')
    data = card.data
    assert data.library_name == 'timm' and data.license == 'apache-2.0'
    assert 'kpid' in data.tags and 'image-classification' in data.tags
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results == {'Top-1 Accuracy': 71.25, 'Top-5 Accuracy': 90.5}
    assert data.eval_results[0].dataset_type == 'cifar10'
    text = card.text
    assert f'({WIDTHS_PLOT})' in text
    assert recipe.sha256() in text and 'resnet10t' in text and 'GMACs' in text and 'Params' in text
    # the embedded recipe is the recipe
    embedded = text.split('```yaml\n', 1)[1].split('```', 1)[0]
    assert yaml.safe_load(embedded) == recipe.to_dict()


def test_card_copy_and_zoo_entry(tiny, tmp_path):
    _, spec, _, folder = tiny
    path = write_zoo_entry(folder, zoo_dir=tmp_path / 'zoo')
    entry = json.loads(path.read_text())
    assert path.name == 'kpid_tiny_test.json'
    assert entry['spec'] == json.loads(json.dumps(spec.to_dict()))
    assert entry['weights_sha256'] == file_sha256(folder / 'model.safetensors')
    assert entry['hf_hub_id'] == 'kpid-test/kpid_tiny_test' and entry['source'] == 'kpid-zoo'


def test_replaces_existing_folder_only_when_complete(tiny, tmp_path, monkeypatch):
    model, spec, recipe, _ = tiny
    out = tmp_path / 'out'
    report = make_report(spec, model, 10)
    kwargs = dict(
        name='kpid_tiny_test',
        pretrained_cfg=dict(input_size=(3, 224, 224)),
        metrics=dict(top1=1.0, top5=2.0),
        report=report,
        recipe=recipe,
    )
    # the folder holds a previous export of the entry (other metrics): only such a folder may be replaced
    export_model(model, spec, out, **{**kwargs, 'metrics': dict(top1=0.5, top5=1.0)})
    old = {p.name: p.read_bytes() for p in out.iterdir()}

    # a failure mid-export (the card step) leaves the old folder untouched and no temp dir behind
    import kpid_zoo.zoo.export as export_mod

    def boom(*a, **k):
        raise OSError('disk full')

    monkeypatch.setattr(export_mod, 'build_card', boom)
    with pytest.raises(OSError, match='disk full'):
        export_model(model, spec, out, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ['out'] and {p.name: p.read_bytes() for p in out.iterdir()} == old
    monkeypatch.undo()

    export_model(model, spec, out, card_copy_dir=tmp_path / 'cards', **kwargs)
    assert read_export_config(out)['kpid']['metrics']['top1'] == 1.0 and (out / 'model.safetensors').is_file()
    assert sorted(os.listdir(tmp_path)) == ['cards', 'out']
    assert (tmp_path / 'cards' / 'kpid_tiny_test.md').read_text() == (out / 'README.md').read_text()

    # a file the export did not write stops it before any work, and stays (tests/test_hostile_files.py has more)
    (out / 'stale.txt').write_text('not the export')
    with pytest.raises(ValueError, match=r'stale\.txt: a regular file that kpid-zoo did not write'):
        export_model(model, spec, out, **kwargs)
    assert (out / 'stale.txt').read_text() == 'not the export'


def test_bad_inputs_are_named(tiny, tmp_path):
    model, spec, recipe, _ = tiny
    report = make_report(spec, model, 10)
    ok = dict(name='x', pretrained_cfg={}, metrics=dict(top1=1.0), report=report, recipe=recipe)
    with pytest.raises(ValueError, match=r"pretrained_cfg has unknown key\(s\) \['crop'\]"):
        export_model(model, spec, tmp_path / 'a', **{**ok, 'pretrained_cfg': {'crop': 0.9}})
    with pytest.raises(ValueError, match='metrics has no top1'):
        export_model(model, spec, tmp_path / 'a', **{**ok, 'metrics': {'acc': 1}})
    with pytest.raises(TypeError, match='PruneReport'):
        export_model(model, spec, tmp_path / 'a', **{**ok, 'report': object()})
    with pytest.raises(ValueError, match=r'input_size \(1, 224, 224\) does not match'):
        export_model(model, spec, tmp_path / 'a', **{**ok, 'pretrained_cfg': {'input_size': (1, 224, 224)}})
    assert not (tmp_path / 'a').exists()


def test_accepts_the_parents_full_pretrained_cfg_without_leaking_its_source(tiny, tmp_path):
    """build.py hands over the parent's timm cfg plus this build's preprocessing: keep the latter only."""
    model, spec, recipe, _ = tiny
    parent_cfg = timm.models.get_pretrained_cfg('resnet50.a1_in1k').to_dict()  # has test_input_size, hf_hub_id
    cfg = {**parent_cfg, 'input_size': (3, 224, 224), 'crop_pct': 0.9, 'num_classes': 10}
    folder = export_model(
        model,
        spec,
        tmp_path / 'x',
        name='x',
        pretrained_cfg=cfg,
        metrics=dict(top1=1.0, top5=2.0),
        report=make_report(spec, model, 10),
        recipe=recipe,
    )
    pcfg = read_export_config(folder)['pretrained_cfg']
    for key in ('hf_hub_id', 'url', 'tag', 'test_input_size', 'test_crop_pct', 'source'):
        assert key not in pcfg, key
    assert pcfg['origin_url'] == 'https://arxiv.org/abs/2002.08258' and pcfg['crop_pct'] == 0.9
    assert pcfg['first_conv'] == 'conv1.0'  # the pruned model's stem, not resnet50's 'conv1'
    with pytest.raises(ValueError, match='num_classes 1000 does not match'):
        export_model(
            model,
            spec,
            tmp_path / 'y',
            name='y',
            pretrained_cfg={**cfg, 'num_classes': 1000},
            metrics=dict(top1=1.0),
            report=make_report(spec, model, 10),
            recipe=recipe,
        )
