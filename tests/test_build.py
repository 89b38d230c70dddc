"""`kpid-zoo build` end to end on real CIFAR-10 images, micro-sized: resume, provenance, integrity, the lock."""

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import timm
import torch
import yaml

import kpid_zoo  # noqa: F401  (registers kpid_pruned for local-dir: loading)
from kpid_zoo.cli import main
from kpid_zoo.core.files import file_sha256
from kpid_zoo.engine.flops import count_flops

# Floors for the README's main job (docs/main_job.md, full test set): seed 0 gave parent 79.34% / pruned 79.90%,
# seed 1 80.42% / 80.10%, so 1.1 points between seeds for the parent and -0.3 to +0.6 for pruned minus parent.
# Another CPU (AVX2 vs AVX-512 kernels round differently) or another torch/timm takes another training path, as
# another seed does. The floors sit about ten points (8x the seed spread, 25 binomial SE of a 10,000-image top-1)
# under the measured parents, and five points under the parent for the pruned net. They still catch what matters:
# an untrained or broken parent (chance is 10%, and so is the ImageNet net with its fresh 10-class head) and a
# pruned net left unrecovered (straight out of pruning, before the fine-tune, seed 0's scored 17% on 2000 images).
MAIN_JOB_PARENT_TOP1_FLOOR = 70.0
MAIN_JOB_PRUNED_MAX_DROP = 5.0


@pytest.mark.heavy
@pytest.mark.slow
def test_readme_main_command_builds_the_cifar10_entry(tmp_path, repo_root, cifar10_tarball):
    """The README's main job, end to end, with the accuracy it promises (about 13 CPU-minutes, 6-8 minutes on 2 idle
    cores: more than the CI budget leaves, so CI runs the same recipe on a subset, below)."""
    out, work = tmp_path / 'export', tmp_path / 'work'
    recipe = repo_root / 'recipes' / 'kpid_effnet_lite0_cifar10.yaml'
    assert main(['build', str(recipe), '--out', str(out), '--work', str(work), '--quiet']) == 0
    metrics = json.loads((out / 'config.json').read_text())['kpid']['metrics']
    assert metrics['n'] == 10_000 and metrics['split'] == 'test'  # the full CIFAR-10 test set
    assert metrics['parent_top1'] >= MAIN_JOB_PARENT_TOP1_FLOOR
    assert metrics['top1'] >= metrics['parent_top1'] - MAIN_JOB_PRUNED_MAX_DROP
    report = json.loads((work / 'pruned' / 'report.json').read_text())
    assert report['target_gmacs'] == pytest.approx(0.5 * report['parent_gmacs'])
    assert report['target_gmacs'] * 0.98 <= report['achieved_gmacs'] <= report['target_gmacs']


@pytest.mark.launch
def test_readme_main_recipe_runs_every_stage_on_a_cifar10_subset(tmp_path, repo_root, cifar10_tarball):
    """The README's recipe through the README's command, every field as shipped but the data: 640 training images
    (10 steps of parent adaptation, 5 of distillation) and 500 test images, one thread (about a minute).

    What the subset can vouch for is that every stage runs for this recipe and the export loads; accuracy after 10
    steps can only be checked against chance: the adapted parent measured 27% top-1 here, and the floor of 16% sits
    4.5 binomial standard errors (sqrt(0.1 * 0.9 / 500) = 1.3 points) above chance, 11 points under that figure."""
    recipe = yaml.safe_load((repo_root / 'recipes' / 'kpid_effnet_lite0_cifar10.yaml').read_text())
    recipe['data'].update(train_subset=640, val_subset=500, root=str(cifar10_tarball))
    path = tmp_path / 'main_job_subset.yaml'
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out, work = tmp_path / 'export', tmp_path / 'work'
    # one thread, as the determinism tests below: two threads on two busy cores wait on each other (10x slower)
    _finish(_start(path, out, work))
    metrics = json.loads((out / 'config.json').read_text())['kpid']['metrics']
    assert metrics['n'] == 500 and metrics['split'] == 'test'
    assert metrics['parent_top1'] >= 16.0
    report = json.loads((work / 'pruned' / 'report.json').read_text())
    assert report['target_gmacs'] == pytest.approx(0.5 * report['parent_gmacs'])
    assert report['target_gmacs'] * 0.98 <= report['achieved_gmacs'] <= report['target_gmacs']
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------------------
# Determinism, provenance, integrity, one build per folder. One uninterrupted build (a subprocess on one thread, so
# that kernels reduce in the same order) is the reference the interrupted and altered builds are compared with.

REPO = Path(__file__).resolve().parents[1]
TINY = {
    'name': 'kpid_tiny_cifar10',
    'parent': {'model': 'resnet18', 'weights': 'none', 'num_classes': 10, 'train': {'epochs': 1, 'lr': 0.01}},
    'input_size': [3, 32, 32],
    'flops': {'target_ratio': 0.5, 'tolerance': 0.05},
    'importance': {'method': 'taylor', 'batches': 2, 'batch_size': 16},
    # 96 images in batches of 8: 12 steps per stage, checkpointed every 2 (a tenth of 12, rounded up)
    'data': {
        'dataset': 'cifar10',
        'batch_size': 8,
        'workers': 0,
        'crop_pct': 1.0,
        'train_subset': 96,
        'val_subset': 32,
    },
    'finetune': {'epochs': 1, 'lr': 0.01, 'checkpoint_every': 50, 'kd_logits_weight': 0.5},
}


def _tiny(tmp_path: Path, cifar10_tarball, **changes) -> Path:
    recipe = copy.deepcopy(TINY)
    recipe['data']['root'] = str(cifar10_tarball)
    for dotted, value in changes.items():
        section, key = dotted.split('__')
        recipe[section][key] = value
    path = tmp_path / f'tiny-{uuid.uuid4().hex[:6]}.yaml'
    path.write_text(yaml.safe_dump(recipe))
    return path


def _start(recipe: Path, out: Path, work: Path, hang: str | None = None) -> subprocess.Popen:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    env.pop('KPID_TEST_HANG_AT', None)
    if hang:
        env.update(KPID_TEST_HANG_AT=hang, KPID_TEST_HANG_MARKER=str(work.parent / 'hanging'))
    return subprocess.Popen(
        [sys.executable, '-m', 'kpid_zoo.cli', 'build', str(recipe), '--out', str(out), '--work', str(work), '--quiet'],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _wait_for_hang(proc: subprocess.Popen, marker: Path, point: str) -> None:
    deadline = time.monotonic() + 300
    while not (marker.is_file() and marker.read_text() == point):
        assert proc.poll() is None, f'exited before {point}: {proc.communicate()[0][-4000:]}'
        assert time.monotonic() < deadline, f'never reached {point}'
        time.sleep(0.1)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cifar10_tarball):
    """An uninterrupted build of the tiny recipe: (recipe, out, work, its log)."""
    root = tmp_path_factory.mktemp('reference')
    recipe = _tiny(root, cifar10_tarball)
    log = _finish(_start(recipe, root / 'out', root / 'work'))
    return recipe, root / 'out', root / 'work', log


def _assert_same_build(a_out: Path, a_work: Path, b_out: Path, b_work: Path) -> None:
    for rel in ('parent/model.safetensors', 'pruned/model.safetensors', 'finetune/model.safetensors'):
        assert (a_work / rel).read_bytes() == (b_work / rel).read_bytes(), rel
    keep = [json.loads((w / 'pruned' / 'report.json').read_text())['kept_channels'] for w in (a_work, b_work)]
    assert keep[0] == keep[1]
    assert (a_out / 'model.safetensors').read_bytes() == (b_out / 'model.safetensors').read_bytes()


def _copy_build(reference, tmp_path) -> tuple[Path, Path, Path]:
    recipe, out, work, _ = reference
    shutil.copytree(out, tmp_path / 'out')
    shutil.copytree(work, tmp_path / 'work')
    return recipe, tmp_path / 'out', tmp_path / 'work'


@pytest.mark.launch
def test_build_exports_a_timm_loadable_pruned_model_and_a_rerun_changes_nothing(reference, tmp_path, capsys):
    recipe, out, work = _copy_build(reference, tmp_path)
    assert 'top-1' in reference[3]
    assert {'model.safetensors', 'config.json', 'README.md'} <= {p.name for p in out.iterdir()}
    config = json.loads((out / 'config.json').read_text())
    report = json.loads((work / 'pruned' / 'report.json').read_text())
    assert config['kpid']['metrics']['n'] == 32
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_flops(model, (3, 32, 32)).gmacs == pytest.approx(report['achieved_gmacs'])
    assert report['target_gmacs'] * 0.95 <= report['achieved_gmacs'] <= report['target_gmacs']
    # model.onnx beside the weights, checked on the build's own validation images (issue 24)
    onnx = config['kpid']['onnx']
    assert (out / 'model.onnx').is_file() and 'model.onnx' in config['kpid']['files'], onnx
    assert onnx['check']['passed'] and onnx['check']['inputs'] == '4 validation images of the build (test split)'

    # a second run finds every stage done and changes nothing
    stamps = {p: p.stat().st_mtime_ns for p in [*work.rglob('*'), *out.rglob('*')] if p.is_file()}
    assert main(['build', str(recipe), '--out', str(out), '--work', str(work), '--quiet']) == 0
    log = capsys.readouterr().out
    assert all(f'{stage}: up to date' in log for stage in ('parent', 'pruned', 'finetune', 'eval', 'export'))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


KILLS = [
    'parent:5',
    'parent:written',
    'parent:done',
    'pruned:written',
    'pruned:done',
    'finetune:7',
    'finetune:written',
    'finetune:done',
    'eval:written',
    'eval:done',
    'export:written',
]
KILLS_QUICK = [
    'parent:5',
    'parent:done',
    'pruned:written',
    'finetune:7',
    'finetune:written',
    'eval:done',
    'export:written',
]


def _killed_build_matches(reference, tmp_path, kills, capsys) -> None:
    recipe = reference[0]
    out, work, marker = tmp_path / 'out', tmp_path / 'work', tmp_path / 'hanging'
    for i, point in enumerate(kills):
        proc = _start(recipe, out, work, hang=point)
        _wait_for_hang(proc, marker, point)
        if i == 0:  # a second build of the same folder meanwhile stops at once, naming the holder
            assert main(['build', str(recipe), '--out', str(out), '--work', str(work), '--quiet']) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f'process {proc.pid}' in err, err
        _kill(proc)
    log = _finish(_start(recipe, out, work))
    assert 'parent: not built yet' in reference[3]
    assert 'export: not built yet' not in log  # the last kill had written the export: it was checked, not trusted
    _assert_same_build(reference[1], reference[2], out, work)
    assert not [p for p in tmp_path.rglob('.*') if '.tmp-' in p.name], 'staging left behind'


@pytest.mark.launch
def test_killed_anywhere_the_build_resumes_to_the_same_bytes(reference, tmp_path, capsys):
    """SIGKILL inside each training stage (between checkpoints), after a stage wrote its result but before it
    recorded it, and between stages; each rerun resumes, and the end result is the uninterrupted build's bytes.
    The first run starts clean, so this is also two clean builds (`weights: none`: a seeded init) agreeing."""
    _killed_build_matches(reference, tmp_path, KILLS_QUICK, capsys)


@pytest.mark.launch
@pytest.mark.slow
def test_every_kill_point_resumes_to_the_same_bytes(reference, tmp_path, capsys):
    _killed_build_matches(reference, tmp_path, KILLS, capsys)


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.launch
def test_altered_stage_weights_are_redone_never_exported(reference, tmp_path):
    """One flipped byte in the fine-tune result, then also in its last checkpoint: each rebuild says which file
    it does not trust, redoes from what it can verify, and exports the reference bytes again."""
    recipe, out, work = _copy_build(reference, tmp_path)
    weights = work / 'finetune' / 'model.safetensors'
    _flip_byte(weights)
    log = _finish(_start(recipe, out, work))
    assert f'finetune: {weights} does not match the sha256 recorded when it was written' in log
    assert 'parent: up to date' in log and 'pruned: up to date' in log
    _assert_same_build(reference[1], reference[2], out, work)

    last = sorted((work / 'finetune' / 'checkpoints').glob('step_*'), key=lambda p: int(p.name[5:]))[-1]
    _flip_byte(last / 'model.safetensors')
    _flip_byte(weights)
    log = _finish(_start(recipe, out, work))
    assert f'not resuming from {last}' in log
    _assert_same_build(reference[1], reference[2], out, work)


@pytest.mark.launch
def test_altered_or_garbage_json_results_are_redone(reference, tmp_path):
    recipe, out, work = _copy_build(reference, tmp_path)
    (work / 'pruned' / 'spec.json').write_text('{"parent": "resnet18", "widths": ')
    (work / 'eval.json').write_text('garbage')
    (out / 'config.json').write_text('{}')
    log = _finish(_start(recipe, out, work))
    for path in (work / 'pruned' / 'spec.json', work / 'eval.json', out / 'config.json'):
        assert f'{path} does not match the sha256 recorded' in log
    assert 'finetune: up to date' in log  # the redone pruning gave the same bytes: nothing downstream is stale
    reference_config = json.loads((reference[1] / 'config.json').read_text())
    assert json.loads((out / 'config.json').read_text())['kpid'] == reference_config['kpid']


@pytest.mark.launch
def test_a_changed_recipe_redoes_exactly_the_stale_stages(reference, tmp_path):
    recipe, out, work = _copy_build(reference, tmp_path)
    changed = yaml.safe_load(recipe.read_text())
    changed['flops']['target_ratio'] = 0.25
    recipe = tmp_path / 'changed.yaml'
    recipe.write_text(yaml.safe_dump(changed))
    log = _finish(_start(recipe, out, work))
    assert 'parent: up to date' in log
    assert 'pruned: stale: recipe.flops.target_ratio 0.5 -> 0.25' in log
    assert 'finetune: stale: the pruned result changed' in log
    config = json.loads((out / 'config.json').read_text())['kpid']
    report = json.loads((work / 'pruned' / 'report.json').read_text())
    assert (
        config['target_gmacs'] == pytest.approx(report['target_gmacs']) == pytest.approx(0.25 * report['parent_gmacs'])
    )
    assert config['gmacs'] == pytest.approx(report['achieved_gmacs'])
    # the export describes the weights beside it, and those are the new fine-tune's
    assert (out / 'model.safetensors').read_bytes() == (work / 'finetune' / 'model.safetensors').read_bytes()
    assert config['weights_sha256'] == file_sha256(out / 'model.safetensors')


@pytest.mark.launch
@pytest.mark.parametrize(
    'flops, expected',
    [
        ({'target_gmacs': 5.0}, "is not below the parent's"),
        ({'target_gmacs': 1e-6}, 'is below the smallest reachable'),
    ],
)
def test_unreachable_targets_fail_before_any_work_even_over_a_finished_run(
    reference, tmp_path, capsys, flops, expected
):
    recipe, out, work = _copy_build(reference, tmp_path)
    bad = yaml.safe_load(recipe.read_text())
    bad['flops'] = flops
    recipe = tmp_path / 'bad.yaml'
    recipe.write_text(yaml.safe_dump(bad))
    before = {p: p.stat().st_mtime_ns for p in work.rglob('*')}
    assert main(['build', str(recipe), '--out', str(out), '--work', str(work), '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(recipe) in err and expected in err, err
    assert {p: p.stat().st_mtime_ns for p in work.rglob('*')} == before


@pytest.mark.launch
def test_a_dead_builds_lock_and_staging_are_cleaned_a_live_one_refuses(reference, tmp_path, capsys):
    recipe, out, work = _copy_build(reference, tmp_path)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (work / 'build.lock').write_text(
        json.dumps({'pid': dead.pid, 'host': socket.gethostname(), 'started': '2026-01-01T00:00:00+00:00'})
    )
    leftovers = [
        work / 'finetune' / 'checkpoints' / '.tmp-step_3',
        work / '.pruned.tmp-0123abcd',
        out.parent / f'.{out.name}.tmp-89abcdef',
    ]
    for path in leftovers:
        path.mkdir(parents=True)
        (path / 'model.safetensors').write_bytes(b'half')
    args = ['build', str(recipe), '--out', str(out), '--work', str(work), '--quiet']
    assert main(args) == 0
    assert not any(p.exists() for p in leftovers) and not (work / 'build.lock').exists()
    assert not (out.parent / f'.{out.name}.build.lock').exists()  # the export's lock goes with the build

    (work / 'build.lock').write_text(
        json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': '2026-01-01T00:00:00+00:00'})
    )
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'{work} is being built by process {os.getpid()}' in err


@pytest.mark.launch
def test_a_second_work_folder_building_into_the_same_export_is_refused(reference, tmp_path, capsys):
    """Two builds with their own work folders but one --out would replace each other's export (and remove each
    other's staging): the export folder has a lock of its own."""
    recipe, out, work = _copy_build(reference, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob('*')}
    lock = out.parent / f'.{out.name}.build.lock'
    lock.write_text(
        json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': '2026-01-01T00:00:00+00:00'})
    )
    capsys.readouterr()
    assert main(['build', str(recipe), '--out', str(out), '--work', str(tmp_path / 'other-work'), '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'{out} is being built by process {os.getpid()}' in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == before
    assert not (tmp_path / 'other-work' / 'build.lock').exists()  # the work lock taken first was released
