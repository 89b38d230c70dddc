"""`kpid-zoo build RECIPE --dry-run`: every stage of a recipe, a few steps each, on stand-in data, then the plan
of what the real run needs.

The cluster recipes cannot run here (no ImageNet, no GPUs, no Hub), but their code path must not fail there.
A dry run keeps everything of the recipe that decides which code runs -- parent architecture, input size, class
count, FLOPs target, importance method, precision, accumulation, distillation weights -- and swaps what only
decides how long it runs:

* data: a generated ImageFolder with the recipe's class count and input size (one random JPEG per class),
  written as WebDataset shards for a stream recipe (`wds/<name>`), so that the stream path runs too;
* parent weights: random init (`weights: none`), so no download;
* schedule: a few optimizer steps per training stage, a checkpoint after each; one batch of Taylor scores;
  one image per process a step (`standin_batch`), or two where one would leave a BatchNorm a single value per
  channel to normalise (which the real run's larger batch does not).

Run it under the launcher a cluster uses, e.g. `accelerate launch --multi_gpu --num_processes 2 -m kpid_zoo.cli
build RECIPE --dry-run` (on a CPU-only machine too: the processes join over gloo; without `--multi_gpu` accelerate
starts a single process there): pruning on the main process, sharded evaluation and DDP training on all. It ends with a
`RunPlan`: steps per epoch and in all, checkpoints written, and the disk they, the stage results and the export
take -- sizes measured on the dry run's own files, which have the real architecture's shapes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from .core.files import WEIGHTS_FILE
from .core.recipe import Recipe, load_recipe
from .training.accelerator import process_accelerator

STEPS_PER_STAGE = 3  # optimizer steps of each training stage in a dry run: enough to checkpoint and resume
STANDIN_BATCH = 1  # per process: the stages' code paths at the least compute (bf16 on a CPU without it is slow)
STANDIN_TRAIN_SHARDS = 2  # per process, for a stream recipe: each process reads past a shard boundary
KNOWN_TRAIN_SIZES = {('imagefolder', 1000): ('ImageNet-1k', 1_281_167), ('cifar10', 10): ('CIFAR-10', 50_000)}


def standin_images(
    root: Path, num_classes: int, input_size: tuple[int, int, int], per_class: int = 1, seed: int = 0
) -> Path:
    """`root/{train,val}/cNNNN/I.jpg`: `per_class` random images per class and split, at the recipe's input size."""
    if (root / 'done').exists():
        return root
    rng = np.random.default_rng(seed)
    channels, height, width = input_size
    mode = {1: 'L', 3: 'RGB'}.get(channels)
    if mode is None:
        raise ValueError(f'input_size: a dry run makes 1- or 3-channel JPEGs, got {channels} channels')
    for split in ('train', 'val'):
        for c in range(num_classes):
            folder = root / split / f'c{c:04d}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
                    folder / f'{i}.jpg', quality=90
                )
    (root / 'done').write_text('')
    return root


def standin_batch(recipe: Recipe) -> int:
    """Images per process in a step of the dry run: STANDIN_BATCH, unless a BatchNorm of the parent would then
    normalise a single value per channel in training, which torch refuses ("Expected more than 1 value per
    channel"): a 32 px ResNet's last stage is 1x1, so one image gives it one value. There the dry run takes the
    fewest images that give every BatchNorm more -- never more than the real run's data.batch_size, so a real
    batch too small to train fails the dry run as it would fail the real run."""
    num_classes = recipe.parent.num_classes or recipe.data.num_classes
    return min(recipe.data.batch_size, _least_batch(recipe.parent.model, tuple(recipe.input_size), num_classes))


@cache
def _least_batch(arch: str, input_size: tuple[int, int, int], num_classes: int) -> int:
    """The least batch >= STANDIN_BATCH at which each BatchNorm of `arch` sees more than one value per channel
    (batch x its input's spatial size), from a forward pass on the meta device: shapes only, no memory, no compute."""
    import timm
    import torch
    from torch import nn

    spatial: list[int] = []
    try:
        with torch.device('meta'):
            model = timm.create_model(arch, num_classes=num_classes).eval()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(lambda _m, args: spatial.append(args[0].shape[2:].numel()))
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device='meta'))
    except Exception:  # an op without a meta kernel: two images a step are enough for any BatchNorm
        return max(STANDIN_BATCH, 2)
    least = min(spatial, default=2)
    return max(STANDIN_BATCH, 1 if least > 1 else 2)


def standin_sizes(recipe: Recipe, processes: int) -> tuple[int, int]:
    """(train, val) images a dry run uses: STEPS_PER_STAGE optimizer steps of the stage that accumulates most (for
    a stream, rounded up to fill its shards equally); two batches per process and one more image for validation,
    so the last global batch is uneven."""
    batch = standin_batch(recipe)
    accum = max(recipe.parent.train.grad_accum_steps, recipe.finetune.grad_accum_steps)
    train = STEPS_PER_STAGE * batch * processes * accum
    if recipe.data.is_stream:  # written as STANDIN_TRAIN_SHARDS equal shards per process (`standin_shards`)
        shards = STANDIN_TRAIN_SHARDS * processes
        train = math.ceil(train / shards) * shards
    return train, 2 * batch * processes + 1


def standin_shards(image_root: Path, out: Path, recipe: Recipe, processes: int) -> Path:
    """The stand-in ImageFolder as WebDataset shards: the train images a dry run uses (as `standin_sizes` counts
    them) in STANDIN_TRAIN_SHARDS shards per process, every validation image in one shard per process."""
    from .training.data import folder_samples, subset_indices
    from .training.shards import write_shards
    from .training.streams import INFO_FILE

    if (out / INFO_FILE).exists():
        return out
    train_images, val_images = standin_sizes(recipe, processes)
    for split, count, shards in (
        ('train', train_images, STANDIN_TRAIN_SHARDS * processes),
        ('val', val_images, processes),
    ):
        samples, _ = folder_samples(image_root / split)
        keep = subset_indices(len(samples), count, seed=0) or range(len(samples))
        chosen = [samples[i] for i in keep]
        write_shards(chosen, out, split, shard_size=math.ceil(len(chosen) / shards))
    return out


def standin_recipe(recipe: Recipe, data_root: Path, processes: int) -> dict:
    """The recipe as data, with stand-in data, random parent weights and a few steps per stage. `data_root` is
    the stand-in ImageFolder, or for a stream recipe its shards (`standin_shards`)."""
    plan = recipe.to_dict()
    batch = standin_batch(recipe)
    per_step = batch * processes
    parent_steps = per_step * recipe.parent.train.grad_accum_steps
    finetune_steps = per_step * recipe.finetune.grad_accum_steps
    train_images, val_images = standin_sizes(recipe, processes)
    plan['parent'].update(weights='none', tag=None)
    plan['data'] = {
        **plan['data'],
        'dataset': 'imagefolder',
        'root': str(data_root),
        'train_split': 'train',
        'val_split': 'val',
        'batch_size': batch,
        'workers': 0,
        'download': False,
        'train_subset': train_images,
        'val_subset': val_images,
    }
    if recipe.data.is_stream:  # the shards hold exactly the images to use
        plan['data'].update(dataset=recipe.data.dataset, train_subset=None, val_subset=None, train_samples=None)
    plan['importance'].update(batches=1, batch_size=min(recipe.importance.batch_size, 4))
    for section, steps in ((plan['parent']['train'], parent_steps), (plan['finetune'], finetune_steps)):
        if section['epochs'] > 0:
            # STEPS_PER_STAGE optimizer steps, one warmup step, a checkpoint after each step
            section.update(
                epochs=STEPS_PER_STAGE * steps / train_images, warmup_epochs=steps / train_images, checkpoint_every=1
            )
    return plan


@dataclass(frozen=True)
class StagePlan:
    name: str
    epochs: float
    steps: int
    checkpoints: int  # written over the run (the last two are kept)


@dataclass(frozen=True)
class RunPlan:
    """What the real run of a recipe needs, for `processes` processes."""

    recipe: str
    processes: int
    train_images: int | None
    train_images_source: str
    steps_per_epoch: int | None  # of the fine-tune (optimizer steps)
    stages: tuple[StagePlan, ...]
    checkpoint_bytes: int  # one fine-tune checkpoint (model + projections + optimizer + loop state)
    disk_bytes: int  # two kept checkpoints per training stage + stage results + export

    def table(self) -> str:
        gb = 1024**3
        lines = [
            f'{self.recipe}: what the real run needs on {self.processes} processes',
            f'  train images        {self.train_images or "unknown"} ({self.train_images_source})',
        ]
        for s in self.stages:
            lines.append(
                f'  {s.name:<18}  {s.epochs:g} epochs = {s.steps if s.steps else "?"} optimizer steps, '
                f'{s.checkpoints if s.steps else "?"} checkpoints'
            )
        lines.append(f'  one checkpoint      {self.checkpoint_bytes / 1024**2:.1f} MiB')
        lines.append(f'  disk (peak)         {self.disk_bytes / gb:.2f} GiB in runs/ and outputs/')
        return '\n'.join(lines)


def train_images_of(recipe: Recipe) -> tuple[int | None, str]:
    """Training-set size of the real data: counted where it is on this machine, else a known dataset's size."""
    data = recipe.data
    split = Path(data.root).expanduser() / data.train_split if data.root else None
    known = KNOWN_TRAIN_SIZES.get(('imagefolder' if data.is_stream else data.dataset, data.num_classes))
    if data.is_stream:
        return _stream_train_images(data, known)
    if data.dataset == 'imagefolder' and split is not None and split.is_dir():
        n, source = sum(len(files) for _, _, files in os.walk(split)), f'counted in {split}'
    elif data.dataset == 'cifar10':
        n, source = known[1], 'the CIFAR-10 train split'
    elif known is not None:
        n, source = known[1], f'{known[0]} assumed: {split or data.dataset} is not on this machine'
    else:
        return None, f'{split or data.dataset} is not on this machine'
    if data.train_subset and data.train_subset < n:
        n, source = data.train_subset, f'train_subset of {source}'
    return n, source


def _stream_train_images(data, known) -> tuple[int | None, str]:
    from .training.streams import INFO_FILE

    if data.train_samples:
        return data.train_samples, 'data.train_samples'
    info = Path(data.root).expanduser() / INFO_FILE
    try:
        return int(json.loads(info.read_text())['splits'][data.train_split]['num_samples']), f'counted in {info}'
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if known is not None:
        return known[1], f'{known[0]} assumed: no {data.train_split!r} count in {info}'
    return None, f'no {data.train_split!r} count in {info}'


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file()) if path.exists() else 0


def plan_real_run(recipe: Recipe, processes: int, dry_work: Path, dry_export: Path) -> RunPlan:
    from .core.recipe import RecipeError
    from .training.train import checkpoint_interval, plan_schedule  # pulls in torch: only once a plan is made

    n, source = train_images_of(recipe)
    stages, steps_per_epoch = [], None
    for name, where, spec in (
        ('parent training', 'parent.train', recipe.parent.train),
        ('fine-tune', 'finetune', recipe.finetune),
    ):
        if spec.epochs <= 0:
            continue
        per_epoch, steps = None, 0
        if n is not None:  # the schedule the real run will make of the real data, or the error it will stop with
            try:
                schedule = plan_schedule(
                    spec,
                    n // (recipe.data.batch_size * processes),
                    where,
                    f' ({n} training images in batches of {recipe.data.batch_size} x '
                    f'{processes} process{"es" * (processes > 1)})',
                )
            except RecipeError as e:
                raise e.within(source=recipe.source) from None
            per_epoch, steps = schedule.steps_per_epoch, schedule.total_steps
        every = checkpoint_interval(spec.checkpoint_every, steps)
        stages.append(StagePlan(name, spec.epochs, steps, math.ceil(steps / every)))
        if name == 'fine-tune':
            steps_per_epoch = per_epoch
    checkpoints = sorted((dry_work / 'finetune' / 'checkpoints').glob('step_*'))
    checkpoint_bytes = _folder_bytes(checkpoints[-1]) if checkpoints else 0
    parent_checkpoints = sorted((dry_work / 'parent' / 'train' / 'checkpoints').glob('step_*'))
    parent_bytes = _folder_bytes(parent_checkpoints[-1]) if parent_checkpoints else 0
    results = sum(_folder_bytes(dry_work / part) for part in ('pruned', 'eval.json'))
    results += sum(p.stat().st_size for p in dry_work.glob(f'*/{WEIGHTS_FILE}'))
    disk = 2 * checkpoint_bytes + 2 * parent_bytes + results + _folder_bytes(dry_export)
    return RunPlan(recipe.name, processes, n, source, steps_per_epoch, tuple(stages), checkpoint_bytes, disk)


def dry_run(
    recipe_path: str | Path,
    out_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    processes: int | None = None,
    progress: bool = True,
) -> RunPlan:
    """Build the stand-in version of `recipe_path` end to end, then plan the real run (for `processes`
    processes; default: as many as this launch has)."""
    from ._workdir import BuildPaths, guard_build_paths  # torch and timm: only when a dry run happens
    from .build import build, preflight
    from .core.ownership import claim_work

    recipe = load_recipe(recipe_path)
    state = process_accelerator()  # never a bare PartialState() first: on CPU it would not join the processes
    # the stand-in data goes into the work folder first: the folders are checked before it (the build checks again)
    paths = guard_build_paths(
        BuildPaths(
            Path(work_dir or Path('runs') / f'{recipe.name}-dry-run'),
            Path(out_dir or Path('outputs') / f'{recipe.name}-dry-run'),
        ),
        recipe.name,
    )
    work, out = paths.work, paths.export
    # the user's recipe, not the stand-in's: a parent the engine cannot prune (or a target it cannot reach) is
    # refused naming the user's file, before any stand-in data is written
    preflight(recipe)
    standin = work / 'standin'
    with state.main_process_first():
        if state.is_main_process:
            claim_work(work, ('standin',))
            per_class = math.ceil(max(standin_sizes(recipe, state.num_processes)) / recipe.data.num_classes)
            data_root = standin_images(standin / 'data', recipe.data.num_classes, recipe.input_size, per_class)
            if recipe.data.is_stream:
                data_root = standin_shards(data_root, standin / 'shards', recipe, state.num_processes)
            (standin / 'recipe.yaml').write_text(
                yaml.safe_dump(standin_recipe(recipe, data_root, state.num_processes), sort_keys=False)
            )
    # no model.onnx: checking it would take the export a minute on a 224 px parent, for stand-in weights; a failed
    # export never fails a build (the build writes the rest and says why in one line)
    build(standin / 'recipe.yaml', out_dir=out, work_dir=work, progress=progress, onnx=False)
    return plan_real_run(recipe, processes or state.num_processes, work, out)
