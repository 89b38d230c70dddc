"""How far ONNX Runtime and PyTorch land from the exact network, in units of the float32 tolerance, per family.

Every build's export holds a `model.onnx` only once ONNX Runtime's outputs on real images lie within the tolerance
that float32 rounding allows around the exact (float64) network (`kpid_zoo.deploy.rounding`). This script exports
one net of each family a recipe can name -- the convolutional ones and the transformer-era ones (layer norms,
attention, GELU) -- exactly as a build does (`kpid_zoo.zoo._onnx.make_onnx`: torch's dynamo exporter, a dynamic
batch axis), and checks it on 4 real CIFAR-10 test images at 64 px. Weights: timm's initialisation with every
norm's statistics and affine parameters and the classifier's bias moved away from their defaults (as
tests/test_onnx_export.py does), so that folding and fusion change the arithmetic; the errors do not depend on
training. A ratio near 1 would mean the tolerance is tight for that family; far below 1, that the rounding bound
u * sum|w x| of each op sits far above a typical rounding (partial sums grow like sqrt(n), not n).

    PYTHONPATH=. python benchmarks/onnx_check.py        # prints the table, writes docs/onnx_check.md
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import timm
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kpid_zoo.budget.timing import cpu_model  # noqa: E402
from kpid_zoo.deploy.check import check_onnx  # noqa: E402
from kpid_zoo.deploy.onnx import onnx_program  # noqa: E402
from kpid_zoo.zoo._onnx import check_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = (3, 64, 64)
CFG = {'input_size': SIZE, 'crop_pct': 1.0, 'interpolation': 'bicubic', 'mean': (0.5,) * 3, 'std': (0.5,) * 3}
NETS = (  # (timm name, why it is here)
    ('resnet18', 'ResNet'),
    ('efficientnet_b0', 'EfficientNet: SiLU, squeeze-excite'),
    ('tf_efficientnet_lite0', 'EfficientNet-Lite: TF-"same" padding, ReLU6'),
    ('mobilenetv3_large_100', 'MobileNetV3: hardswish'),
    ('mixnet_s', 'MixNet: split channels'),
    ('regnety_002', 'RegNetY: grouped convs'),
    ('mobilenetv4_conv_small', 'MobileNetV4'),
    ('convnext_atto', 'ConvNeXt: layer norm, GELU'),
    ('convnextv2_atto', 'ConvNeXt-V2: global response norm'),
    ('deit_tiny_patch16_224', 'DeiT / ViT: attention (at 64 px)'),
    ('fastvit_t8', 'FastViT'),
    ('efficientvit_b0', 'EfficientViT: linear attention'),
)


def randomise_norms(model: nn.Module) -> nn.Module:
    """Batch norm statistics away from init's (0, 1), so that folding them into the convs changes the arithmetic;
    norms' affine parameters away from (1, 0), and the classifier's bias away from zero (timm's zeros are dropped
    from the ONNX graph). tests/test_onnx_export.py uses it too."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    model.get_classifier().bias.data.normal_(generator=g)
    return model.eval()


def randomised(name: str) -> nn.Module:
    extra = {'img_size': SIZE[1:]} if name.startswith(('vit_', 'deit_')) else {}
    return randomise_norms(timm.create_model(name, num_classes=10, **extra))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--images', default=None, help='images to check on (default: the CIFAR-10 JPEG tarball)')
    ap.add_argument('--doc', type=Path, default=ROOT / 'docs' / 'onnx_check.md')
    args = ap.parse_args()
    warnings.filterwarnings('ignore')
    logging.disable(logging.WARNING)
    images, what = check_images(CFG, args.images)
    rows = []
    for name, family in NETS:
        model = randomised(name)
        start = time.time()
        data, program = onnx_program(model, torch.zeros(2, *SIZE), dynamic_batch=True, what=name)
        check = check_onnx(data, program, model, images, what=name)
        rows.append(
            f'| {name} | {family} | {"yes" if check.passed else "**no**: " + check.reason} | '
            f'{check.onnxruntime_max_ratio:.1e} | {check.torch_max_ratio:.1e} | {check.onnxruntime_max_abs:.1e} | '
            f'{check.tolerance_min:.1e} to {check.tolerance_max:.1e} | {time.time() - start:.0f} |'
        )
        print(rows[-1], flush=True)
    machine = f'{cpu_model()}, {torch.get_num_threads()} threads'
    lines = [
        '# model.onnx checked, family by family',
        '',
        f'`PYTHONPATH=. python benchmarks/onnx_check.py`: one net of each family, exported as a build exports it and '
        f'checked on {what} at {SIZE[1]} px (weights: timm init, norms and classifier bias randomised; see the '
        "script's docstring). Errors are each output's |float32 - exact| over its tolerance, at the worst output; "
        'the check passes at 1 or below ([Deployment](deploy.md)).',
        '',
        '| net | family | passed | ONNX Runtime error / tolerance | PyTorch error / tolerance | ONNX Runtime |error| '
        '| tolerance (logits) | export + check (s) |',
        '|---|---|---|---|---|---|---|---|',
        *rows,
        '',
        f'{machine}; torch {torch.__version__}, timm {timm.__version__}, onnxruntime '
        f'{__import__("onnxruntime").__version__}, Python {platform.python_version()}. The seconds are wall time on '
        'a machine that other jobs shared: most of them are the 17 float64 runs of the tolerance.',
        '',
    ]
    args.doc.write_text('\n'.join(lines))
    print(f'wrote {args.doc}')


if __name__ == '__main__':
    main()
