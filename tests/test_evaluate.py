"""Evaluation: hand-checkable top-1/top-5, uneven last batch, Accelerate path, CPU throughput."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from kpid_zoo.training.evaluate import evaluate, measure_throughput, topk_correct

# 5 samples, 7 classes. Rank of the true class in each row: 1st, 2nd, 5th, 6th, 1st
#   -> top-1 = 2/5 = 40 %, top-5 = 4/5 = 80 %.
LOGITS = torch.tensor(
    [
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # target 0: rank 1
        [5.0, 9.0, 1.0, 2.0, 3.0, 4.0, 0.0],  # target 0: rank 2
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0],  # target 4: rank 5
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0],  # target 5: rank 6
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # target 6: rank 1
    ]
)
TARGET = torch.tensor([0, 0, 4, 5, 6])


def _loader(batch_size):
    # the "model" is the identity: the dataset already holds logits
    return DataLoader(TensorDataset(LOGITS, TARGET), batch_size=batch_size)


@pytest.mark.parametrize('batch_size', [5, 2])  # 2: uneven last batch
def test_topk_on_hand_made_logits(batch_size):
    r = evaluate(nn.Identity(), _loader(batch_size))
    assert r.n == 5
    assert r.top1 == pytest.approx(40.0)
    assert r.top5 == pytest.approx(80.0)
    assert r.loss == pytest.approx(F.cross_entropy(LOGITS, TARGET).item(), rel=1e-6)


def test_topk_clips_k_to_number_of_classes():
    hits = topk_correct(torch.tensor([[0.1, 0.9, 0.0]]), torch.tensor([2]))
    assert hits[1].item() == 0 and hits[5].item() == 1  # k=5 > 3 classes: every class is "in the top 5"


def test_evaluate_with_accelerator_gathers_every_sample_once():
    accelerator = Accelerator()
    loader = accelerator.prepare(_loader(2))
    r = evaluate(nn.Identity(), loader, accelerator)
    assert (r.n, r.top1, r.top5) == (5, pytest.approx(40.0), pytest.approx(80.0))


def test_evaluate_restores_training_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(7, 7)).train()
    evaluate(model, _loader(5))
    assert model.training


def test_empty_loader_is_an_error():
    with pytest.raises(ValueError, match='no samples'):
        evaluate(nn.Identity(), DataLoader(TensorDataset(LOGITS[:0], TARGET[:0]), batch_size=2))


def test_measure_throughput_cpu():
    model = timm.create_model('mobilenetv3_small_050', num_classes=10).train()
    threads = torch.get_num_threads()
    ips = measure_throughput(model, (3, 32, 32), batch_size=4, warmup=1, iters=3, threads=1)
    ips_cl = measure_throughput(model, (3, 32, 32), batch_size=4, warmup=1, iters=3, channels_last=True)
    assert math.isfinite(ips) and ips > 0 and math.isfinite(ips_cl) and ips_cl > 0
    assert torch.get_num_threads() == threads and model.training  # settings restored
    assert model.conv_stem.weight.is_contiguous()
    with pytest.raises(ValueError, match='iters'):
        measure_throughput(model, (3, 32, 32), iters=0)
