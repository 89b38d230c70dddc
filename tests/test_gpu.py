"""The same pipeline on a CUDA device (skipped where there is none): Taylor scores and inner KD in bf16."""

import math

import pytest
import timm
import torch

from kpid_zoo.budget.prune import knapsack_prune
from kpid_zoo.core.recipe import FinetuneSpec
from kpid_zoo.engine.flops import count_flops
from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.importance import taylor_importance
from kpid_zoo.training.distill import distill_points
from kpid_zoo.training.train import finetune

pytestmark = pytest.mark.gpu


def _loader(n=64, size=64, classes=10):
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 3, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    )
    return torch.utils.data.DataLoader(data, batch_size=16, drop_last=True)


def test_prune_and_distill_on_cuda_in_bf16(tmp_path):
    parent = timm.create_model('resnet18', num_classes=10).eval()
    graph = discover_groups(parent, (3, 64, 64))
    importance = taylor_importance(parent, graph, _loader(), num_batches=2, device='cuda', progress=False)
    parent.cpu()
    target = 0.5 * count_flops(parent, (3, 64, 64)).gmacs
    result = knapsack_prune(
        parent, graph, importance, target, arch='resnet18', input_size=(3, 64, 64), tolerance=0.02, progress=False
    )
    kept = {p: result.kept_channels(p) for p in distill_points(parent)}
    cfg = FinetuneSpec(epochs=1, lr=0.01, mixed_precision='bf16', seed=0)
    trained = finetune(
        result.model, parent, _loader(), _loader(32), cfg, tmp_path, kept=kept, input_size=(3, 64, 64), progress=False
    )
    assert trained.steps == trained.total_steps > 0
    assert math.isfinite(trained.train_loss)
    assert next(parent.parameters()).device.type == 'cuda' and not any(p.requires_grad for p in parent.parameters())


def test_whole_build_of_a_small_recipe_on_cuda_in_bf16(tmp_path, cifar10_tarball):
    """`kpid-zoo build` end to end on the GPU: Taylor scores, bf16 distillation (teacher frozen, eval mode, no
    grads), sharded evaluation and export; the export then loads with timm and runs on CUDA."""
    import json

    import yaml

    import kpid_zoo  # noqa: F401  (local-dir: loading)
    from kpid_zoo.cli import main

    recipe = {
        'name': 'kpid_gpu_probe',
        'parent': {
            'model': 'resnet18',
            'weights': 'none',
            'num_classes': 10,
            'train': {'epochs': 1, 'lr': 0.05, 'mixed_precision': 'bf16'},
        },
        'input_size': [3, 32, 32],
        'flops': {'target_ratio': 0.5, 'tolerance': 0.05},
        'importance': {'method': 'taylor', 'batches': 2, 'batch_size': 64},
        'data': {
            'dataset': 'cifar10',
            'root': str(cifar10_tarball),
            'batch_size': 256,
            'workers': 2,
            'crop_pct': 1.0,
            'train_subset': 2048,
            'val_subset': 512,
        },
        'finetune': {
            'epochs': 1,
            'lr': 0.02,
            'mixed_precision': 'bf16',
            'kd_logits_weight': 0.5,
            'checkpoint_every': 4,
        },
    }
    path = tmp_path / 'gpu.yaml'
    path.write_text(yaml.safe_dump(recipe))
    out, work = tmp_path / 'export', tmp_path / 'work'
    assert main(['build', str(path), '--out', str(out), '--work', str(work), '--quiet']) == 0
    metrics = json.loads((out / 'config.json').read_text())['kpid']['metrics']
    assert metrics['n'] == 512
    # the recorded top-1 against the exported net's own on the same 512 validation images (the build's loader:
    # same recipe, seed and subset), on the CPU in float32; the build evaluated on the GPU (float32, TF32
    # convolutions), so each image whose GPU prediction here differs from the CPU's may move it by 100/512 points
    from kpid_zoo.core.recipe import load_recipe
    from kpid_zoo.training.data import create_loaders

    loaded = load_recipe(path)
    data = create_loaders(
        loaded.data,
        model=timm.create_model('resnet18', num_classes=10),
        input_size=loaded.input_size,
        seed=loaded.finetune.seed,
    )
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    on_gpu = timm.create_model(f'local-dir:{out}', pretrained=True).cuda().eval()
    correct = differ = seen = 0
    with torch.no_grad():
        for x, y in data.val_loader:
            cpu, gpu = model(x).argmax(1), on_gpu(x.cuda()).argmax(1).cpu()
            correct += int((cpu == y).sum())
            differ += int((cpu != gpu).sum())
            seen += len(y)
    assert seen == 512
    assert abs(metrics['top1'] - 100.0 * correct / seen) <= 100.0 * differ / seen + 1e-9
    model = on_gpu
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        assert model(torch.randn(4, 3, 32, 32, device='cuda')).shape == (4, 10)
