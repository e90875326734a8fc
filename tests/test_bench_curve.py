"""`divico bench accuracy --curve` at a toy size: the base is trained slice by slice through the
real `divico train`, each slice's checkpoint scored per question kind into curve.jsonl and
TensorBoard; a stopped curve resumes without rescoring its points and ends with the epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_prep import grid
from pipeline.cli import main as divico

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOY = ["vars.train.samples=96", "vars.heldout.samples=16", "vars.finetune.samples=8"]  # 3 steps of 32


def curve(out: Path, *flags: str) -> str:
    """The curve command in its own process (training joins a process group), its output."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "accuracy", "--curve", "--every", "2",
                           "--curve-questions", "12", "--out", str(out), *flags, *TOY],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_curve_scores_each_slice_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    printed = curve(out, "--curve-steps", "2")
    assert not (out / "base" / "train_summary.json").exists()  # stopped inside the epoch
    first = (out / "curve" / "curve.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in first] == [2]
    assert "step     2  all" in printed and "count" in printed

    curve(out)  # on to the end of the epoch: step 3 (a slice of 2 stops at the epoch's end)
    lines = (out / "curve" / "curve.jsonl").read_text().splitlines()
    assert lines[0] == first[0]  # the point of step 2 is kept, not rescored
    points = [json.loads(line) for line in lines]
    assert [point["step"] for point in points] == [2, 3]
    assert (out / "base" / "train_summary.json").is_file() and (out / "curve" / "curve.png").is_file()
    for point in points:
        assert point["questions"] == 12
        assert set(point["accuracy_by_kind"]) == set(point["loss_by_kind"]) == set(grid.HEADLINE_KINDS)
        assert all(0 <= value <= 1 for value in point["accuracy_by_kind"].values())
        assert all(value > 0 for value in point["loss_by_kind"].values())

    assert sorted(path.name for path in (out / "tensorboard").iterdir()) == ["base", "base-heldout"]
    events = EventAccumulator(str(out / "tensorboard" / "base-heldout"), size_guidance={"scalars": 0})
    events.Reload()
    for kind in grid.HEADLINE_KINDS:
        assert [event.step for event in events.Scalars(f"heldout/accuracy/{kind}")] == [2, 3]
        assert [event.value for event in events.Scalars(f"heldout/loss/{kind}")] == pytest.approx(
            [point["loss_by_kind"][kind] for point in points])


def test_curve_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        divico(["bench", "accuracy", "--curve", "--every", "0", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--every 0: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        divico(["bench", "accuracy", "--only", "eval_nothing", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "no stage(s) ['eval_nothing']" in capsys.readouterr().err


def test_a_shipped_base_is_verified_installed_and_replaces_training(tmp_path: Path) -> None:
    from launch.stages import load_pipeline
    from pipeline.bench import shipped_base
    from pipeline.bench.accuracy import BENCH

    out = tmp_path / "bench"
    curve(out)  # trains the toy base through the epoch
    pipeline = load_pipeline(BENCH, [f"root={out}", *TOY], workdir=REPO)
    shipped = shipped_base.ship(pipeline, tmp_path / "shipped")
    manifest = json.loads((shipped / shipped_base.MANIFEST).read_text())
    assert "model.safetensors" in manifest["sha256"] and manifest["steps"] == 3
    assert (shipped / shipped_base.RECORD / "curve.jsonl").is_file()

    fresh = load_pipeline(BENCH, [f"root={tmp_path / 'fresh'}", *TOY], workdir=REPO)
    assert shipped_base.applies(fresh, shipped)
    other = load_pipeline(BENCH, [f"root={tmp_path / 'fresh'}", *TOY, "vars.grid_side=8"], workdir=REPO)
    assert not shipped_base.applies(other, shipped)
    recipe = load_pipeline(BENCH, [f"root={tmp_path / 'fresh'}", *TOY], workdir=REPO)
    assert shipped_base.trained_as(recipe) == manifest["trained_as"]

    (shipped / "config.json").write_text((shipped / "config.json").read_text() + " ")  # damaged
    with pytest.raises(shipped_base.ShippedBaseError, match="config.json: sha256 differs"):
        shipped_base.install(fresh, shipped)
    assert not (tmp_path / "fresh" / "base" / "model").exists()
    (shipped / "config.json").write_text((shipped / "config.json").read_text()[:-1])
    installed = shipped_base.install(fresh, shipped)
    assert {stage.name for stage in installed.stages}.isdisjoint(shipped_base.BASE_STAGES)
    copied = tmp_path / "fresh" / "base" / "model"
    assert sorted(path.name for path in copied.iterdir()) == sorted([*manifest["sha256"], shipped_base.MANIFEST])
    assert installed.restricted(["eval_base"]).stages[-1].name == "eval_base"  # runs without the base stages
    assert shipped_base.describe(fresh).startswith("the repository's export (3 steps")

    (out / "base" / "model").mkdir()  # a base trained in DIR itself (--retrain-base) is kept, not replaced
    assert shipped_base.install(pipeline, shipped) is pipeline
    assert shipped_base.describe(pipeline).startswith("trained here")
