"""`kpid-zoo build` end to end on real CIFAR-10 images, micro-sized, and its resume."""
import json

import pytest
import timm
import torch
import yaml

import kpid_zoo  # noqa: F401  (registers kpid_pruned for local-dir: loading)
from kpid_zoo.cli import main
from kpid_zoo.flops import count_flops


@pytest.fixture
def micro_recipe(tmp_path, cifar10_tarball):
    recipe = {
        "name": "kpid_micro_cifar10",
        "parent": {"model": "resnet18", "weights": "none", "num_classes": 10, "train": {"epochs": 1, "lr": 0.01}},
        "input_size": [3, 32, 32],
        "flops": {"target_ratio": 0.5, "tolerance": 0.05},
        "importance": {"method": "taylor", "batches": 1, "batch_size": 16},
        "data": {"dataset": "cifar10", "root": str(cifar10_tarball), "batch_size": 32, "workers": 0,
                 "crop_pct": 1.0, "train_subset": 96, "val_subset": 48},
        "finetune": {"epochs": 1, "lr": 0.01, "checkpoint_every": 2, "kd_logits_weight": 0.5},
    }
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_build_exports_a_timm_loadable_pruned_model_and_resumes(micro_recipe, tmp_path, capsys):
    out, work = tmp_path / "export", tmp_path / "work"
    args = ["build", str(micro_recipe), "--out", str(out), "--work", str(work), "--quiet"]
    assert main(args) == 0
    assert "top-1" in capsys.readouterr().out

    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    report = json.loads((work / "pruned" / "report.json").read_text())
    assert config["kpid"]["metrics"]["n"] == 48
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_flops(model, (3, 32, 32)).gmacs == pytest.approx(report["achieved_gmacs"])
    assert report["target_gmacs"] * 0.95 <= report["achieved_gmacs"] <= report["target_gmacs"]

    # a second run finds every stage done and changes nothing
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    weights = (out / "model.safetensors").read_bytes()
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "model.safetensors").read_bytes() == weights


def test_readme_main_command_builds_the_tiny_cifar10_entry(tmp_path, repo_root, cifar10_tarball):
    """The README's main job, end to end (about 5 CPU-minutes): it runs in CI, so the contract command stays green."""
    out, work = tmp_path / "export", tmp_path / "work"
    recipe = repo_root / "recipes" / "kpid_resnet18_cifar10_tiny.yaml"
    assert main(["build", str(recipe), "--out", str(out), "--work", str(work), "--quiet"]) == 0
    metrics = json.loads((out / "config.json").read_text())["kpid"]["metrics"]
    assert metrics["top1"] > 20.0  # well above chance (10%) after the short CPU schedule
    report = json.loads((work / "pruned" / "report.json").read_text())
    assert report["target_gmacs"] * 0.95 <= report["achieved_gmacs"] <= report["target_gmacs"]
