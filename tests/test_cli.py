import json
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from kpid_zoo.cli import main
from kpid_zoo.surgery import ArchSpec, build_pruned


def _recipe(tmp_path, **overrides):
    recipe = {
        "name": "cli_resnet18",
        "parent": {"model": "resnet18", "weights": "none"},
        "input_size": [3, 64, 64],
        "flops": {"target_ratio": 0.5, "tolerance": 0.02},
        "importance": {"method": "magnitude"},
        "data": {"dataset": "imagefolder", "root": "unused-by-magnitude-importance"},
    }
    recipe.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_help_reads_well_from_the_installed_entry_point():
    out = subprocess.run([sys.executable, "-m", "kpid_zoo.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("flops", "groups", "prune", "build", "publish"):
        assert command in out.stdout
    assert "examples:" in out.stdout


def test_flops_prints_timm_gmacs(capsys):
    assert main(["flops", "resnet50"]) == 0
    assert "resnet50 at 3x224x224: 4.1115 GMACs, 25.557M params" in capsys.readouterr().out


def test_unknown_model_suggests_the_right_name(capsys):
    assert main(["flops", "efficentnet_b0"]) == 2  # a user error: exit 2, one line
    assert "did you mean efficientnet_b0" in capsys.readouterr().err


def test_groups_lists_fixed_groups_with_their_reason(capsys):
    assert main(["groups", "resnet18", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "resnet18: 13 channel groups, 12 prunable" in out
    assert "[fixed: network output]" in out


def test_prune_writes_weights_spec_report_and_plot(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(_recipe(tmp_path)), "--out", str(out), "--quiet"]) == 0
    assert "FLOPs error vs target" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json", "spec.json", "widths.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["target_gmacs"] * 0.98 <= report["achieved_gmacs"] <= report["target_gmacs"]
    assert (out / "widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = build_pruned(ArchSpec.load(out / "spec.json"))
    model.load_state_dict(load_file(out / "model.safetensors"))  # strict: the spec rebuilds exactly these tensors
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert not list(tmp_path.glob(".pruned.tmp-*")), "a temporary folder was left behind"


def test_bad_recipe_is_a_clear_error_naming_file_and_field(tmp_path, capsys):
    path = _recipe(tmp_path, flops={"target_ratio": 1.5})
    assert main(["prune", str(path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "flops.target_ratio" in err
    assert not (tmp_path / "x").exists()


def test_zoo_prints_the_zoo_table(capsys):
    from kpid_zoo.registry import zoo_records

    assert main(["zoo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "source", "parent", "img_size", "gmacs", "param_count", "top1", "top5",
                                "eval_size"]
    assert len(lines) == 1 + len(zoo_records)
    assert lines[1:] and all(line.startswith("kpid_") for line in lines[1:])
    row = next(line.split() for line in lines if line.startswith("kpid_efficientnet_b1."))
    assert row == ["kpid_efficientnet_b1.in1k", "efficientnet_b1_pruned.in1k", "efficientnet_b1", "240", "0.404",
                   "6.33", "78.242", "93.836", "240"]
    assert main(["zoo", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "model,source,parent,img_size,gmacs,param_count,top1,top5,eval_size"


def test_flops_of_a_zoo_entry_and_a_bad_tag(capsys):
    assert main(["flops", "kpid_efficientnet_b1", "--input-size", "64"]) == 0
    assert "kpid_efficientnet_b1 at 3x64x64:" in capsys.readouterr().out
    assert main(["flops", "kpid_efficientnet_b1.nope"]) == 2
    assert "kpid_efficientnet_b1.nope: Invalid pretrained tag (nope)" in capsys.readouterr().err


def test_build_and_prune_find_a_packaged_recipe_by_name(monkeypatch, tmp_path, capsys):
    import kpid_zoo.build
    from kpid_zoo.zoo import RECIPES_DIR

    seen = []
    monkeypatch.setattr(kpid_zoo.build, "build", lambda recipe, **kw: seen.append(recipe) or (_ for _ in ()).throw(
        OSError("stop here")))
    monkeypatch.chdir(tmp_path)  # no recipes/ folder around: only the packaged copy can answer
    assert main(["build", "kpid_effnet_b0"]) == 2
    assert seen == [RECIPES_DIR / "kpid_effnet_b0.yaml"]
    assert main(["build", "kpid_nope"]) == 2
    err = capsys.readouterr().err
    assert "kpid_nope: no such recipe file, nor a packaged recipe of that name (kpid_effnet_b0," in err
