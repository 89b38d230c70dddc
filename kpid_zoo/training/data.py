"""Data stage: timm datasets, transforms and loaders for ImageFolder trees, CIFAR-10 (found, downloaded and
unpacked by `kpid_zoo.training.cifar10`), the map-style sources timm's `create_dataset` reads (`hfds/<name>`
Hugging Face datasets, `torch/<name>`), and WebDataset shards (`wds/<name>`, streamed:
`kpid_zoo.training.streams`).

Everything goes through `timm.data` (`create_dataset`, `resolve_data_config`, `create_transform`); loaders are
plain `torch.utils.data.DataLoader`s so that Accelerate can shard and seed them (`accelerator.prepare`), with
the settings a GPU run needs from the recipe (pinned memory, persistent workers, prefetch).

Augmentation is a pure function of (seed, epoch, sample index): each sample is transformed under a private RNG
seeded from those three numbers. That is what makes a resumed run and a 2-process run see exactly the same pixels
as an uninterrupted single-process run, independent of worker count and of how many batches were pre-fetched.
A stream source cannot be indexed: it shards itself and seeds augmentation by (seed, epoch, sample key) instead,
and its sample order depends on the process and worker counts (the contract is in `kpid_zoo.training.streams`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.data as tud
from PIL import Image
from timm.data import ImageDataset, create_dataset, create_transform, resolve_data_config
from timm.data.readers.shared_count import SharedCount

from ..core.datasource import UnreadableImageError
from ..core.recipe import DataSpec
from ..core.seeds import stable_seed
from ..errors import MissingFileError, UserError
from .cifar10 import CIFAR10_CLASSES, CIFAR10_OFFICIAL_DIRNAME, Cifar10Source, resolve_cifar10
from .streams import ShardStream, is_stream, seeded_call, split_shards

# timm's ImageNet default (scale 0.08..1) destroys 32 px images; CIFAR keeps most of the frame.
_TRAIN_SCALE = {'imagefolder': (0.08, 1.0), 'cifar10': (0.6, 1.0)}
_DEFAULT_CROP_PCT = {'cifar10': 1.0}  # images are already at the training resolution: no centre-crop border


@dataclass
class DataBundle:
    """What the data stage hands to training and evaluation."""

    train_loader: tud.DataLoader
    val_loader: tud.DataLoader
    data_config: dict  # timm data config actually used: input_size, mean, std, interpolation, crop_pct
    class_to_idx: dict
    num_classes: int
    source: str | None = None  # which copy of the data, where that matters (CIFAR-10: JPEG or official)
    source_path: Path | None = None  # and where it was read from


def load_cifar10_split(source: Cifar10Source, split: str):
    """The untransformed split `train` or `test` of `source`, classes in CIFAR-10's order (the JPEG tree's
    sorted folder names are the same order)."""
    if source.kind == 'jpeg':
        return load_image_folder(source.path, split)
    from torchvision.datasets import CIFAR10

    if split not in ('train', 'test'):
        raise UserError(f"data split {split!r}: the official CIFAR-10 has the splits 'train' and 'test'")
    folder = source.path / CIFAR10_OFFICIAL_DIRNAME
    try:
        # torchvision checks each file against its published md5 before it reads (unpickles) any of them
        dataset = CIFAR10(str(source.path), train=split == 'train', download=False)
    except RuntimeError:
        raise UserError(
            f'{folder}: a file is missing or does not have its published md5 (expected the official '
            f'CIFAR-10 python version; remove the folder to download it again)'
        ) from None
    if tuple(dataset.classes) != CIFAR10_CLASSES:
        raise UserError(f"{folder}: classes {dataset.classes} are not CIFAR-10's {list(CIFAR10_CLASSES)}")
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


class SeededTransformDataset(tud.Dataset):
    """Wraps a timm dataset: optional index subset + a transform run under an RNG seeded by (seed, epoch, index).

    `set_epoch` is called by Accelerate's prepared loaders (`DataLoaderShard.set_epoch`) every epoch. The epoch
    lives in shared memory: persistent loader workers keep the dataset they were started with, and would
    otherwise augment every epoch as the one they started in.
    """

    def __init__(
        self, base: tud.Dataset, transform: Callable | None, indices: Sequence[int] | None = None, seed: int = 0
    ):
        self.base = base
        self.transform = transform
        self.indices = list(indices) if indices is not None else None
        self.seed = seed
        self._epoch = SharedCount(0)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def __getitem__(self, index: int):
        base_index = self.indices[index] if self.indices is not None else index
        img, target = load_sample(self.base, base_index)
        if self.transform is not None:
            # timm/torchvision transforms draw from both python `random` and torch's global RNG.
            img = seeded_call(self.transform, img, stable_seed(self.seed, self.epoch, base_index))
        return img, target


def load_sample(base: tud.Dataset, index: int):
    """`base[index]`, except that an image that cannot be read or decoded raises `UnreadableImageError` naming
    its file. timm's `ImageDataset` would log a warning and return the next image in its place: an evaluation
    would score (and count) that neighbour twice, a training would see it twice. Failing is the honest outcome:
    a metric over another set of images is not the metric asked for."""
    if not isinstance(base, ImageDataset) or base.load_bytes or base.additional_features is not None:
        return base[index]
    source = None
    try:
        source, target, *_ = base.reader[index]
        img = Image.open(source)
        if base.input_img_mode:
            img = img.convert(base.input_img_mode)  # decodes the pixels: a truncated file fails here
        else:
            img.load()
    except Exception as e:  # PIL raises OSError, but also ValueError/SyntaxError/struct.error on some damage
        try:
            name = base.filename(index, absolute=True)
        except Exception:  # a reader that cannot name its samples
            name = f'sample {index}'
        raise UnreadableImageError(f'{name}: cannot read the image ({type(e).__name__}: {e})') from None
    finally:
        if hasattr(source, 'close'):
            source.close()
    if base.transform is not None:
        img = base.transform(img)
    if target is None:
        target = -1
    elif base.target_transform is not None:
        target = base.target_transform(target)
    return img, target


def subset_indices(n_total: int, n_keep: int | None, seed: int = 0, mode: str = 'random') -> list | None:
    """First / seeded-random `n_keep` indices (sorted) of `n_total`; None when no subset is asked for."""
    if not n_keep or n_keep >= n_total:
        return None
    if mode == 'first':
        return list(range(n_keep))
    if mode != 'random':
        raise ValueError(f"subset mode must be 'first' or 'random', got {mode!r}")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=g)[:n_keep].tolist())


def load_image_folder(root: str | os.PathLike, split: str):
    """timm folder dataset for `root/split/<class>/*.jpg`, with errors that name the path."""
    split_dir = Path(root).expanduser() / split
    if not split_dir.is_dir():
        raise MissingFileError(f'dataset split folder not found: {split_dir} (expected {split_dir}/<class>/<image>)')
    if not any(p.is_dir() for p in split_dir.iterdir()):
        raise UserError(f'no class folders in {split_dir} (expected ImageNet layout {split_dir}/<class>/<image>)')
    # timm's search_split would silently fall back to `root` for a missing split; we checked it exists above.
    try:
        return create_dataset('', root=str(split_dir), split=split, search_split=False)
    except RuntimeError as e:  # timm's "Found 0 images in subfolders of ..."
        raise UserError(
            f'no images in the class folders of {split_dir} (expected {split_dir}/<class>/<image> '
            f'with a .jpg, .jpeg or .png image; timm says: {e})'
        ) from None


def folder_samples(split_dir: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(image path, class index) of an ImageFolder split and its class names, in timm's class order."""
    dataset = load_image_folder(Path(split_dir).parent, Path(split_dir).name)
    reader = dataset.reader
    names = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
    return [(str(p), int(t)) for p, t in reader.samples], names


def resolve_data_settings(
    model: torch.nn.Module | None, data: DataSpec, input_size: Sequence[int] | None = None
) -> dict:
    """timm data config from the model's pretrained_cfg, overridden by the recipe's data section and input size."""
    args = {}
    if input_size is not None:
        args['input_size'] = tuple(input_size)
    config = (
        resolve_data_config(args, model=model)
        if model is not None
        else resolve_data_config(args, pretrained_cfg={'input_size': tuple(input_size or (3, 224, 224))})
    )
    if data.mean is not None:
        config['mean'] = tuple(data.mean)
    if data.std is not None:
        config['std'] = tuple(data.std)
    config['crop_pct'] = (
        data.crop_pct if data.crop_pct is not None else _DEFAULT_CROP_PCT.get(data.dataset, config['crop_pct'])
    )
    return config


def build_transforms(config: dict, dataset: str = 'imagefolder', train_aug: bool = True):
    """(train, eval) timm transforms. `train_aug=False` gives the eval transform for both (debugging, exactness)."""
    eval_tf = create_transform(
        config['input_size'],
        is_training=False,
        interpolation=config['interpolation'],
        mean=config['mean'],
        std=config['std'],
        crop_pct=config['crop_pct'],
        crop_mode=config.get('crop_mode'),
    )
    if not train_aug:
        return eval_tf, eval_tf
    train_tf = create_transform(
        config['input_size'],
        is_training=True,
        scale=_TRAIN_SCALE.get(dataset, _TRAIN_SCALE['imagefolder']),
        hflip=0.5,
        color_jitter=0.0 if dataset == 'cifar10' else 0.4,
        interpolation=config['interpolation'],
        mean=config['mean'],
        std=config['std'],
    )
    return train_tf, eval_tf


def _class_to_idx(dataset) -> dict:
    reader = getattr(dataset, 'reader', None)
    return dict(getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None) or {})


def load_split(data: DataSpec, split: str, cache_dir: str | os.PathLike | None = None, progress: bool = False):
    """The untransformed dataset of one split of the recipe's data source."""
    if data.dataset == 'cifar10':
        return load_cifar10_split(resolve_cifar10(data.root, cache_dir, progress), split)
    if data.dataset == 'imagefolder':
        if not data.root:
            raise UserError("data.root is required for dataset 'imagefolder'")
        return load_image_folder(data.root, split)
    # hfds/<name>, torch/<name>: timm's create_dataset (map-style, so Accelerate can shard and seed them)
    return create_dataset(
        data.dataset, root=data.root, split=split, is_training=False, download=data.download, trust_remote_code=False
    )


def create_loaders(
    data: DataSpec,
    model: torch.nn.Module | None = None,
    input_size: Sequence[int] | None = None,
    seed: int = 0,
    train_aug: bool = True,
    subset_mode: str = 'random',
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> DataBundle:
    """Train/val loaders from the recipe's `data` section (`batch_size` is per process).

    Mean/std/interpolation default to `model.pretrained_cfg` via `timm.data.resolve_data_config`. `progress`:
    bars for a download or an unpack (shown by the launch's first process only).
    """
    progress = progress and os.environ.get('LOCAL_RANK', '0') == '0'
    config = resolve_data_settings(model, data, input_size)
    train_tf, eval_tf = build_transforms(config, data.dataset, train_aug)
    loader_args = dict(
        batch_size=data.batch_size, num_workers=data.workers, pin_memory=data.pin_memory and torch.cuda.is_available()
    )
    if data.workers > 0:  # DataLoader rejects these without worker processes
        loader_args.update(persistent_workers=data.persistent_workers, prefetch_factor=data.prefetch_factor)
    if data.is_stream:
        train_ds, val_ds = stream_datasets(data, train_tf, eval_tf, seed)
        # no shuffle: the stream orders itself; drop_last: its quotas are whole batches anyway
        return DataBundle(
            tud.DataLoader(train_ds, drop_last=True, **loader_args),
            tud.DataLoader(val_ds, drop_last=False, **loader_args),
            config,
            {},
            data.num_classes,
        )

    source, source_path = None, None
    if data.dataset == 'cifar10':
        cifar10 = resolve_cifar10(data.root, cache_dir, progress)
        train_base, val_base = (load_cifar10_split(cifar10, split) for split in (data.train_split, data.val_split))
        source, source_path = cifar10.label, cifar10.folder
    else:
        train_base, val_base = (load_split(data, split, cache_dir) for split in (data.train_split, data.val_split))
    class_to_idx = _class_to_idx(train_base)
    if class_to_idx:
        if _class_to_idx(val_base) and _class_to_idx(val_base) != class_to_idx:
            raise ValueError(
                f'classes differ between the {data.train_split!r} and {data.val_split!r} splits of '
                f'{data.root or data.dataset}'
            )
        if data.num_classes != len(class_to_idx):
            raise ValueError(
                f'data.num_classes={data.num_classes} but the {data.train_split!r} split of '
                f'{data.root or data.dataset} has {len(class_to_idx)} classes'
            )

    train_ds = SeededTransformDataset(
        train_base, train_tf, subset_indices(len(train_base), data.train_subset, seed, subset_mode), seed
    )
    val_ds = SeededTransformDataset(
        val_base, eval_tf, subset_indices(len(val_base), data.val_subset, seed + 1, subset_mode), seed
    )
    # drop_last on train keeps every optimizer step at the same global batch (needed for multi-process equivalence)
    train_loader = tud.DataLoader(train_ds, shuffle=True, drop_last=True, **loader_args)
    val_loader = tud.DataLoader(val_ds, shuffle=False, drop_last=False, **loader_args)
    return DataBundle(train_loader, val_loader, config, class_to_idx, data.num_classes, source, source_path)


def stream_datasets(
    data: DataSpec, train_tf: Callable, eval_tf: Callable, seed: int
) -> tuple[ShardStream, ShardStream]:
    """(train, val) `ShardStream`s of a stream source; unbound (1 process) until `prepare_loader` binds them."""
    train_shards, train_total = split_shards(
        data.dataset, data.root, data.train_split, data.train_samples, 'data.train_samples'
    )
    val_shards, val_total = split_shards(data.dataset, data.root, data.val_split)  # read to the end: no count needed
    return (
        ShardStream(
            train_shards,
            train_total,
            data.batch_size,
            train_tf,
            True,
            seed,
            data.shuffle_buffer,
            f'{data.dataset} ({data.train_split})',
        ),
        ShardStream(
            val_shards,
            val_total,
            data.batch_size,
            eval_tf,
            False,
            seed,
            data.shuffle_buffer,
            f'{data.dataset} ({data.val_split})',
        ),
    )


# ---------------------------------------------------------------------------------------------------------------
# Loaders on an Accelerator


def prepare_loader(accelerator, loader: tud.DataLoader) -> tud.DataLoader:
    """`accelerator.prepare_data_loader(loader)` for a map-style loader (Accelerate shards it). A stream shards
    itself: it is bound to this process and prepared as a 1-process loader, which places batches on the device
    and tracks the end of the epoch for gradient accumulation, but neither re-shards nor dispatches."""
    if not is_stream(loader):
        return accelerator.prepare_data_loader(loader)
    from accelerate.data_loader import prepare_data_loader

    bound = loader.dataset.for_process(accelerator.num_processes, accelerator.process_index)
    args = dict(
        batch_size=loader.batch_size,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        collate_fn=loader.collate_fn,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
    )
    if loader.num_workers > 0:
        args.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
    return prepare_data_loader(
        tud.DataLoader(bound, **args),
        accelerator.device,
        num_processes=1,
        process_index=0,
        put_on_device=accelerator.device_placement,
        dispatch_batches=False,
        non_blocking=accelerator.non_blocking,
    )


def skip_first_batches(accelerator, loader: tud.DataLoader, batches: int) -> tud.DataLoader:
    """The prepared `loader` without the first `batches` batches of its current epoch (a resumed run)."""
    if not is_stream(loader):
        return accelerator.skip_first_batches(loader, batches)
    loader.dataset.skip_batches(batches)  # skipped in the stream, before decoding
    return loader


def loader_layout(loader) -> dict | None:
    """What a stream's sample order depends on besides the seed (None for a map-style loader, whose order does
    not depend on the worker count)."""
    if not is_stream(loader):
        return None
    return {'processes': loader.dataset.num_processes, 'workers': loader.num_workers}


def first_image_shape(dataset) -> tuple:
    """Shape of the first (transformed) image of a dataset, map-style or stream."""
    sample = next(iter(dataset)) if isinstance(dataset, tud.IterableDataset) else dataset[0]
    return tuple(sample[0].shape)
