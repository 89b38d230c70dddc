"""A wds stream under torchrun: each process records the targets of the training batches it gets in two epochs
(shards whose targets number their samples) and evaluates a seeded model on the validation stream.

Writes <out>/rank<R>.json: {'world_size', 'epochs': {epoch: [[target, ...], ...]}, 'val_seen', 'val'}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kpid_zoo.core.recipe import DataSpec  # noqa: E402
from kpid_zoo.training.accelerator import process_accelerator  # noqa: E402
from kpid_zoo.training.data import create_loaders, prepare_loader  # noqa: E402
from kpid_zoo.training.evaluate import evaluate  # noqa: E402


def spec(root: str, num_classes: int, workers: int) -> DataSpec:
    return DataSpec(
        dataset='wds/test',
        root=root,
        num_classes=num_classes,
        val_split='val',
        batch_size=8,
        workers=workers,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.247, 0.2435, 0.2616),
        crop_pct=1.0,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--numbered', required=True, help='shards whose targets are sample numbers (train split)')
    ap.add_argument('--classes', required=True, help='shards with 4 classes (train and val splits)')
    ap.add_argument('--out', required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    accelerator = process_accelerator()

    numbered = create_loaders(spec(args.numbered, 1000, workers=2), input_size=(3, 32, 32))
    train = prepare_loader(accelerator, numbered.train_loader)
    epochs = {}
    for epoch in (0, 1):
        train.set_epoch(epoch)
        epochs[epoch] = [y.tolist() for _, y in train]

    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=4, channels=(8, 16, 32, 64)).eval()
    seen = [0]
    model.register_forward_pre_hook(lambda _m, inputs: seen.__setitem__(0, seen[0] + len(inputs[0])))
    classes = create_loaders(spec(args.classes, 4, workers=2), model, input_size=(3, 32, 32))
    val = evaluate(model, prepare_loader(accelerator, classes.val_loader), accelerator)
    (Path(args.out) / f'rank{accelerator.process_index}.json').write_text(
        json.dumps(
            {'world_size': accelerator.num_processes, 'epochs': epochs, 'val_seen': seen[0], 'val': val.as_dict()}
        )
    )


if __name__ == '__main__':
    main()
