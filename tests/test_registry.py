"""`import kpid_zoo` registers the zoo in timm; pretrained loads come from the HF cache / a loopback Hub, checked."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from export_utils import REPO_ROOT, TOKEN, export_pruned, pruned_spec, zoo_recipe
from hub_server import HubServer, git_blob_sha1
from huggingface_hub import HfApi
from safetensors.torch import save_file

import kpid_zoo  # noqa: F401
from kpid_zoo.core.recipe import load_recipe
from kpid_zoo.zoo import _weights, registry
from kpid_zoo.zoo.export import file_sha256, write_zoo_entry
from kpid_zoo.zoo.publish import publish
from kpid_zoo.zoo.records import CFG_KEYS, ZooRecord
from kpid_zoo.zoo.registry import DEFAULT_SPEC, KpidWeightsError, zoo_records

NAME = 'kpid_effnet_b0'  # a kpid-zoo build of that recipe (kpid_pruned, not the registered name): hf-hub: / local-dir:
HUB_ID = f'kpid-zoo/{NAME}'
REL = 'kpid_effnet_b0'  # a registered entry: the KPID authors' efficientnet_b1_pruned, weights on timm's Hub
REL_HUB = 'timm/efficientnet_b1_pruned.in1k'
X = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def effnet(tmp_path_factory):
    """A real kpid_effnet_b0-shaped export: efficientnet_b1 cut to a quarter width, random weights."""
    spec = pruned_spec('efficientnet_b1', 0.25, input_size=(3, 96, 96))  # channels do not depend on H, W: trace small
    model, folder = export_pruned(
        tmp_path_factory.mktemp('zoo') / NAME, spec, zoo_recipe(NAME), name=NAME, num_classes=1000
    )
    return model, spec, folder


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """timm's efficientnet_b1_pruned (random init, BN statistics randomised) and its weights as the Hub serves them."""
    torch.manual_seed(0)
    model = timm.create_model('efficientnet_b1_pruned').eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # timm's fresh BNs are identities: make a misplaced one visible
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp('released')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / 'model.safetensors'))
    return model, folder


def populate_hf_cache(cache_dir: Path, repo_id: str, folder: Path, files=('config.json', 'model.safetensors')) -> Path:
    """The layout hf_hub_download writes: blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/main."""
    storage = cache_dir / f'models--{repo_id.replace("/", "--")}'
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (storage / 'refs').mkdir(parents=True)
    (storage / 'refs' / 'main').write_text(commit)
    snap = storage / 'snapshots' / commit
    snap.mkdir(parents=True)
    for name in files:
        data = (folder / name).read_bytes()
        etag = hashlib.sha256(data).hexdigest() if name.endswith('.safetensors') else git_blob_sha1(data)
        (storage / 'blobs').mkdir(exist_ok=True)
        (storage / 'blobs' / etag).write_bytes(data)
        os.symlink(Path('..', '..', 'blobs', etag), snap / name)
    return storage


def cached_blob(cache_dir: Path, repo_id: str, name: str) -> Path:
    snaps = list((cache_dir / f'models--{repo_id.replace("/", "--")}' / 'snapshots').glob(f'*/{name}'))
    assert len(snaps) == 1
    return snaps[0].resolve()


def flip_one_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def outputs_equal(a, b, x=X) -> None:
    # same architecture, same weights, same kernels on the same machine: bit-identical, so no tolerance
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The registered names


def test_zoo_is_registered_timm_style():
    assert set(timm.list_models('kpid_*')) == set(zoo_records) | {'kpid_pruned'}
    assert set(timm.list_models('kpid_*', pretrained=True)) == {f'{n}.{r.tag}' for n, r in zoo_records.items()}
    assert {'kpid_effnet_b0', 'kpid_effnet_b1', 'kpid_effnet_b2', 'kpid_ecaresnet50d', 'kpid_ecaresnet101d'} <= set(
        zoo_records
    )
    for name, record in zoo_records.items():
        cfg = timm.models.get_pretrained_cfg(name)
        source = timm.models.get_pretrained_cfg(record.source_model).to_dict()
        assert cfg.hf_hub_id == source['hf_hub_id'] == record.hf_hub_id and cfg.paper_ids == 'arXiv:2002.08258'
        for key in CFG_KEYS:  # preprocessing, pool size, stem and head: the released weights' own
            assert getattr(cfg, key) == source.get(key), (name, key)


def test_a_recipe_is_registered_exactly_when_the_zoo_records_its_name():
    unbuilt = []
    for path in sorted((REPO_ROOT / 'recipes').glob('*.yaml')):
        recipe = load_recipe(path)  # still a valid recipe to build
        assert recipe.name == path.stem, f'{path.name}: a recipe file is named after its recipe'
        assert timm.is_model(recipe.name) == (recipe.name in zoo_records), (
            f'{path.name}: registered with no recorded architecture'
        )
        if recipe.name in zoo_records:  # the recorded network is this recipe's: same parent
            assert zoo_records[recipe.name].parent == recipe.parent.model, path.name
        else:
            unbuilt.append(recipe.name)
    assert unbuilt  # a recipe nobody built is buildable, not registered


def test_every_registered_name_has_its_recipe_and_card():
    for name, record in zoo_records.items():
        recipe = load_recipe(REPO_ROOT / 'recipes' / f'{name}.yaml')
        assert recipe.name == name and recipe.hub.repo_id == f'kpid-zoo/{name}'
        assert (REPO_ROOT / 'model_cards' / name / 'README.md').is_file()
        assert record.origin == "authors' release"  # every entry today: the KPID authors' weights through timm


def test_old_names_build_the_renamed_entries_with_a_warning(released, hf_env):
    from kpid_zoo.zoo.records import RENAMED

    assert RENAMED == {
        'kpid_efficientnet_b1': 'kpid_effnet_b0',
        'kpid_efficientnet_b2': 'kpid_effnet_b1',
        'kpid_efficientnet_b3': 'kpid_effnet_b2',
    }
    assert not set(RENAMED) & set(timm.list_models('kpid_*'))  # listed no more
    for old, new in RENAMED.items():
        with pytest.warns(UserWarning, match=rf'Mapping deprecated model name {old} to current {new}\.in1k'):
            model = timm.create_model(old)
        assert model.pretrained_cfg['architecture'] == new and model.pretrained_cfg['tag'] == 'in1k'
        shapes = {k: v.shape for k, v in timm.create_model(new).state_dict().items()}
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    # the old name with pretrained=True: the same checked weights as the new one
    reference, folder = released
    populate_hf_cache(hf_env.cache_dir, REL_HUB, folder, files=('model.safetensors',))
    hf_env.set_offline()
    with pytest.warns(UserWarning, match='Mapping deprecated model name kpid_efficientnet_b1'):
        outputs_equal(timm.create_model('kpid_efficientnet_b1', pretrained=True), reference)
        outputs_equal(timm.create_model('kpid_efficientnet_b1.in1k', pretrained=True), reference)


def test_kpid_pruned_default_spec_and_the_specs_own_classes_and_channels():
    model = timm.create_model('kpid_pruned').eval()
    assert model.layer1[0].conv1.out_channels == DEFAULT_SPEC['widths']['layer1.0.conv1'] == 32
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    spec = dict(
        parent='resnet18',
        widths={'layer1.0.conv1': 16},
        input_size=[1, 32, 32],
        parent_kwargs=dict(num_classes=10, in_chans=1),
    )
    model = timm.create_model('kpid_pruned', kpid_spec=spec).eval()
    assert model.num_classes == 10 and model.conv1.in_channels == 1
    assert model.pretrained_cfg['num_classes'] == 10 and model.pretrained_cfg['input_size'] == (1, 32, 32)
    assert model.pretrained_cfg['pool_size'] == (1, 1) and model.pretrained_cfg['first_conv'] == 'conv1'
    assert timm.create_model('kpid_pruned', kpid_spec=spec, num_classes=3).num_classes == 3  # the caller still wins


# ---------------------------------------------------------------------------------------------------------------
# Released weights (timm's Hub repos), on the loopback Hub and from the cache


def test_pretrained_downloads_the_released_weights_from_timms_hub_repo(released, hf_env):
    model, folder = released
    with HubServer(token=TOKEN) as hub:
        hf_env.set_endpoint(hub.url)
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo(REL_HUB)
        api.upload_file(path_or_fileobj=folder / 'model.safetensors', path_in_repo='model.safetensors', repo_id=REL_HUB)
        ours = timm.create_model(REL, pretrained=True)
        resolved = [p for m, p, _ in hub.requests if m in ('HEAD', 'GET') and '/resolve/' in p]
        assert resolved and set(resolved) == {f'/{REL_HUB}/resolve/main/model.safetensors'}  # no config: packaged
        assert not hub.unhandled
    outputs_equal(ours, model)
    assert ours.pretrained_cfg['hf_hub_id'] == REL_HUB and ours.pretrained_cfg['crop_pct'] == 0.882

    hf_env.set_offline()
    outputs_equal(timm.create_model(REL, pretrained=True), model)
    blob = cached_blob(hf_env.cache_dir, REL_HUB, 'model.safetensors')
    assert blob.name == file_sha256(folder / 'model.safetensors')  # the Hub's LFS sha256 names the blob
    flip_one_byte(blob)
    with pytest.raises(KpidWeightsError) as err:
        timm.create_model(REL, pretrained=True)
    msg = str(err.value)
    assert msg.startswith(f'{REL}: pretrained weights ') and 'model.safetensors fail the sha256 check' in msg
    assert f'expected {blob.name}, got {file_sha256(blob)}' in msg


def test_a_recorded_sha256_is_what_the_weights_are_checked_against(released, hf_env, monkeypatch):
    _, folder = released
    populate_hf_cache(hf_env.cache_dir, REL_HUB, folder, files=('model.safetensors',))
    hf_env.set_offline()
    record = zoo_records[REL]
    monkeypatch.setitem(zoo_records, REL, dataclasses.replace(record, weights_sha256='0' * 64))
    with pytest.raises(KpidWeightsError, match=rf'{REL}: .*model\.safetensors fail the sha256 check: expected 0{{64}}'):
        timm.create_model(REL, pretrained=True)
    monkeypatch.setitem(
        zoo_records, REL, dataclasses.replace(record, weights_sha256=file_sha256(folder / 'model.safetensors'))
    )
    timm.create_model(REL, pretrained=True)


@pytest.mark.parametrize(
    'options',
    [
        dict(num_classes=0),
        dict(num_classes=10, global_pool='max'),
        dict(global_pool='', num_classes=0),
        dict(in_chans=1),
        dict(num_classes=0, global_pool='avgmax', in_chans=1),
    ],
    ids=['features', 'classes-max', 'unpooled', 'gray', 'gray-features-avgmax'],
)
def test_released_weights_load_under_timms_head_options(released, hf_env, options):
    """timm drops the classifier when num_classes differs and adapts the stem to in_chans: the trunk is the
    released one, exactly."""
    reference, folder = released
    populate_hf_cache(hf_env.cache_dir, REL_HUB, folder, files=('model.safetensors',))
    hf_env.set_offline()
    model = timm.create_model(REL, pretrained=True, **options).eval()
    gray = options.get('in_chans') == 1
    with torch.no_grad():
        features = model.forward_features(X[:, :1] if gray else X)
        if not gray:
            torch.testing.assert_close(features, reference.forward_features(X), rtol=0, atol=0)
    if gray:  # timm's adapt_input_conv: the RGB filters summed
        torch.testing.assert_close(model.conv_stem.weight, reference.conv_stem.weight.sum(1, keepdim=True))
        rest = {k: v for k, v in reference.state_dict().items() if not k.startswith(('conv_stem.', 'classifier.'))}
        for key, value in rest.items():
            assert torch.equal(model.state_dict()[key], value), key
    if options.get('num_classes') == 0 and options.get('global_pool') != '' and not gray:
        with torch.no_grad():
            torch.testing.assert_close(
                model(X), reference.forward_head(reference.forward_features(X), pre_logits=True), rtol=0, atol=0
            )


def test_a_tag_is_checked_against_its_own_record(released, hf_env, monkeypatch):
    """Other weights of a name (a new tag, same widths) are checked against their own sha256, not the default's."""
    from timm.models import _registry

    _, folder = released
    populate_hf_cache(hf_env.cache_dir, REL_HUB, folder, files=('model.safetensors',))
    hf_env.set_offline()
    other = dataclasses.replace(zoo_records[REL], tag='kpid', weights_sha256='0' * 64)
    cfg = timm.models.generate_default_cfgs({f'{REL}.kpid': registry._record_cfg(other)})[REL].cfgs['kpid']
    monkeypatch.setitem(
        _registry._model_pretrained_cfgs, f'{REL}.kpid', dataclasses.replace(cfg, architecture=REL, tag='kpid')
    )
    monkeypatch.setitem(registry._tag_records, (REL, 'kpid'), other)
    with pytest.raises(KpidWeightsError, match=rf'{REL}: .*model\.safetensors fail the sha256 check: expected 0{{64}}'):
        timm.create_model(f'{REL}.kpid', pretrained=True)
    timm.create_model(REL, pretrained=True)  # the default tag: its own record (the Hub's reported hash)


def test_a_regular_hub_file_is_checked_against_its_git_sha1(tmp_path):
    data = b'{"not": "an LFS file"}'
    blob = tmp_path / git_blob_sha1(data)
    blob.write_bytes(data)
    _weights._verify_hub_reported(REL, str(blob))
    flip_one_byte(blob, 3)
    with pytest.raises(KpidWeightsError, match=rf'{REL}: pretrained weights .* fail the check against the git sha1'):
        _weights._verify_hub_reported(REL, str(blob))


def test_offline_and_not_cached_is_one_clear_error(hf_env):
    hf_env.set_offline()
    with pytest.raises(RuntimeError, match=rf'{REL}: cannot get pretrained weights model\.safetensors from {REL_HUB}'):
        timm.create_model(REL, pretrained=True)


def test_spec_that_does_not_fit_the_weights_names_the_tensor(released, hf_env, monkeypatch):
    _, folder = released
    populate_hf_cache(hf_env.cache_dir, REL_HUB, folder, files=('model.safetensors',))
    hf_env.set_offline()
    record = zoo_records[REL]
    group = next(iter(record.spec['widths']))
    spec = {**record.spec, 'widths': {**record.spec['widths'], group: record.spec['widths'][group] + 4}}
    monkeypatch.setitem(zoo_records, REL, dataclasses.replace(record, spec=spec))
    with pytest.raises(
        KpidWeightsError,
        match=rf'{REL}: .*model\.safetensors does not fit the architecture: '
        rf"tensor '{group}\.weight' has shape",
    ):
        timm.create_model(REL, pretrained=True)


# ---------------------------------------------------------------------------------------------------------------
# Exports (recipe builds): kpid_pruned through hf-hub: and local-dir:


def test_export_from_offline_cache(effnet, hf_env):
    model, _, folder = effnet
    populate_hf_cache(hf_env.cache_dir, HUB_ID, folder)
    hf_env.set_offline()
    loaded = timm.create_model(f'hf-hub:{HUB_ID}', pretrained=True)
    outputs_equal(loaded, model)
    assert loaded.pretrained_cfg['crop_pct'] == 0.875 and tuple(loaded.pretrained_cfg['pool_size']) == (7, 7)


def test_tampered_export_cache_fails_the_sha256_check(effnet, hf_env):
    _, _, folder = effnet
    populate_hf_cache(hf_env.cache_dir, HUB_ID, folder)
    hf_env.set_offline()
    blob = cached_blob(hf_env.cache_dir, HUB_ID, 'model.safetensors')
    expected = file_sha256(blob)
    flip_one_byte(blob)
    with pytest.raises(KpidWeightsError) as err:
        timm.create_model(f'hf-hub:{HUB_ID}', pretrained=True)
    msg = str(err.value)
    assert msg.startswith('kpid_pruned:') and 'model.safetensors' in msg
    assert f'expected {expected}, got {file_sha256(blob)}' in msg


def test_adaptations_features_classes_channels(effnet, hf_env):
    model, _, folder = effnet
    populate_hf_cache(hf_env.cache_dir, HUB_ID, folder)
    hf_env.set_offline()
    name = f'hf-hub:{HUB_ID}'

    feats = timm.create_model(name, pretrained=True, features_only=True).eval()
    with torch.no_grad():
        outs = feats(X)
        ref = model.forward_intermediates(X, intermediates_only=True)
    assert [o.shape[1] for o in outs] == feats.feature_info.channels() == [r.shape[1] for r in ref]
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=0, atol=0)

    seven = timm.create_model(name, pretrained=True, num_classes=7).eval()
    with torch.no_grad():
        assert seven(X).shape == (1, 7)
        torch.testing.assert_close(seven.forward_features(X), model.forward_features(X), rtol=0, atol=0)

    gray = timm.create_model(name, pretrained=True, in_chans=1).eval()
    with torch.no_grad():
        assert gray(X[:, :1]).shape == (1, 1000)
    torch.testing.assert_close(gray.conv_stem.weight, model.conv_stem.weight.sum(1, keepdim=True))


def test_export_from_loopback_hub(effnet, hf_env):
    """publish -> timm.create_model('hf-hub:...', pretrained=True) downloads -> then works offline."""
    model, _, folder = effnet
    with HubServer(token=TOKEN) as hub:
        hf_env.set_endpoint(hub.url)
        publish(folder, HUB_ID)
        outputs_equal(timm.create_model(f'hf-hub:{HUB_ID}', pretrained=True), model)
        resolved = [p for m, p, _ in hub.requests if m in ('HEAD', 'GET') and '/resolve/' in p]
        assert f'/{HUB_ID}/resolve/main/model.safetensors' in resolved
        assert not hub.unhandled
    hf_env.set_offline()
    outputs_equal(timm.create_model(f'hf-hub:{HUB_ID}', pretrained=True), model)


def test_recorded_export_becomes_a_zoo_record(effnet, tmp_path):
    model, spec, folder = effnet
    record = ZooRecord.load(write_zoo_entry(folder, tmp_path))
    assert record.name == NAME and record.spec == json.loads(json.dumps(spec.to_dict()))
    assert record.weights_sha256 == file_sha256(folder / 'model.safetensors') and record.hf_hub_id == HUB_ID
    assert record.pretrained_cfg['pool_size'] == [7, 7] and record.top1 == 71.25


def test_local_dir_roundtrip_and_tamper(effnet, tmp_path):
    model, spec, folder = effnet
    outputs_equal(timm.create_model(f'local-dir:{folder}', pretrained=True), model)
    copy = tmp_path / 'copy'
    shutil.copytree(folder, copy)
    flip_one_byte(copy / 'model.safetensors')
    with pytest.raises(KpidWeightsError, match=r'kpid_pruned: pretrained weights .*copy/model\.safetensors fail'):
        timm.create_model(f'local-dir:{copy}', pretrained=True)


def test_a_broken_zoo_record_names_its_file(tmp_path):
    record = zoo_records[REL].to_dict()
    path = tmp_path / f'{REL}.json'
    path.write_text(json.dumps({k: v for k, v in record.items() if k != 'spec'}))
    with pytest.raises(ValueError, match=rf"{path}: not a kpid-zoo record \(missing \['spec'\]"):
        ZooRecord.load(path)
    path.write_text(json.dumps({**record, 'pretrained_cfg': {**record['pretrained_cfg'], 'pool_size': None}}))
    with pytest.raises(ValueError, match=rf"{path}: pretrained_cfg lacks \['pool_size'\]"):
        ZooRecord.load(path)
    path.write_text('{')
    with pytest.raises(ValueError, match=rf'{path}: not valid JSON'):
        ZooRecord.load(path)


def test_a_zoo_folder_holds_one_architecture_per_name(tmp_path):
    from kpid_zoo.zoo.records import load_records

    record = zoo_records[REL]
    record.save(tmp_path)
    dataclasses.replace(record, tag='kpid_r2', weights_sha256='1' * 64).save(tmp_path, default=False)
    assert [(r.name, r.tag) for r in load_records(tmp_path)] == [(REL, 'in1k'), (REL, 'kpid_r2')]  # default first
    group = next(iter(record.spec['widths']))
    spec = {**record.spec, 'widths': {**record.spec['widths'], group: record.spec['widths'][group] - 4}}
    dataclasses.replace(record, tag='kpid_r3', spec=spec).save(tmp_path, default=False)
    with pytest.raises(
        ValueError,
        match=rf'{tmp_path}/{REL}\.kpid_r3\.json: records a different architecture than '
        rf'{tmp_path}/{REL}\.json; one name is one architecture',
    ):
        load_records(tmp_path)
    (tmp_path / f'{REL}.kpid_r3.json').rename(tmp_path / 'kpid_other.json')
    with pytest.raises(ValueError, match=rf'kpid_other\.json: holds {REL}\.kpid_r3; a record file is named'):
        load_records(tmp_path)
    # a name is a file name and a timm name: kpid_*, nothing that reaches outside the zoo folder
    from kpid_zoo.zoo.records import record_for_zoo

    for name in ('../kpid_x', 'my_net'):
        with pytest.raises(ValueError, match=r'a zoo name is kpid_ then lower-case letters, digits and _'):
            record_for_zoo(dataclasses.replace(record, name=name), tmp_path)
