"""`kpid_zoo._stages.measure` (parent and student top-1/top-5 on the validation split) run directly or under torchrun.

Each process counts the images its own models see; it writes <out>/rank<R>.json with that count and the
metrics it got back. The student is a narrower resnet18, the parent a resnet18, both seeded (no training).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kpid_zoo._stages import measure  # noqa: E402
from kpid_zoo._workdir import BuildPaths  # noqa: E402
from kpid_zoo.core.recipe import Recipe  # noqa: E402
from kpid_zoo.training.accelerator import process_accelerator  # noqa: E402
from kpid_zoo.training.data import create_loaders  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--data', required=True)
    ap.add_argument('--out', required=True)
    ap.add_argument('--batch-size', type=int, default=4, help='per process')
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe.from_dict(
        {
            'name': 'measure_probe',
            'parent': {'model': 'resnet18', 'weights': 'none', 'num_classes': 3},
            'input_size': [3, 32, 32],
            'flops': {'target_ratio': 0.5},
            'data': {
                'dataset': 'imagefolder',
                'root': args.data,
                'num_classes': 3,
                'batch_size': args.batch_size,
                'workers': 0,
            },
        }
    )
    torch.manual_seed(0)
    parent = timm.create_model('resnet18', num_classes=3).eval()
    student = timm.create_model('resnet18', num_classes=3, channels=(32, 64, 128, 256)).eval()
    seen = {'parent': 0, 'student': 0}
    for name, model in (('parent', parent), ('student', student)):
        model.register_forward_pre_hook(lambda _m, inputs, _n=name: seen.__setitem__(_n, seen[_n] + len(inputs[0])))

    accelerator = process_accelerator()
    data = create_loaders(recipe.data, parent, input_size=recipe.input_size)
    metrics = measure(accelerator, recipe, parent, student, data, None, BuildPaths(out / 'work', out / 'export'))
    (out / f'rank{accelerator.process_index}.json').write_text(
        json.dumps(
            {
                'world_size': accelerator.num_processes,
                'seen': seen,
                'metrics': metrics,
                'device': str(accelerator.device),
            }
        )
    )


if __name__ == '__main__':
    main()
