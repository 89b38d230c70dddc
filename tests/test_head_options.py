"""timm's head options on every registered kpid_* name, as timm's own models take them.

Every combination of num_classes (default, 0, 10), global_pool ('', 'avg', 'max', 'avgmax') and in_chans (1, 3)
builds on every name (and on kpid_pruned with its default spec), and wherever timm's own parent runs with the same
options, the pruned net runs too and gives an output of the parent's shape with its channels the pruned net's
own width. Inputs are 64 px: the head does not depend on the resolution. Builds reuse the parent's trace
(`surgery._spec_groups`); what is left is each build's fresh init of the parent.
"""

from __future__ import annotations

import itertools

import pytest
import timm
import torch

import kpid_zoo  # noqa: F401
from kpid_zoo.zoo.registry import DEFAULT_SPEC, zoo_records

NAMES = sorted(timm.list_models('kpid_*'))
CLASSES = (None, 0, 10)  # None: the name's default (1000)
POOLS = ('', 'avg', 'max', 'avgmax')
CHANS = (1, 3)
COMBOS = list(itertools.product(CLASSES, POOLS, CHANS))


def _spec(name: str) -> dict:
    return DEFAULT_SPEC if name == 'kpid_pruned' else zoo_records[name].spec


def _options(num_classes, global_pool, in_chans) -> dict:
    classes = {} if num_classes is None else {'num_classes': num_classes}
    return dict(global_pool=global_pool, in_chans=in_chans, **classes)


_trunks: dict = {}
_heads: dict = {}


def _parent(name: str, **options):
    """timm's own parent of `name` built with `options`, constructed on the meta device and given uninitialised CPU
    memory (`to_empty`): timm's model with those options, for its shapes, without the cost of a random init."""
    spec = _spec(name)
    with torch.device('meta'):
        model = timm.create_model(spec['parent'], **(spec.get('parent_kwargs') or {}), **options)
    return model.to_empty(device='cpu').eval()


def parent_output(name: str, combo: tuple) -> tuple | None:
    """The output shape of timm's own parent of `name`, built with the same options, on a 64 px batch; None where
    timm's model does not run with them (a classifier on an unpooled map).

    timm's CNNs compute forward(x) as forward_head(forward_features(x)), and the options are head options but
    in_chans, which changes only the stem's input channels: so the parent's trunk output is computed once per name,
    and each (num_classes, global_pool) builds timm's parent with those options and runs its head on it."""
    num_classes, global_pool, _ = combo
    if name not in _trunks:
        with torch.no_grad():
            _trunks[name] = _parent(name).forward_features(torch.zeros(2, 3, 64, 64))
    if (name, num_classes, global_pool) not in _heads:
        model = _parent(name, **_options(num_classes, global_pool, 3))
        try:
            with torch.no_grad():
                shape = tuple(model.forward_head(_trunks[name]).shape)
        except RuntimeError:  # timm's Linear on a 4-d map: mat1 and mat2 shapes cannot be multiplied
            shape = None
        _heads[(name, num_classes, global_pool)] = shape
    return _heads[(name, num_classes, global_pool)]


@pytest.mark.parametrize('combo', COMBOS, ids=['-'.join(map(str, c)) for c in COMBOS])
@pytest.mark.parametrize('name', NAMES)
def test_head_options_build_and_run_where_timms_parent_runs(name, combo):
    num_classes, global_pool, in_chans = combo
    model = timm.create_model(name, **_options(*combo)).eval()
    # the options hold as timm's own models hold them
    assert model.num_classes == (1000 if num_classes is None else num_classes)
    assert model.global_pool.pool_type == global_pool
    first_conv = model.get_submodule(model.pretrained_cfg['first_conv'])
    assert first_conv.in_channels == in_chans
    # the trunk is the name's pruned architecture, whatever the head: its width is the default build's
    assert model.num_features == _default(name).num_features
    expected = parent_output(name, combo)
    x = torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if expected is None:  # timm's parent cannot run this head either: the trunk still does
            assert model.forward_features(x).shape[1] == model.num_features
            return
        out = model(x)
    channels = model.num_features if num_classes == 0 else model.num_classes
    assert out.shape == (*expected[:1], channels, *expected[2:])  # the parent's shape with the pruned widths
    if num_classes != 0:
        assert out.shape == expected  # logits: the parent's shape exactly


_defaults: dict = {}


def _default(name: str):
    if name not in _defaults:
        _defaults[name] = timm.create_model(name)
    return _defaults[name]


def test_a_headless_feature_extractor_is_the_pruned_trunk_pooled():
    """num_classes=0 (the most common use): the pooled features of the very architecture the name registers."""
    model = timm.create_model('kpid_ecaresnet50d', num_classes=0).eval()
    full = timm.create_model('kpid_ecaresnet50d').eval()
    full.load_state_dict(model.state_dict(), strict=False)  # the same trunk weights; the classifier stays full's
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), full.forward_head(full.forward_features(x), pre_logits=True), rtol=0, atol=0
        )
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in full.state_dict().items() if not k.startswith('fc.')
    }
