"""One fine-tune run for the resume and multi-process tests (run directly or under torchrun).

Teacher: resnet18; student: a narrower resnet18 (same module names) distilled at every stage with KPID inner KD.
Both use GroupNorm so a sample's result never depends on which other samples share its process's batch
(CPU has no SyncBatchNorm), which is what lets a 2-process run equal a 1-process run.

Writes <out>/final.safetensors (student weights) and <out>/result.json on the main process.
--hang-after-step N: after optimizer step N (and its checkpoint, if any) write <out>/hanging and sleep, so the test
can SIGKILL the process at a known point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.layers import GroupNorm1

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kpid_zoo.core.recipe import DataSpec, FinetuneSpec  # noqa: E402
from kpid_zoo.training.data import create_loaders  # noqa: E402
from kpid_zoo.training.train import finetune  # noqa: E402

STUDENT_CHANNELS = (32, 64, 128, 256)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--data', required=True)
    ap.add_argument('--out', required=True)
    ap.add_argument('--num-classes', type=int, default=3)
    ap.add_argument('--batch-size', type=int, default=8, help='per process')
    ap.add_argument('--epochs', type=float, default=2)
    ap.add_argument('--accum', type=int, default=1)
    ap.add_argument('--checkpoint-every', type=int, default=2)
    ap.add_argument('--drop-rate', type=float, default=0.0)
    ap.add_argument('--hang-after-step', type=int, default=0)
    ap.add_argument('--mixed-precision', default='no')
    ap.add_argument(
        '--float64',
        action='store_true',
        help='models, projections and images in float64 (rounding 2**29 times smaller than float32)',
    )
    args = ap.parse_args()
    torch.set_num_threads(1)  # same kernels and reduction order in every run
    if args.float64:
        # before any model, projection or image tensor is made (torchvision's to_tensor follows the default too)
        torch.set_default_dtype(torch.float64)
    out = Path(args.out)

    torch.manual_seed(0)
    teacher = timm.create_model('resnet18', num_classes=args.num_classes, norm_layer=GroupNorm1)
    student = timm.create_model(
        'resnet18',
        num_classes=args.num_classes,
        norm_layer=GroupNorm1,
        channels=STUDENT_CHANNELS,
        drop_rate=args.drop_rate,
    )
    if args.float64:
        for model in (teacher, student):  # belt and braces: any float32 input is promoted
            model.register_forward_pre_hook(lambda _, inputs: tuple(x.double() for x in inputs))
    kept = {f'layer{i + 1}': torch.arange(w) for i, w in enumerate(STUDENT_CHANNELS)}

    data = DataSpec(
        dataset='imagefolder', root=args.data, num_classes=args.num_classes, batch_size=args.batch_size, workers=0
    )
    bundle = create_loaders(data, teacher, input_size=(3, 32, 32), seed=0)
    cfg = FinetuneSpec(
        epochs=args.epochs,
        lr=0.05,
        weight_decay=1e-4,
        warmup_epochs=0.5,
        optimizer='sgd',
        grad_accum_steps=args.accum,
        mixed_precision=args.mixed_precision,
        kd_gamma=1.0,
        kd_logits_weight=0.5,
        temperature=2.0,
        label_smoothing=0.1,
        checkpoint_every=args.checkpoint_every,
        seed=0,
    )

    def hang(step: int, metrics: dict) -> None:
        if step == args.hang_after_step:
            (out / 'hanging').write_text(str(step))
            time.sleep(600)

    result = finetune(
        student,
        teacher,
        bundle.train_loader,
        bundle.val_loader,
        cfg,
        out,
        kept=kept,
        step_callback=hang if args.hang_after_step else None,
        progress=False,
    )
    if int(os.environ.get('RANK', '0')) == 0:
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(out / 'final.safetensors'))
        (out / 'result.json').write_text(
            json.dumps(
                {
                    'steps': result.steps,
                    'total_steps': result.total_steps,
                    'resumed_from': result.resumed_from,
                    'val': result.val.as_dict() if result.val else None,
                    'train_loss': result.train_loss,
                    'world_size': int(os.environ.get('WORLD_SIZE', '1')),
                }
            )
        )


if __name__ == '__main__':
    main()
