"""Data stage: CIFAR-10 tarball -> cache (atomic), ImageFolder errors, subsets, seeded augmentation, timm config."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from kpid_zoo.core.recipe import DataSpec
from kpid_zoo.training import cifar10 as kcifar10
from kpid_zoo.training.cifar10 import find_cifar10_tarball, prepare_cifar10
from kpid_zoo.training.data import (
    SeededTransformDataset,
    build_transforms,
    create_loaders,
    load_image_folder,
    resolve_data_settings,
    subset_indices,
)


def _jpeg_bytes(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='JPEG')
    return buf.getvalue()


def _write_folder(root: Path, classes=('cat', 'dog'), n=6) -> Path:
    for split in ('train', 'val'):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                (root / split / c / f'{i}.jpg').write_bytes(_jpeg_bytes(i))
    return root


def _tiny_cifar_tarball(path: Path) -> Path:
    """Same layout as the real tarball: cifar10-jpg/{train,test}/<class>/NNNN.jpg."""
    with tarfile.open(path, 'w:gz') as tf:
        for split in ('train', 'test'):
            for c in ('airplane', 'bird'):
                for i in range(3):
                    payload = _jpeg_bytes(i)
                    info = tarfile.TarInfo(f'cifar10-jpg/{split}/{c}/{i:04d}.jpg')
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope='module')
def cifar10_tree(cifar10_tarball, tmp_path_factory) -> Path:
    return prepare_cifar10(cifar10_tarball, cache_dir=tmp_path_factory.mktemp('cache'))


@pytest.mark.heavy
def test_real_cifar10_unpacked_and_loaded(cifar10_tree, cifar10_tarball, monkeypatch):
    assert sorted(p.name for p in (cifar10_tree / 'train').iterdir()) == [
        'airplane',
        'automobile',
        'bird',
        'cat',
        'deer',
        'dog',
        'frog',
        'horse',
        'ship',
        'truck',
    ]
    # second use: the cached tree is reused, the tarball is not opened again
    monkeypatch.setattr(kcifar10.tarfile, 'open', lambda *a, **k: pytest.fail('re-extracted'))
    assert prepare_cifar10(cifar10_tarball, cache_dir=cifar10_tree.parent) == cifar10_tree

    spec = DataSpec(
        dataset='cifar10',
        root=str(cifar10_tree),
        batch_size=16,
        workers=0,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.247, 0.2435, 0.2616),
        train_subset=64,
        val_subset=40,
    )
    bundle = create_loaders(spec, timm.create_model('resnet18', num_classes=10), input_size=(3, 32, 32), seed=0)
    assert bundle.num_classes == 10 and len(bundle.class_to_idx) == 10
    assert len(bundle.train_loader.dataset) == 64 and len(bundle.val_loader.dataset) == 40
    assert bundle.data_config['mean'] == (0.4914, 0.4822, 0.4465) and bundle.data_config['crop_pct'] == 1.0
    images, labels = next(iter(bundle.train_loader))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert labels.min() >= 0 and labels.max() < 10
    # a seeded random subset of a class-sorted folder spans many classes (the first 64 would be one class)
    train_targets = {bundle.train_loader.dataset.base.reader.samples[i][1] for i in bundle.train_loader.dataset.indices}
    assert len(train_targets) >= 5
    assert sum(len(y) for _, y in bundle.val_loader) == 40  # val keeps the last partial batch


def test_unpack_from_tarball_is_atomic(tmp_path, monkeypatch):
    tarball = _tiny_cifar_tarball(tmp_path / 'cifar10-jpg.tar.gz')
    cache = tmp_path / 'cache'

    def killed_midway(self, path, *a, **k):
        (Path(path) / 'cifar10-jpg' / 'train').mkdir(parents=True)
        raise KeyboardInterrupt  # the unpack dies half-way

    with monkeypatch.context() as m:
        m.setattr(tarfile.TarFile, 'extractall', killed_midway)
        with pytest.raises(KeyboardInterrupt):
            prepare_cifar10(tarball, cache_dir=cache)
    assert list(cache.iterdir()) == []  # no half-written tree under the final name, no temp left behind

    tree = prepare_cifar10(tarball, cache_dir=cache)
    assert tree == cache / 'cifar10-jpg'
    assert len(list((tree / 'test' / 'bird').glob('*.jpg'))) == 3
    assert [p.name for p in cache.iterdir()] == ['cifar10-jpg']


def test_missing_tarball_error_names_the_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nowhere' / 'cifar10-jpg.tar.gz')):
        find_cifar10_tarball(tmp_path / 'nowhere')
    monkeypatch.setenv('KPID_CIFAR10_TAR', str(tmp_path / 'env.tar.gz'))
    with pytest.raises(FileNotFoundError, match='env.tar.gz.*KPID_CIFAR10_TAR'):
        prepare_cifar10(cache_dir=tmp_path / 'cache')


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'train')):
        load_image_folder(tmp_path, 'train')
    (tmp_path / 'train').mkdir()
    (tmp_path / 'train' / 'loose.jpg').write_bytes(_jpeg_bytes(0))
    with pytest.raises(ValueError, match=f'no class folders in {tmp_path / "train"}'):
        load_image_folder(tmp_path, 'train')


def test_num_classes_mismatch_is_an_error(tmp_path):
    root = _write_folder(tmp_path / 'imgs')
    spec = DataSpec(dataset='imagefolder', root=str(root), batch_size=4, workers=0)  # num_classes defaults to 1000
    with pytest.raises(ValueError, match="num_classes=1000 but the 'train' split of .* has 2 classes"):
        create_loaders(spec, input_size=(3, 32, 32))


def test_imagefolder_loaders_and_pretrained_cfg_normalisation(tmp_path):
    root = _write_folder(tmp_path / 'imgs')
    model = timm.create_model('tf_efficientnet_lite0', num_classes=2)  # pretrained_cfg mean/std are 0.5
    spec = DataSpec(dataset='imagefolder', root=str(root), num_classes=2, batch_size=4, workers=0)
    bundle = create_loaders(spec, model, input_size=(3, 32, 32))
    assert bundle.data_config['mean'] == model.pretrained_cfg['mean'] == (0.5, 0.5, 0.5)
    assert bundle.class_to_idx == {'cat': 0, 'dog': 1}
    assert len(bundle.train_loader) == 3  # 12 images, batch 4, drop_last
    x, _ = next(iter(bundle.val_loader))
    assert x.shape == (4, 3, 32, 32)
    override = resolve_data_settings(model, DataSpec(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0)), (3, 32, 32))
    assert override['mean'] == (0.1, 0.2, 0.3)


def test_subset_indices_are_seeded():
    a, b, c = subset_indices(100, 10, seed=1), subset_indices(100, 10, seed=1), subset_indices(100, 10, seed=2)
    assert a == b and a != c and a == sorted(a) and len(set(a)) == 10
    assert subset_indices(100, 3, mode='first') == [0, 1, 2]
    assert subset_indices(100, None) is None and subset_indices(5, 10) is None
    with pytest.raises(ValueError, match='subset mode'):
        subset_indices(100, 3, mode='last')


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    root = _write_folder(tmp_path / 'imgs')
    config = resolve_data_settings(None, DataSpec(), (3, 32, 32))
    train_tf, _ = build_transforms(config)
    ds = SeededTransformDataset(load_image_folder(root, 'train'), train_tf, seed=0)
    torch.manual_seed(123)
    first = ds[3][0]
    torch.manual_seed(456)  # the global RNG does not matter ...
    torch.rand(10)
    assert torch.equal(ds[3][0], first)
    ds.set_epoch(1)  # ... the epoch does
    assert not torch.equal(ds[3][0], first)


def test_timm_create_dataset_source_and_gpu_loader_settings(tmp_path):
    """`torch/image_folder` goes through timm's create_dataset (torchvision's ImageFolder); the recipe's loader
    settings reach the DataLoader when there are workers, and the same images come out as from `imagefolder`."""
    root = _write_folder(tmp_path / 'imgs')
    model = timm.create_model('resnet18', num_classes=2)
    common = dict(
        root=str(root),
        num_classes=2,
        batch_size=4,
        workers=1,
        prefetch_factor=3,
        persistent_workers=False,
        val_split='val',
    )
    via_timm = create_loaders(DataSpec(dataset='torch/image_folder', **common), model, input_size=(3, 32, 32))
    native = create_loaders(DataSpec(dataset='imagefolder', **common), model, input_size=(3, 32, 32))
    assert via_timm.class_to_idx == native.class_to_idx == {'cat': 0, 'dog': 1}
    loader = via_timm.train_loader
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (1, 3, False)
    assert loader.pin_memory is torch.cuda.is_available()  # pinned only where there is a GPU to copy to
    (a, ya), (b, yb) = next(iter(via_timm.val_loader)), next(iter(native.val_loader))
    assert torch.equal(a, b) and torch.equal(ya, yb)


def test_dataset_without_a_known_class_count_needs_num_classes():
    from kpid_zoo.core.recipe import RecipeError

    with pytest.raises(RecipeError, match='num_classes: expected the class count of hfds/food101'):
        DataSpec(dataset='hfds/food101')
    assert DataSpec(dataset='hfds/food101', num_classes=101).val_split == 'validation'
