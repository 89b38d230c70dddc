"""`import kpid_zoo` registers the zoo in timm; pretrained loads come from the HF cache / a loopback Hub, checked."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch

import kpid_zoo  # noqa: F401
from kpid_zoo import registry
from kpid_zoo.export import file_sha256, write_zoo_entry
from kpid_zoo.publish import publish
from kpid_zoo.registry import ZOO_ENTRIES, KpidWeightsError

from export_utils import REPO_ROOT, export_pruned, hf_env, pruned_spec, zoo_recipe  # noqa: F401  (fixture)
from hub_server import HubServer, git_blob_sha1

NAME = 'kpid_effnet_b0'
HUB_ID = f'kpid-zoo/{NAME}'
X = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def effnet(tmp_path_factory):
    """A real kpid_effnet_b0-shaped export: efficientnet_b1 cut to a quarter width, random weights."""
    spec = pruned_spec('efficientnet_b1', 0.25, input_size=(3, 96, 96))  # channels do not depend on H, W: trace small
    model, folder = export_pruned(tmp_path_factory.mktemp('zoo') / NAME, spec, zoo_recipe(NAME), name=NAME,
                                  num_classes=1000)
    return model, spec, folder


@pytest.fixture
def zoo_dir(tmp_path, monkeypatch):
    path = tmp_path / 'zoo'
    path.mkdir()
    monkeypatch.setattr(registry, 'ZOO_DIR', path)
    return path


def populate_hf_cache(cache_dir: Path, repo_id: str, folder: Path, files=('config.json', 'model.safetensors')) -> Path:
    """The layout hf_hub_download writes: blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/main."""
    storage = cache_dir / f"models--{repo_id.replace('/', '--')}"
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
    snaps = list((cache_dir / f"models--{repo_id.replace('/', '--')}" / 'snapshots').glob(f'*/{name}'))
    assert len(snaps) == 1
    return snaps[0].resolve()


def flip_one_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def outputs_equal(a, b) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(X), b(X), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------

def test_zoo_is_registered_timm_style():
    names = set(timm.list_models('kpid_*'))
    assert names == set(ZOO_ENTRIES) | {'kpid_pruned'}
    assert set(timm.list_models('kpid_*', pretrained=True)) == set(ZOO_ENTRIES)
    for name, entry in ZOO_ENTRIES.items():
        cfg = timm.models.get_pretrained_cfg(name)
        parent = timm.models.get_pretrained_cfg(entry.parent)
        assert cfg.hf_hub_id == f'kpid-zoo/{name}' and cfg.paper_ids == 'arXiv:2002.08258'
        assert cfg.license == 'apache-2.0' and cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000
        assert (cfg.first_conv, cfg.classifier, cfg.interpolation) == (
            parent.first_conv, parent.classifier, parent.interpolation)


@pytest.mark.parametrize('name', sorted(ZOO_ENTRIES))
def test_every_entry_has_its_recipe(name):
    recipe, entry = zoo_recipe(name), ZOO_ENTRIES[name]
    cfg = timm.models.get_pretrained_cfg(name)
    assert recipe.name == name
    assert recipe.parent.model == entry.parent
    assert recipe.hub.repo_id == cfg.hf_hub_id
    assert recipe.flops.target_gmacs == entry.target_gmacs
    assert tuple(recipe.input_size) == cfg.input_size
    assert recipe.data.crop_pct == cfg.crop_pct
    assert tuple(recipe.data.mean) == cfg.mean and tuple(recipe.data.std) == cfg.std
    assert recipe.data.dataset == 'imagefolder' and recipe.data.num_classes == cfg.num_classes


def test_every_imagenet_recipe_is_an_entry():
    from kpid_zoo.recipe import load_recipe
    for path in sorted((REPO_ROOT / 'recipes').glob('*.yaml')):
        recipe = load_recipe(path)
        if recipe.data.dataset == 'imagefolder':
            assert recipe.name in ZOO_ENTRIES, f'{path.name}: an ImageNet zoo recipe with no registry entry'


def test_no_spec_yet_is_a_clear_error(hf_env, zoo_dir):
    hf_env.set_offline()
    with pytest.raises(RuntimeError, match=rf'{NAME} has no architecture spec yet.*kpid-zoo build recipes/{NAME}\.yaml'):
        timm.create_model(NAME)
    with pytest.raises(ValueError, match='kpid_pruned needs kpid_spec'):
        timm.create_model('kpid_pruned')


def test_pretrained_from_offline_cache_with_zoo_record(effnet, hf_env, zoo_dir):
    model, spec, folder = effnet
    write_zoo_entry(folder, zoo_dir)
    populate_hf_cache(hf_env.cache_dir, HUB_ID, folder, files=('model.safetensors',))
    hf_env.set_offline()
    loaded = timm.create_model(NAME, pretrained=True)
    outputs_equal(loaded, model)
    assert loaded.pretrained_cfg['hf_hub_id'] == HUB_ID and loaded.pretrained_cfg['crop_pct'] == 0.875

    # random init without pretrained needs no weights, only the spec
    assert timm.create_model(NAME).num_features == model.num_features


def test_pretrained_from_offline_cache_spec_from_hub_config(effnet, hf_env, zoo_dir):
    model, _, folder = effnet
    populate_hf_cache(hf_env.cache_dir, HUB_ID, folder)
    hf_env.set_offline()
    outputs_equal(timm.create_model(NAME, pretrained=True), model)
    outputs_equal(timm.create_model(f'hf-hub:{HUB_ID}', pretrained=True), model)


def test_tampered_cache_fails_the_sha256_check(effnet, hf_env, zoo_dir):
    _, _, folder = effnet
    write_zoo_entry(folder, zoo_dir)
    populate_hf_cache(hf_env.cache_dir, HUB_ID, folder)
    hf_env.set_offline()
    blob = cached_blob(hf_env.cache_dir, HUB_ID, 'model.safetensors')
    expected = file_sha256(blob)
    flip_one_byte(blob)
    for name in (NAME, f'hf-hub:{HUB_ID}'):
        with pytest.raises(KpidWeightsError) as err:
            timm.create_model(name, pretrained=True)
        msg = str(err.value)
        assert msg.startswith(('kpid_effnet_b0:', 'kpid_pruned:')) and 'model.safetensors' in msg
        assert f'expected {expected}, got {file_sha256(blob)}' in msg


def test_spec_that_does_not_fit_the_weights_names_the_tensor(effnet, hf_env, zoo_dir):
    _, spec, folder = effnet
    record = json.loads(write_zoo_entry(folder, zoo_dir).read_text())
    group = next(iter(record['spec']['widths']))
    record['spec']['widths'][group] += 4
    (zoo_dir / f'{NAME}.json').write_text(json.dumps(record))
    populate_hf_cache(hf_env.cache_dir, HUB_ID, folder, files=('model.safetensors',))
    hf_env.set_offline()
    with pytest.raises(KpidWeightsError, match=rf"{NAME}: .*model\.safetensors does not fit the architecture: "
                                               rf"tensor '{group}\.weight' has shape"):
        timm.create_model(NAME, pretrained=True)


def test_adaptations_features_classes_channels(effnet, hf_env, zoo_dir):
    model, _, folder = effnet
    write_zoo_entry(folder, zoo_dir)
    populate_hf_cache(hf_env.cache_dir, HUB_ID, folder, files=('model.safetensors',))
    hf_env.set_offline()

    feats = timm.create_model(NAME, pretrained=True, features_only=True).eval()
    with torch.no_grad():
        outs = feats(X)
        ref = model.forward_intermediates(X, intermediates_only=True)
    assert [o.shape[1] for o in outs] == feats.feature_info.channels() == [r.shape[1] for r in ref]
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=0, atol=0)

    seven = timm.create_model(NAME, pretrained=True, num_classes=7).eval()
    with torch.no_grad():
        assert seven(X).shape == (1, 7)
        torch.testing.assert_close(seven.forward_features(X), model.forward_features(X), rtol=0, atol=0)

    gray = timm.create_model(NAME, pretrained=True, in_chans=1).eval()
    with torch.no_grad():
        assert gray(X[:, :1]).shape == (1, 1000)
    torch.testing.assert_close(gray.conv_stem.weight, model.conv_stem.weight.sum(1, keepdim=True))


def test_pretrained_from_loopback_hub(effnet, hf_env, zoo_dir):
    """publish -> timm.create_model(name, pretrained=True) downloads via hf_hub_id -> then works offline."""
    model, _, folder = effnet
    from export_utils import TOKEN
    with HubServer(token=TOKEN) as hub:
        hf_env.set_endpoint(hub.url)
        publish(folder, HUB_ID)
        outputs_equal(timm.create_model(NAME, pretrained=True), model)  # spec from the Hub's config.json
        outputs_equal(timm.create_model(f'hf-hub:{HUB_ID}', pretrained=True), model)
        resolved = [p for m, p, _ in hub.requests if m in ('HEAD', 'GET') and '/resolve/' in p]
        assert f'/{HUB_ID}/resolve/main/model.safetensors' in resolved
        assert not hub.unhandled
    hf_env.set_offline()
    outputs_equal(timm.create_model(NAME, pretrained=True), model)

    flip_one_byte(cached_blob(hf_env.cache_dir, HUB_ID, 'model.safetensors'))
    with pytest.raises(KpidWeightsError, match=rf'{NAME}: pretrained weights .*model\.safetensors fail the sha256'):
        timm.create_model(NAME, pretrained=True)


def test_local_dir_and_reexport_roundtrip(effnet, tmp_path):
    model, spec, folder = effnet
    local = timm.create_model(f'local-dir:{folder}', pretrained=True)
    outputs_equal(local, model)
    # a model loaded from an export exports again with the same spec (model_args carry kpid_spec through)
    copy = tmp_path / 'copy'
    shutil.copytree(folder, copy)
    flip_one_byte(copy / 'model.safetensors')
    with pytest.raises(KpidWeightsError, match=r'kpid_pruned: pretrained weights .*copy/model\.safetensors fail'):
        timm.create_model(f'local-dir:{copy}', pretrained=True)
