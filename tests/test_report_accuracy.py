"""`divico report accuracy`: evaluation summaries -> the accuracy-vs-tau table, CSV and plot."""

from __future__ import annotations

import json
from pathlib import Path

from cli_helpers import run_divico


def write(path: Path, summary: dict) -> Path:
    path.write_text(json.dumps(summary))
    return path


def heldout(accuracy: float, mode: str, tau: float | None, **extra) -> dict:
    return {"samples": 100, "accuracy": accuracy, "mode": mode, "tau": tau, "visual_tokens_kept": 64, "tags": {},
            **extra}


def pope(f1: float, mode: str, tau: float | None, **extra) -> dict:
    return {"task": "pope", "mode": mode, "tau": tau, "kept": 64, "questions": 9, "tags": {},
            "figures": {"f1": f1, "accuracy": 0.5, "questions": 9}, **extra}


def test_the_table_joins_benchmarks_by_method_and_tau(tmp_path, capsys):
    files = [write(tmp_path / "base.json", heldout(0.5, "none", None)),
             write(tmp_path / "divico-tau111.json", heldout(0.64, "divico", 0.1111111)),
             write(tmp_path / "moe-tau111.json", heldout(0.6, "divico", 0.1111111)),
             write(tmp_path / "a.json", pope(0.8, "divico", 0.1111111, tags={"method": "divico"})),
             write(tmp_path / "b.json", pope(0.75, "none", None, tags={"method": "base"}))]
    out = tmp_path / "report"
    assert run_divico(["report", "accuracy", *map(str, files), "--out", str(out)]) == 0
    table = (out / "accuracy.md").read_text()
    assert "| method | tau | kept | POPE F1 | held-out |" in table
    assert "| base | - | 64 | 75.0 | 50.0 ± 5.0 |" in table  # s.e. sqrt(0.25 / 100); F1 has none
    assert "| divico | 11.1% | 64 | 80.0 | 64.0 ± 4.8 |" in table
    assert "| moe | 11.1% | 64 |  | 60.0 ± 4.9 |" in table
    assert (out / "accuracy.csv").read_text().count("\n") == 6 and (out / "accuracy.png").stat().st_size > 1000
    assert table.strip() in capsys.readouterr().out
    # A folder stands for every summary below it.
    (tmp_path / "more").mkdir()
    write(tmp_path / "more" / "fastv-tau111.json", heldout(0.55, "fastv", 0.1111111))
    assert run_divico(["report", "accuracy", str(tmp_path / "more"), *map(str, files), "--out", str(out)]) == 0
    assert "| fastv | 11.1% | 64 |  | 55.0 ± 5.0 |" in (out / "accuracy.md").read_text()


def test_ambiguous_or_partial_summaries_exit_2(tmp_path, caplog):
    one = write(tmp_path / "x.json", pope(0.8, "divico", 0.1111111, tags={"method": "divico"}))
    two = write(tmp_path / "y.json", pope(0.7, "divico", 0.1111111, tags={"method": "divico"}))
    assert run_divico(["report", "accuracy", str(one), str(two), "--out", str(tmp_path)]) == 2
    assert "both pope of method 'divico' at tau 0.1111111; set tags.method" in caplog.text
    partial = pope(0.7, "fastv", 0.2)
    del partial["figures"]
    assert run_divico(["report", "accuracy", str(write(tmp_path / "p.json", {**partial, "missing": 3})),
                       "--out", str(tmp_path)]) == 2
    assert "answered only in part (3 questions missing)" in caplog.text
    assert run_divico(["report", "accuracy", str(write(tmp_path / "z.json", {"loss": 1})), "--out",
                       str(tmp_path)]) == 2 and "not an evaluation summary" in caplog.text
