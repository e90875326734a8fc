"""`divico run` (the embedded default) at a toy size: every stage of configs/pipelines/demo.yaml
runs in one process, the summary prints the evaluations, and a rerun touches nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import run

from launch.stages import load_pipeline
from pipeline.run import DEMO

pytestmark = pytest.mark.slow

SIZES = ["vars.train.samples=48", "vars.finetune.samples=16", "vars.heldout.samples=16", "vars.taus=[0.111]",
         "vars.unseen_taus=[0.0888889]"]


def files(root: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


def test_divico_run_trains_every_stage_evaluates_and_leaves_it_alone_on_rerun(tmp_path):
    root = tmp_path / "demo"
    args = ["run", "--root", str(root), *SIZES]
    first = run(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("base", "divico-tau111"):
        assert (root / stage / "model" / "config.json").is_file()
        assert (root / "tensorboard" / stage).is_dir()
    assert json.loads((root / "divico-tau111" / "model" / "divico.json").read_text())["config"]["tau"] == 0.111
    assert not (root / "base" / "model" / "adapter_config.json").exists()  # the base stage trains in full
    # The base stage trains the random tiny CLIP tower too (tiny_base.yaml); the DiViCo stages keep it frozen.
    towers = {name: {k: v for k, v in load_file(root / name / "model.safetensors").items() if "vision_tower" in k}
              for name in ("tiny_llava", "base/model", "divico-tau111/model")}
    assert towers["tiny_llava"] and towers["tiny_llava"].keys() == towers["base/model"].keys()
    assert any(not towers["tiny_llava"][k].equal(towers["base/model"][k]) for k in towers["tiny_llava"])
    assert all(towers["base/model"][k].equal(towers["divico-tau111/model"][k]) for k in towers["base/model"])

    # One table row per evaluation, carrying that evaluation's own figures.
    rows = {line.split("│")[1].strip(): line for line in first.stdout.splitlines() if line.count("│") > 5}
    expected = {"base": ("none", 100), "fastv-tau111": ("fastv", 11), "divico-tau111": ("divico", 11)}
    for name, (mode, kept) in expected.items():
        result = json.loads((root / "eval" / f"{name}.json").read_text())
        assert result["samples"] == 16 and result["mode"] == mode and result["visual_tokens_kept"] == kept
        cells = [cell.strip() for cell in rows[name].split("│")]
        assert f"{kept} / 100" in cells and f"{result['accuracy']:.1%}" in cells and f"{result['chance']:.1%}" in cells
        standard_error = (result["accuracy"] * (1 - result["accuracy"]) / result["samples"]) ** 0.5
        assert cells[6] == f"{standard_error:.1%}"
    assert rows["fastv-tau111"].split("│")[8].strip() == "-"  # no training run behind FastV
    # DiViCo against FastV at the same tau, question by question, from the two evaluations' answers.
    answers = {name: {row["key"]: row["correct"] for row in map(json.loads, (root / "eval" / f"{name}.jsonl").open())}
               for name in ("divico-tau111", "fastv-tau111")}
    only = [sum(answers[a][key] and not answers[b][key] for key in answers[a])
            for a, b in (("divico-tau111", "fastv-tau111"), ("fastv-tau111", "divico-tau111"))]
    cells = [[cell.strip() for cell in line.split("│")] for line in first.stdout.splitlines()]
    paired = next(row for row in cells if row[1:2] == ["divico-tau111 vs fastv-tau111"])
    assert paired[4:6] == [str(only[0]), str(only[1])]
    assert f"tensorboard --logdir {root / 'tensorboard'}" in first.stdout
    # The Mixture-of-Experts model at the trained tau and at an unseen one, where it meets the
    # specialist of the nearest tau run at that rate; its rows carry the moe run's training figures.
    for name, tau, kept in (("moe-tau111", 0.111, 11), ("moe-tau089", 0.0888889, 9), ("nearest-tau089", 0.0888889, 9)):
        result = json.loads((root / "eval" / f"{name}.json").read_text())
        assert result["tau"] == pytest.approx(tau) and result["visual_tokens_kept"] == kept, name
    assert json.loads((root / "moe" / "model" / "divico.json").read_text())["config"]["encoder"] == "moe"
    assert rows["moe-tau089"].split("│")[8].strip() != "-" and rows["nearest-tau089"].split("│")[8].strip() == "-"
    assert (root / "eval" / "moe.png").stat().st_size > 0 and str(root / "eval" / "moe.png") in first.stdout
    assert json.loads((root / "eval" / "divico-tau111.json").read_text())["router_weights"] is None
    compared = {row[1] for row in cells if len(row) > 2}
    assert {"moe-tau111 vs divico-tau111", "moe-tau089 vs nearest-tau089", "moe-tau089 vs base"} <= compared
    # The reports: accuracy against tau from every evaluation, efficiency per mode; scores in TensorBoard.
    report = (root / "report" / "accuracy.md").read_text()
    divico = json.loads((root / "eval" / "divico-tau111.json").read_text())
    assert f"| divico | 11.1% | 11 | {100 * divico['accuracy']:.1f} ± " in report and "| nearest | 8.9% | 9 |" in report
    assert (root / "report" / "accuracy.png").stat().st_size > 0
    assert "| 8 | divico | 11.1% | 11 |" in (root / "report" / "efficiency.md").read_text()
    assert (root / "tensorboard" / "eval" / "divico-tau111").is_dir()
    assert str(root / "report" / "accuracy.md") in first.stdout

    before = files(root)
    again = run(args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    tasks = [task for stage in load_pipeline(DEMO, [f"root={root}", *SIZES]).stages for task in stage.tasks]
    assert again.stdout.count("outputs complete, skipped") == len(tasks) == 21
    assert files(root) == before  # nothing reloaded, retrained, re-exported or re-evaluated
    assert rows["divico-tau111"] in again.stdout  # the same table
