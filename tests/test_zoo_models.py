"""Every registered kpid_* name, checked the way timm's tests/test_models.py checks timm's models.

Plus, for the KPID authors' released models: the packaged spec is what `zoo_sources` reads off the installed
timm, it builds timm's pruned architecture tensor by tensor, and both compute the same outputs with the same
weights. Inputs are small (64 px) wherever the property does not depend on the resolution.
"""

from __future__ import annotations

import copy
import socket

import pytest
import timm
import torch
from timm.layers import get_graph_node_names
from timm.models._features_fx import GraphExtractNet

import kpid_zoo  # noqa: F401
from kpid_zoo.zoo.records import CFG_KEYS
from kpid_zoo.zoo.registry import zoo_records
from kpid_zoo.zoo.sources import RELEASES, spec_from_timm_pruned

NAMES = sorted(timm.list_models('kpid_*'))
# One name per family runs by default; the others share its module types and builder path (KPID_TEST_SLOW=1)
FAMILY_FIRST = ('kpid_effnet_b0', 'kpid_ecaresnet50d', 'kpid_pruned')
BY_FAMILY = [pytest.param(n, marks=() if n in FAMILY_FIRST else pytest.mark.slow) for n in NAMES]
SMALL = (3, 64, 64)
X = torch.randn(2, *SMALL, generator=torch.Generator().manual_seed(0))


def _exact(a, b) -> None:
    # the same modules, weights and input on one machine run the same kernels: outputs are bit-identical
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(scope='module')
def built():
    """Each name built once with no argument, online as far as huggingface_hub knows, with every socket refused."""
    from huggingface_hub import constants

    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f'test: no network ({address})')

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, 'HF_HUB_OFFLINE', False)
        mp.setattr(socket.socket, 'connect', refuse)
        mp.setattr(socket.socket, 'connect_ex', refuse)
        models = {name: timm.create_model(name).eval() for name in NAMES}
    return models, attempts


def test_every_name_builds_with_no_argument_and_no_network_call(built):
    models, attempts = built
    assert set(models) == set(NAMES) and len(NAMES) >= 6
    assert attempts == []


@pytest.mark.parametrize('name', NAMES)
def test_default_cfg_is_complete_and_true(built, name):
    model = built[0][name]
    cfg = model.pretrained_cfg
    for key in (
        'input_size',
        'pool_size',
        'crop_pct',
        'interpolation',
        'mean',
        'std',
        'first_conv',
        'classifier',
        'num_classes',
    ):
        assert cfg.get(key) is not None, key
    # like timm's test_model_default_cfgs: the final feature map at input_size is pool_size
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, *cfg['input_size']))
    assert tuple(out.shape[-2:]) == tuple(cfg['pool_size']) and out.shape[1] == model.num_features
    modules = dict(model.named_modules())
    assert modules[cfg['first_conv']].in_channels == cfg['input_size'][0]
    assert modules[cfg['classifier']].out_features == cfg['num_classes'] == model.num_classes
    assert modules[cfg['classifier']].in_features == model.num_features
    if name in zoo_records:  # the released weights' own preprocessing, test size included
        source = timm.models.get_pretrained_cfg(zoo_records[name].source_model).to_dict()
        assert {k: cfg.get(k) for k in CFG_KEYS} == {k: source.get(k) for k in CFG_KEYS}


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates(built, name):
    model = built[0][name]
    with torch.no_grad():
        final, inter = model.forward_intermediates(X)
        _exact(final, model.forward_features(X))
    assert [t.shape[1] for t in inter] == [i['num_chs'] for i in model.feature_info]
    assert [X.shape[-1] // t.shape[-1] for t in inter] == [i['reduction'] for i in model.feature_info]


@pytest.mark.parametrize('name', BY_FAMILY)
def test_features_only(built, name):
    model = built[0][name]
    with torch.no_grad():
        inter = model.forward_intermediates(X, intermediates_only=True)
    feats = timm.create_model(name, features_only=True).eval()
    # same weights, to compare the maps themselves (the getter dropped the head, so those tensors are left over)
    assert feats.model.load_state_dict(model.state_dict(), strict=False).missing_keys == []
    assert len(feats.feature_info) == len(model.feature_info)  # every level of the parent
    with torch.no_grad():
        for got, want in zip(feats(X), inter):
            _exact(got, want)


def test_features_only_of_a_four_level_parent():
    spec = dict(parent='starnet_s050', widths={}, input_size=list(SMALL))
    feats = timm.create_model('kpid_pruned', kpid_spec=spec, features_only=True).eval()
    assert len(feats.feature_info) == 4
    with torch.no_grad():
        assert [f.shape[1] for f in feats(X)] == feats.feature_info.channels()


@pytest.mark.parametrize('name', BY_FAMILY)
def test_classes_channels_pool_and_reset_classifier(built, name):
    model = timm.create_model(name, num_classes=10, in_chans=1, global_pool='max').eval()
    x = X[:, :1]
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        _exact(pooled, model.forward_features(x).amax((2, 3)))
    model = copy.deepcopy(built[0][name])
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(X).shape == (2, model.num_features)
    model.reset_classifier(5, 'avg')
    with torch.no_grad():
        assert model(X).shape == (2, 5)


@pytest.mark.parametrize('name', BY_FAMILY)
def test_torchscript_and_fx(built, name):
    model = built[0][name]
    with torch.no_grad():
        want = model(X)
        _exact(torch.jit.script(model)(X), want)
        fx = GraphExtractNet(model, [get_graph_node_names(model)[1][-1]])
        _exact(fx(X), want)


# ---------------------------------------------------------------------------------------------------------------
# The released models: our spec is timm's architecture


@pytest.mark.parametrize('release', RELEASES, ids=[r.name for r in RELEASES])
def test_released_model_is_timms_architecture_tensor_by_tensor(built, release):
    ours = copy.deepcopy(built[0][release.name])
    torch.manual_seed(1)
    theirs = timm.create_model(release.timm_model.split('.')[0]).eval()
    # the shipped spec is what the installed timm's _pruned/*.txt gives
    assert zoo_records[release.name].spec == spec_from_timm_pruned(release, theirs).to_dict()
    for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # fresh BNs are identities: a misplaced one would go unseen
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    mine, timms = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(timms)
    for key in mine:
        assert mine[key].shape == timms[key].shape, key
    ours.load_state_dict(timms)  # strict: timm's released files load as they are, no key remapping
    with torch.no_grad():
        _exact(ours(X), theirs(X))


def test_readme_and_model_cards_show_the_zoo(capsys):
    from export_utils import REPO_ROOT

    from kpid_zoo.cli import main
    from kpid_zoo.zoo.card import build_zoo_card

    assert main(['zoo', '--markdown']) == 0
    assert capsys.readouterr().out in (REPO_ROOT / 'README.md').read_text(encoding='utf-8')
    index = (REPO_ROOT / 'model_cards' / 'README.md').read_text(encoding='utf-8').splitlines()
    for name, record in zoo_records.items():
        card = (REPO_ROOT / 'model_cards' / name / 'README.md').read_text(encoding='utf-8')
        assert card == str(build_zoo_card(record)), f'{name}: rerun python -m kpid_zoo.zoo.sources'
        assert 'Aflalo et al., 2020' in card and record.source_model in card and f'{record.top1:.3f}' in card
        row = next(line for line in index if line.startswith(f'| [{name}]('))
        assert f'{record.gmacs:.3f} @ {record.input_size[-1]}' in row and f'{record.top1:.3f}' in row
