"""The same pipeline on a CUDA device (skipped where there is none): Taylor scores and inner KD in bf16."""
import math

import pytest
import timm
import torch

from kpid_zoo.distill import distill_points
from kpid_zoo.flops import count_flops
from kpid_zoo.groups import discover_groups
from kpid_zoo.importance import taylor_importance
from kpid_zoo.prune import knapsack_prune
from kpid_zoo.recipe import FinetuneSpec
from kpid_zoo.train import finetune

pytestmark = pytest.mark.gpu


def _loader(n=64, size=64, classes=10):
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=gen),
                                          torch.randint(0, classes, (n,), generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=16, drop_last=True)


def test_prune_and_distill_on_cuda_in_bf16(tmp_path):
    parent = timm.create_model("resnet18", num_classes=10).eval()
    graph = discover_groups(parent, (3, 64, 64))
    importance = taylor_importance(parent, graph, _loader(), num_batches=2, device="cuda", progress=False)
    parent.cpu()
    target = 0.5 * count_flops(parent, (3, 64, 64)).gmacs
    result = knapsack_prune(parent, graph, importance, target, arch="resnet18", input_size=(3, 64, 64),
                            tolerance=0.02, progress=False)
    kept = {p: result.kept_channels(p) for p in distill_points(parent)}
    cfg = FinetuneSpec(epochs=1, lr=0.01, mixed_precision="bf16", checkpoint_every=0, seed=0)
    trained = finetune(result.model, parent, _loader(), _loader(32), cfg, tmp_path, kept=kept,
                       input_size=(3, 64, 64), progress=False)
    assert trained.steps == trained.total_steps > 0
    assert math.isfinite(trained.train_loss)
    assert next(parent.parameters()).device.type == "cuda" and not any(p.requires_grad for p in parent.parameters())
