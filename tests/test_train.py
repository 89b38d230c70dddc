"""Fine-tune loop: schedule, checkpoints, kill + resume (real SIGKILL), gradient accumulation, torchrun x2 (gloo)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from kpid_zoo.core.recipe import DataSpec, FinetuneSpec, ParentTrainSpec
from kpid_zoo.training.accelerator import process_accelerator
from kpid_zoo.training.data import create_loaders
from kpid_zoo.training.train import JsonlTracker, finetune, list_checkpoints, warmup_cosine_schedule

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tests' / 'scripts' / 'finetune_run.py'
BIN = Path(sys.executable).parent


def make_image_folder(root: Path, classes=('a', 'b', 'c'), n_train=24, n_val=10, seed=0) -> Path:
    """A tiny ImageNet-layout tree of random 32x32 JPEGs (class-dependent tint so there is something to learn)."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        for c_idx, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 160, (32, 32, 3), dtype=np.uint8)
                img[..., c_idx % 3] += 90
                Image.fromarray(img).save(d / f'{i:04d}.jpg')
    return root


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('imgs'))


def _run(args, out: Path, launcher=None, **popen):
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), '--out', str(out)] + [str(a) for a in args]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _finish(proc, timeout=240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / 'final.safetensors')), load_file(str(b / 'final.safetensors'))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def test_warmup_cosine_schedule_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_schedule(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == sorted(lrs[:4]) and lrs[0] < 0.5  # linear warmup from small
    assert lrs[4] == pytest.approx(1.0)  # peak right after warmup
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # cosine decay
    assert lrs[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_finetune_plain_ce_checkpoints_and_metrics(image_folder, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv3_small_050', num_classes=3)
    data = DataSpec(dataset='imagefolder', root=str(image_folder), num_classes=3, batch_size=8, workers=0)
    bundle = create_loaders(data, model, input_size=(3, 32, 32))
    cfg = FinetuneSpec(epochs=1.5, lr=0.02, checkpoint_every=2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, None, bundle.train_loader, bundle.val_loader, cfg, tmp_path, progress=False)

    assert result.total_steps == result.steps == round(1.5 * 9)  # 72 images / 8 = 9 steps per epoch
    assert result.val is not None and result.val.n == 30
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())
    ckpts = [p.name for p in list_checkpoints(tmp_path / 'checkpoints')]
    assert ckpts == ['step_12', 'step_14']  # every 2 steps + the final one, only the last two kept
    assert not [p for p in (tmp_path / 'checkpoints').iterdir() if p.name.startswith('.tmp')]
    lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    steps = [line['step'] for line in lines if 'loss' in line]
    assert steps == list(range(1, 15)) and all('lr' in line and 'ce' in line for line in lines if 'loss' in line)
    assert any('val_top1' in line for line in lines)

    # a finished run found on disk is not trained again
    again = finetune(model, None, bundle.train_loader, None, cfg, tmp_path, progress=False)
    assert again.resumed_from == 14 and again.steps == 14 and math.isnan(again.train_loss)


def test_jsonl_tracker_appends(tmp_path):
    t = JsonlTracker(tmp_path / 'm.jsonl')
    t.log({'loss': 1.5}, step=3)
    t.log({'loss': 1.0}, step=4)
    rows = [json.loads(x) for x in (tmp_path / 'm.jsonl').read_text().splitlines()]
    assert [(r['step'], r['loss']) for r in rows] == [(3, 1.5), (4, 1.0)]


@pytest.mark.launch
def test_kill_during_finetune_then_resume_matches_uninterrupted(image_folder, tmp_path):
    """SIGKILL after step 5 (last checkpoint: step 4); the resumed run redoes step 5 and ends bit-identical.

    Dropout and random augmentation are on: both are reseeded per step / per sample, so a resumed run that lost,
    repeated or reordered a step would end with different weights.
    """
    common = ['--data', image_folder, '--drop-rate', 0.2, '--checkpoint-every', 2]
    straight = _run(common, tmp_path / 'straight')
    killed_dir = tmp_path / 'killed'
    victim = _run(common + ['--hang-after-step', 5], killed_dir)
    deadline = time.monotonic() + 240
    while not (killed_dir / 'hanging').exists():
        assert victim.poll() is None, victim.communicate()[0][-4000:]
        assert time.monotonic() < deadline, 'run never reached step 5'
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(killed_dir / 'checkpoints')] == ['step_2', 'step_4']
    assert not (killed_dir / 'final.safetensors').exists()

    _finish(straight)
    _finish(_run(common, killed_dir))
    resumed = json.loads((killed_dir / 'result.json').read_text())
    assert resumed['resumed_from'] == 4 and resumed['steps'] == resumed['total_steps'] == 18
    assert _max_diff(tmp_path / 'straight', killed_dir) <= 1e-6


def test_resume_ignores_interrupted_checkpoint_write(image_folder, tmp_path):
    """A save killed mid-write leaves only a .tmp dir: it is neither resumed from nor kept."""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv3_small_050', num_classes=3)
    data = DataSpec(dataset='imagefolder', root=str(image_folder), num_classes=3, batch_size=8, workers=0)
    bundle = create_loaders(data, model, input_size=(3, 32, 32))
    cfg = FinetuneSpec(epochs=0.5, lr=0.02, checkpoint_every=2, seed=0)
    stale = tmp_path / 'checkpoints' / '.tmp-step_6'
    stale.mkdir(parents=True)
    (stale / 'model.safetensors').write_bytes(b'truncated')
    result = finetune(model, None, bundle.train_loader, None, cfg, tmp_path, progress=False)
    assert result.resumed_from is None and result.steps == 4
    assert not stale.exists()


# Rounding bound for the accumulation test (float64). Batch 8 in one step and 4 + 4 accumulated compute the same
# gradient with the additions of the batch reduction in another order: each step differs by O(u) relative (u the
# unit roundoff), and the 18 SGD steps amplify that. The amplification is the same in any precision, so the final
# difference scales with u: on an AVX2 EPYC, float32 runs differ by 2.3e-7 and float64 runs by 1.7e-15
# (ratio 2**27, u32/u64 = 2**29). The largest float32 difference seen on any x86-64 CPU is 3.5e-4 (an AVX-512
# EPYC, where one-step-of-8 vs two-processes-of-4 was once asserted), i.e. 3.5e-4 * 2**-29 = 7e-13 in float64.
# 1e-9 leaves three orders of magnitude above that, and is still 10**5 below a real bug's footprint (a lost or
# repeated step, or a wrongly scaled gradient, moves weights by > 1e-4 here).
FLOAT64_REDUCTION_ORDER_BOUND = 1e-9


@pytest.mark.launch
def test_gradient_accumulation_matches_large_batch(image_folder, tmp_path):
    """batch 4 x accumulate 2 == batch 8, to float64 rounding (GroupNorm model: no batch-size dependence besides
    the mean). The accumulated loss is divided by 2 before backward: exact in binary floating point."""
    big = _run(['--data', image_folder, '--batch-size', 8, '--epochs', 1, '--float64'], tmp_path / 'big')
    _finish(big)
    _finish(
        _run(['--data', image_folder, '--batch-size', 4, '--accum', 2, '--epochs', 1, '--float64'], tmp_path / 'acc')
    )
    assert json.loads((tmp_path / 'acc' / 'result.json').read_text())['steps'] == 9
    weights = load_file(str(tmp_path / 'acc' / 'final.safetensors'))
    assert all(v.dtype == torch.float64 for v in weights.values() if v.is_floating_point())
    assert _max_diff(tmp_path / 'big', tmp_path / 'acc') <= FLOAT64_REDUCTION_ORDER_BOUND


@pytest.mark.launch
def test_torchrun_two_cpu_processes_match_accumulation_bit_for_bit(image_folder, tmp_path):
    """torchrun --nproc_per_node 2 (gloo), batch 4 per process == 1 process, batch 4, accumulate 2: bit-identical.

    Exact by construction, on any CPU: both runs compute the same two per-batch gradients g1, g2 with the same
    kernels (batch 4, one thread), and combine them as g1/2 + g2/2 -- DDP halves each process's gradient and the
    gloo all-reduce adds two numbers (commutative); accumulation backpropagates loss/2 twice into .grad. Halving
    is exact in binary floating point, so no rounding differs. Accelerate deals whole batches round-robin to the
    processes, so process 0 gets batches 0, 2, 4, ... and process 1 gets 1, 3, 5, ...: the same pairs that one
    process accumulates. (That a batch of 8 equals 4 + 4 is the float64 test above.)
    """
    acc = _run(['--data', image_folder, '--batch-size', 4, '--accum', 2], tmp_path / 'acc')
    _finish(acc)
    launcher = [str(BIN / 'torchrun'), '--standalone', '--nproc_per_node', '2']
    _finish(_run(['--data', image_folder, '--batch-size', 4], tmp_path / 'two', launcher=launcher))
    r1, r2 = (json.loads((tmp_path / d / 'result.json').read_text()) for d in ('acc', 'two'))
    assert r2['world_size'] == 2 and r1['steps'] == r2['steps'] == 18
    # 30 val images over 2 processes x batch 4 is uneven: gather_for_metrics must count each exactly once
    assert r1['val']['n'] == r2['val']['n'] == 30
    assert r2['val']['top1'] == r1['val']['top1']
    assert _max_diff(tmp_path / 'acc', tmp_path / 'two') == 0.0


@pytest.mark.launch
def test_measure_shards_parent_and_student_over_two_processes(image_folder, tmp_path):
    """_stages.measure under torchrun x2 (gloo): each process scores about half of the 30 validation images (Accelerate
    pads the uneven tail with repeats), gather_for_metrics counts each image once, and the figures equal 1 process."""
    script = REPO / 'tests' / 'scripts' / 'measure_run.py'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    for out, launcher in (
        (tmp_path / 'one', [sys.executable]),
        (tmp_path / 'two', [str(BIN / 'torchrun'), '--standalone', '--nproc_per_node', '2']),
    ):
        subprocess.run(
            launcher + [str(script), '--data', str(image_folder), '--out', str(out)],
            env=env,
            check=True,
            capture_output=True,
            timeout=240,
        )
    one = json.loads((tmp_path / 'one' / 'rank0.json').read_text())
    two = [json.loads((tmp_path / 'two' / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert one['seen'] == {'parent': 30, 'student': 30}
    assert [r['world_size'] for r in two] == [2, 2]
    for model in ('parent', 'student'):
        per_rank = [r['seen'][model] for r in two]
        assert all(14 <= n <= 16 for n in per_rank) and sum(per_rank) >= 30, per_rank  # 8 batches of <= 4, dealt 4 + 4
    for r in two:
        m, ref = r['metrics'], one['metrics']
        assert m['n'] == ref['n'] == 30
        for key in ('top1', 'top5', 'parent_top1', 'parent_top5'):
            assert m[key] == ref[key]  # hit counts are integers: the same images give the same fractions exactly


def test_two_trainings_with_different_precision_share_one_accelerator(image_folder, tmp_path):
    """Parent adaptation in fp32, then distillation in bf16, in one process on one Accelerator: the second call
    neither raises "AcceleratorState has already been initialized" nor keeps the first call's precision."""
    torch.manual_seed(0)
    parent = timm.create_model('resnet18', num_classes=3, channels=(16, 32, 64, 128))
    student = timm.create_model('resnet18', num_classes=3, channels=(8, 16, 32, 64))
    data = DataSpec(dataset='imagefolder', root=str(image_folder), num_classes=3, batch_size=8, workers=0)
    bundle = create_loaders(data, parent, input_size=(3, 32, 32))
    dtypes = {'parent': set(), 'student': set()}
    for name, model in (('parent', parent), ('student', student)):
        model.fc.register_forward_hook(lambda _m, _i, out, _n=name: dtypes[_n].add(out.dtype) if _m.training else None)

    accelerator = process_accelerator()
    adapted = finetune(
        parent,
        None,
        bundle.train_loader,
        None,
        ParentTrainSpec(epochs=0.5, lr=0.02),
        tmp_path / 'p',
        accelerator=accelerator,
        progress=False,
    )
    kept = {f'layer{i + 1}': torch.arange(w) for i, w in enumerate((8, 16, 32, 64))}
    distilled = finetune(
        student,
        adapted.model,
        bundle.train_loader,
        bundle.val_loader,
        FinetuneSpec(epochs=0.5, lr=0.02, mixed_precision='bf16', kd_logits_weight=0.5),
        tmp_path / 's',
        accelerator=accelerator,
        kept=kept,
        input_size=(3, 32, 32),
        progress=False,
    )
    assert process_accelerator() is accelerator
    assert adapted.steps == distilled.steps == 4 and distilled.val.n == 30
    assert dtypes == {'parent': {torch.float32}, 'student': {torch.bfloat16}}
    assert all(p.dtype == torch.float32 for p in distilled.model.parameters())  # master weights stay fp32


@pytest.mark.launch
def test_bf16_mixed_precision_run(image_folder, tmp_path):
    """bf16 autocast (CPU-capable) for student and teacher; the run completes with a finite loss and fp32 master
    weights."""
    _finish(_run(['--data', image_folder, '--mixed-precision', 'bf16', '--epochs', 0.5], tmp_path / 'bf16'))
    result = json.loads((tmp_path / 'bf16' / 'result.json').read_text())
    assert result['steps'] == 4 and math.isfinite(result['train_loss']) and result['val']['n'] == 30
    weights = load_file(str(tmp_path / 'bf16' / 'final.safetensors'))
    assert all(v.dtype == torch.float32 for v in weights.values())  # master weights stay fp32


def test_channels_last_distillation_resumes_bit_for_bit_and_leaves_models_contiguous(image_folder, tmp_path):
    """`channels_last: true` (NHWC while training, a CPU speed-up for depthwise convs) with inner KD: a run stopped
    after its step-4 checkpoint and resumed ends bit-identical to an uninterrupted one (the optimizer state saved
    and loaded in that layout), and the student and the teacher are handed back contiguous, as safetensors needs."""
    torch.manual_seed(0)
    teacher = timm.create_model('mobilenetv3_small_050', num_classes=3).eval()
    data = DataSpec(dataset='imagefolder', root=str(image_folder), num_classes=3, batch_size=8, workers=0)
    bundle = create_loaders(data, teacher, input_size=(3, 32, 32))
    cfg = FinetuneSpec(epochs=1, lr=0.02, checkpoint_every=2, seed=0, channels_last=True, kd_logits_weight=0.5)

    class Stop(Exception):
        pass

    def stop_after_4(step, _metrics):
        if step == 4:
            raise Stop

    def run(out, callback=None):
        torch.manual_seed(1)
        student = timm.create_model('mobilenetv3_small_050', num_classes=3)  # same widths: every point projects
        return finetune(
            student, teacher, bundle.train_loader, bundle.val_loader, cfg, out, progress=False, step_callback=callback
        )

    straight = run(tmp_path / 'straight')
    with pytest.raises(Stop):
        run(tmp_path / 'stopped', stop_after_4)
    resumed = run(tmp_path / 'stopped')
    assert resumed.resumed_from == 4 and resumed.steps == straight.steps == 9
    assert resumed.val.top1 == straight.val.top1
    for model in (straight.model, resumed.model, teacher):
        assert all(t.is_contiguous() for t in model.state_dict().values())
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
