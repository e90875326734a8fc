"""`divico bench accuracy` at a toy size: every row of configs/pipelines/bench_accuracy.yaml runs
through the real pipeline, a killed run resumes without redoing finished cells, and the outputs
are written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.stages import load_pipeline
from pipeline.bench.accuracy import BENCH, QUICK

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOY = ["vars.train.samples=64", "vars.finetune.samples=32", "vars.heldout.samples=16", "vars.taus=[0.1111111]",
       "vars.k_sweep.layers=[1]", "vars.k_sweep.questions=8", "vars.moe.taus=[0.0888889,0.1111111]",
       "vars.seeds=[0]", "vars.training_free=[fastv]", "vars.trained=[divico]", "vars.ablations=[divico_init_zero]", "vars.eval=max_new_tokens=2 "
       "model_max_length=512 batch_size=16 device=cpu"]


def bench(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "bench", "accuracy", "--out", str(out), *TOY],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"}, start_new_session=True)


def test_a_killed_bench_resumes_without_redoing_finished_cells(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    first = bench(out)
    base_cell = out / "cells" / "none.json"
    deadline = time.monotonic() + 600
    while not base_cell.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert base_cell.exists(), first.communicate()[0][-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # mid-run: later cells unfinished
    first.wait()
    finished = {path: path.stat().st_mtime_ns for path in (out / "cells").glob("*.json")}

    second = bench(out)
    log = second.communicate(timeout=900)[0]
    assert second.returncode == 0, log[-4000:]
    assert "eval_base eval_base: outputs complete, skipped" in log
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished.items())

    rows = json.loads((out / "results.json").read_text())
    cells = {(row["method"], row["condition"]) for row in rows}
    assert cells == {("none", "clean"), ("fastv", "clean"), ("random", "clean"), ("divico", "clean"),
                     ("divico_init_zero", "clean"), ("fastv", "noise"), ("divico", "noise")}
    assert all(row["questions"] == 16 and 0 <= row["accuracy"] <= 1 for row in rows)
    base = next(row for row in rows if row["method"] == "none")
    assert base["retention"] == (1 if base["accuracy"] > 0 else None)  # a toy base may answer nothing right
    for name in ("report.md", "results.csv", "accuracy_vs_tau.png", "kept_tokens.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "divico bench accuracy" in report and "torch" in report
    sweep = {(row["method"], row["questions"]) for row in json.loads((out / "k_sweep" / "results.json").read_text())}
    assert sweep == {("none", 8), ("fastv_k1", 8), ("random_k1", 8)}  # on the same first questions
    assert "Paired difference fastv_k1 - random_k1" in (out / "k_sweep" / "report.md").read_text()
    # The MoE model at a trained and an unseen tau, each against the (nearest) specialist run there.
    moe = {(row["method"], round(row["tau"], 4)) for row in json.loads((out / "moe" / "results.json").read_text())}
    assert moe == {(method, tau) for method in ("moe", "specialist") for tau in (0.0889, 0.1111)}
    assert "Paired difference moe - specialist" in (out / "moe" / "report.md").read_text()
    assert (out / "moe" / "moe.png").stat().st_size > 0  # accuracy and router weights against tau


def test_quick_is_the_same_graph_with_fewer_cells() -> None:
    full = load_pipeline(BENCH, workdir=REPO)
    quick = load_pipeline(BENCH, QUICK, workdir=REPO)
    assert [stage.name for stage in quick.stages] == [stage.name for stage in full.stages]
    assert sum(len(s.tasks) for s in quick.stages) < sum(len(s.tasks) for s in full.stages) / 3
    # The full grid: >= 2,000 held-out questions per kind, 3 seeds, every method at every tau.
    assert full.vars["heldout"]["samples"] >= 4 * 2000 and len(full.vars["seeds"]) >= 3
    assert len(full.stage("trained").tasks) == len(full.vars["trained"]) * len(full.vars["taus"]) * 3
