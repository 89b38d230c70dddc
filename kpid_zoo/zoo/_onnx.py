"""The export's `model.onnx`: the pruned network as an ONNX graph (torch's dynamo exporter, a dynamic batch axis),
written only once ONNX Runtime's outputs on real images are checked against the exact network
(`kpid_zoo.deploy.check.check_onnx`), and its record in config.json (`kpid.onnx`).

The PyTorch export stands without it: when the [deploy] extra is not installed, the exporter cannot translate an
op, ONNX Runtime cannot run the graph or the check fails, the folder gets everything else, config.json records why
there is no model.onnx (`kpid.onnx.skipped`) and one log line says so; `kpid-zoo export-onnx DIR` adds it later.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..deploy.check import check_onnx
from ..deploy.onnx import (
    DEPLOY_HINT,
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    missing_onnx_packages,
    onnx_program,
    package_version,
)
from ..deploy.rounding import NoRoundingModel
from ..errors import MissingDependencyError, UnreadableImageError, UnsupportedModelError, UserError, one_line

__all__ = ['ONNX_FILE', 'CHECK_IMAGES', 'OnnxSkipped', 'make_onnx', 'check_images', 'skipped_record']

logger = logging.getLogger(__name__)

ONNX_FILE = 'model.onnx'
CHECK_IMAGES = 4  # images the check runs: each gives num_classes outputs, each checked
_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
_MAX_IMAGE_BYTES = 1 << 26  # an image file for the check is at most this big (a bigger one is not read)


class OnnxSkipped(UserError):
    """No model.onnx: the deploy extra is missing, the exporter or ONNX Runtime cannot handle the network, or the
    check failed. The message is one line: what was skipped and why."""


def skipped_record(reason: str) -> dict:
    return {'file': None, 'skipped': reason}


def make_onnx(
    model: nn.Module, input_size: tuple[int, ...], images: torch.Tensor, *, name: str, inputs: str
) -> tuple[bytes, dict]:
    """(model.onnx's bytes, its `kpid.onnx` record less the file's own sha256 and size) for `model` at
    `input_size`, checked on `images` (described by `inputs`); `OnnxSkipped` says why not."""
    missing = missing_onnx_packages()
    if missing:
        raise OnnxSkipped(
            f'{ONNX_FILE} not written: the deploy extra is not installed ({", ".join(missing)}): '
            f'{DEPLOY_HINT}, then `kpid-zoo export-onnx DIR`'
        )
    net = _cpu_copy(model)
    # a batch of 2: with 1, torch.export may specialise the batch and refuse it as dynamic (ConvNeXt's layer norms)
    example = torch.zeros(2, *input_size)
    try:
        data, program = onnx_program(net, example, dynamic_batch=True, what=name)
        check = check_onnx(data, program, net, images, threads=max(1, torch.get_num_threads()), what=name)
    except (UnsupportedModelError, MissingDependencyError) as e:
        raise OnnxSkipped(f'{ONNX_FILE} not written: {one_line(e, 400)}') from None
    except NoRoundingModel as e:
        raise OnnxSkipped(
            f'{ONNX_FILE} not written: {name}: its graph holds {one_line(e, 100)}, for which the float32 '
            f'tolerance of the check has no rule (kpid_zoo.deploy.rounding)'
        ) from None
    except Exception as e:  # a bug of the check must not cost the build its (valid) PyTorch export
        logger.debug('export: %s: the model.onnx check failed', name, exc_info=True)
        raise OnnxSkipped(
            f'{ONNX_FILE} not written: {name}: the check itself failed ({type(e).__name__}: {one_line(e, 200)}); '
            f'a kpid-zoo bug: please report it'
        ) from None
    if not check.passed:
        raise OnnxSkipped(f'{ONNX_FILE} not written: {name}: the check on {inputs} failed: {check.reason}')
    record = {
        'file': ONNX_FILE,
        'opset': OPSET,
        'input': INPUT_NAME,
        'output': OUTPUT_NAME,
        'input_shape': ['batch', *input_size],
        'dynamic_axes': {INPUT_NAME: {'0': 'batch'}, OUTPUT_NAME: {'0': 'batch'}},
        'exporter': 'torch.onnx.export(dynamo=True)',
        'versions': {p: package_version(p) for p in ('torch', 'onnx', 'onnxscript', 'onnxruntime')},
        'check': {'inputs': inputs, **check.to_dict()},
    }
    return data, record


def finish_record(record: Mapping[str, Any], data: bytes, weights_sha256: str) -> dict:
    """The `kpid.onnx` record of a written model.onnx: its sha256 and size, and the weights it was exported from."""
    return {
        **record,
        'sha256': hashlib.sha256(data).hexdigest(),
        'size': len(data),
        'weights_sha256': weights_sha256,
    }


def _cpu_copy(model: nn.Module) -> nn.Module:
    """The network in eval mode on the CPU in float32, the caller's left as it is (its mode, device, dtype)."""
    params = list(model.parameters())
    on_cpu = all(p.device.type == 'cpu' and p.dtype == torch.float32 for p in params)
    if on_cpu and not model.training:
        return model
    return copy.deepcopy(model).cpu().float().eval()


def _transform(pretrained_cfg: Mapping[str, Any]):
    from timm.data import create_transform

    return create_transform(
        tuple(pretrained_cfg['input_size']),
        is_training=False,
        interpolation=pretrained_cfg.get('interpolation', 'bilinear'),
        mean=tuple(pretrained_cfg.get('mean', (0.485, 0.456, 0.406))),
        std=tuple(pretrained_cfg.get('std', (0.229, 0.224, 0.225))),
        crop_pct=pretrained_cfg.get('crop_pct', 0.875),
        crop_mode=pretrained_cfg.get('crop_mode'),
    )


def _open_image(data: bytes, where: str):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert('RGB')
    except Exception as e:  # PIL raises many types for a bad file
        raise UnreadableImageError(f'{where}: cannot read the image ({type(e).__name__}: {one_line(e, 120)})') from None


def _read_images(path: Path, count: int) -> list[tuple[bytes, str]]:
    """The first `count` images (by sorted name) of an image folder (searched below), or of a .tar / .tar.gz of
    images (in its order); regular files only: symlinks and special files are passed over."""
    found: list[tuple[bytes, str]] = []
    if path.is_dir():
        for root, dirs, files in os.walk(path):  # os.walk does not follow symlinked folders
            dirs.sort()
            for name in sorted(files):
                file = Path(root) / name
                if not name.lower().endswith(_IMAGE_SUFFIXES) or file.is_symlink() or not file.is_file():
                    continue
                if file.stat().st_size <= _MAX_IMAGE_BYTES:
                    found.append((file.read_bytes(), str(file)))
                if len(found) >= count:
                    return found
        return found
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            for member in tf:
                if (
                    member.isfile()
                    and member.name.lower().endswith(_IMAGE_SUFFIXES)
                    and member.size <= _MAX_IMAGE_BYTES
                ):
                    handle = tf.extractfile(member)
                    if handle is not None:
                        found.append((handle.read(), f'{path}:{member.name}'))
                if len(found) >= count:
                    break
        return found
    raise UserError(
        f'--images {path}: {"missing" if not os.path.lexists(path) else "not a folder or a tarball"} '
        f'(expected a folder of images or a .tar/.tar.gz of them)'
    )


def check_images(
    pretrained_cfg: Mapping[str, Any], source: str | Path | None = None, count: int = CHECK_IMAGES
) -> tuple[torch.Tensor, str]:
    """(`count` real images preprocessed as the export's config.json says, what they are) for the check: from
    `source` (an image folder or tarball), else the CIFAR-10 JPEG tarball kpid-zoo finds ($KPID_CIFAR10_TAR,
    ../shared/data). None found is one line asking for --images."""
    if source is None:
        from ..training.cifar10 import find_cifar10_tarball

        try:
            source = find_cifar10_tarball()
        except (FileNotFoundError, UserError):
            raise UserError(
                'no images to check model.onnx on: give --images (a folder of images or a tarball of them, '
                'e.g. a few of your validation images)'
            ) from None
    path = Path(source)
    found = _read_images(path, count)
    if not found:
        raise UserError(f'--images {path}: holds no image ({", ".join(_IMAGE_SUFFIXES)})')
    transform = _transform(pretrained_cfg)
    batch = torch.stack([transform(_open_image(data, where)) for data, where in found])
    return batch, f'{len(found)} images of {path.name}'
