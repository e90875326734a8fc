"""The accuracy benchmark's report (pipeline/bench/accuracy_report.py) on cells written by hand: 10
questions of 2 kinds whose correctness is known, so every mean, standard error and paired
difference is checked against a number worked out here."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from pipeline.bench.accuracy_report import noise_drops, paired, read_cells, results, write_report

TAU = 0.1111111
KINDS = ["color"] * 5 + ["count"] * 5


def write_cell(folder: Path, method: str, seed: int, pattern: str, *, tau: float | None = TAU,
               condition: str = "clean", keys: list[str] | None = None) -> Path:
    """NAME.json + NAME.jsonl as `divico eval --out --predictions` writes them; `pattern` is one
    character per question, "1" for a correct answer."""
    keys = keys or [f"q{i}" for i in range(len(pattern))]
    name = f"{method}-{tau}-{condition}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    predictions = [{"key": key, "question_type": kind, "question": "?", "answer": "a",
                    "prediction": "a" if mark == "1" else "b", "correct": mark == "1"}
                   for key, kind, mark in zip(keys, KINDS, pattern)]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    summary = {"samples": len(pattern), "accuracy": pattern.count("1") / len(pattern), "by_type": {},
               "mode": method, "tau": tau, "visual_tokens": 100, "visual_tokens_kept": 100 if tau is None else 11,
               "tags": {"method": method, "seed": str(seed), "condition": condition}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(summary))
    return path


# divico: 7, 6, 5 of 10 over three seeds (color 5/4/3 of 5, count 2 of 5 each); fastv 5 of 10 on
# one seed; the base 8 of 10. Noise costs divico exactly one question per seed.
DIVICO = ["1111100110", "1111000110", "1110000110"]
DIVICO_NOISE = ["1111000110", "1110000110", "1100000110"]
FASTV = "1100011100"  # against divico seed 0: 4 questions only divico gets, 2 only fastv
BASE = "1111111100"


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    folder = tmp_path / "cells"
    for seed, (clean, noisy) in enumerate(zip(DIVICO, DIVICO_NOISE)):
        write_cell(folder, "divico", seed, clean)
        write_cell(folder, "divico", seed, noisy, condition="noise")
    write_cell(folder, "fastv", 0, FASTV)
    write_cell(folder, "none", 0, BASE, tau=None)
    return folder


def test_rows_average_seeds_and_give_retention(grid: Path) -> None:
    rows = results(read_cells(grid))
    assert [(r["method"], r["tau"], r["condition"]) for r in rows] == [
        ("none", None, "clean"), ("divico", TAU, "clean"), ("divico", TAU, "noise"), ("fastv", TAU, "clean")]
    base, divico, noisy, fastv = rows
    assert divico["accuracy"] == pytest.approx(0.6)
    assert divico["se"] == pytest.approx(0.1 / math.sqrt(3))  # sd of 0.7, 0.6, 0.5 is 0.1
    assert (divico["questions"], divico["seeds"], divico["visual_tokens_kept"]) == (10, 3, 11)
    assert divico["by_kind"]["color"] == pytest.approx({"accuracy": 0.8, "se": 0.2 / math.sqrt(3), "questions": 5})
    assert divico["by_kind"]["count"] == pytest.approx({"accuracy": 0.4, "se": 0.0, "questions": 5})
    assert noisy["accuracy"] == pytest.approx(0.5)
    # one seed: the binomial standard error over its questions
    assert fastv["se"] == pytest.approx(math.sqrt(0.5 * 0.5 / 10))
    assert base["se"] == pytest.approx(math.sqrt(0.8 * 0.2 / 10))
    assert [r["retention"] for r in rows] == pytest.approx([1.0, 0.75, 0.625, 0.625])


def test_no_base_row_means_no_retention(tmp_path: Path) -> None:
    write_cell(tmp_path, "fastv", 0, FASTV)
    assert results(read_cells(tmp_path))[0]["retention"] is None


def test_paired_difference_on_one_seed_is_exact(tmp_path: Path) -> None:
    write_cell(tmp_path, "a", 0, DIVICO[0])
    write_cell(tmp_path, "b", 0, FASTV)
    difference = paired(read_cells(tmp_path), "a", "b", TAU)
    assert difference.difference == pytest.approx(0.2)
    assert (difference.seeds, difference.questions) == (1, 10)
    assert difference.low <= 0.2 <= difference.high
    assert difference.standard_error > 0


def test_a_single_seed_side_pairs_with_every_seed(grid: Path) -> None:
    cells = read_cells(grid)
    difference = paired(cells, "divico", "fastv", TAU)
    assert (difference.seeds, difference.difference) == (3, pytest.approx(0.6 - 0.5))
    assert paired(cells, "fastv", "divico", TAU).difference == pytest.approx(-0.1)
    # the uncompressed base stands at every tau
    assert paired(cells, "divico", "none", TAU).difference == pytest.approx(0.6 - 0.8)


def test_cells_on_other_questions_do_not_pair(grid: Path) -> None:
    write_cell(grid, "random", 0, FASTV, keys=[f"other{i}" for i in range(10)])
    with pytest.raises(ValueError, match="not on the same questions"):
        paired(read_cells(grid), "random", "fastv", TAU)


def test_seeds_that_do_not_pair_up_are_an_error(grid: Path) -> None:
    for seed in (5, 6):
        write_cell(grid, "random_trained", seed, FASTV)
    with pytest.raises(ValueError, match="seeds do not pair up"):
        paired(read_cells(grid), "random_trained", "divico", TAU)


def test_noise_drop_is_paired_per_seed_and_question(grid: Path) -> None:
    [drop] = noise_drops(read_cells(grid))
    assert (drop["method"], drop["tau"]) == ("divico", TAU)
    assert (drop["clean"], drop["noise"], drop["drop"]) == pytest.approx((0.6, 0.5, 0.1))
    assert drop["relative_drop"] == pytest.approx(0.1 / 0.6)
    assert drop["low"] <= 0.1 <= drop["high"]


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.with_suffix(".jsonl").unlink(), "no predictions beside it"),
    (lambda path: path.write_text(json.dumps({"tau": None, "visual_tokens_kept": 100,
                                              "tags": {"method": "none", "condition": "clean"}})), "tags must hold"),
    (lambda path: path.write_text(json.dumps({"tau": None, "visual_tokens_kept": 100,
                                              "tags": {"method": "none", "seed": "x", "condition": "clean"}})),
     "not an integer"),
])
def test_a_broken_cell_is_named(tmp_path: Path, damage, message: str) -> None:
    path = write_cell(tmp_path, "none", 0, BASE, tau=None)
    damage(path)
    with pytest.raises(ValueError, match=message) as error:
        read_cells(tmp_path)
    assert str(path) in str(error.value)


def test_write_report_writes_every_file(grid: Path, tmp_path: Path) -> None:
    cells, out = read_cells(grid), tmp_path / "report"
    write_report(cells, out, comparisons=[("divico", "fastv"), ("divico", "none")], header="# bench accuracy\n")
    assert json.loads((out / "results.json").read_text()) == results(cells)
    with open(out / "results.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == ["method", "tau", "condition", "accuracy", "se", "retention", "questions", "seeds",
                              "visual_tokens_kept", "accuracy_color", "se_color", "accuracy_count", "se_count"]
    assert (table[1]["method"], float(table[1]["accuracy_color"]), table[0]["tau"]) == ("divico", pytest.approx(0.8), "")
    assert (out / "accuracy_vs_tau.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report = (out / "report.md").read_text()
    assert report.startswith("# bench accuracy\n")
    for text in ("### Accuracy, clean\n", "| method | no compression (100 kept) | tau 11.1% (11 kept) |",
                 "| none | 80.0 ± 12.6 (100.0%) | — |", "| divico | — | 60.0 ± 5.8 (75.0%) |",
                 "### Accuracy, clean, question kind color", "| divico | — | 80.0 ± 11.5 (80.0%) |",
                 "### Accuracy, noise\n", "### Paired difference divico - fastv, clean", "| tau 11.1% | +10.0 |",
                 "### Paired difference divico - none, clean", "| tau 11.1% | -20.0 |",
                 "| divico | tau 11.1% | 60.0 | 50.0 | +10.0 ±", "Questions per seed: 10 (color 5, count 5).",
                 "Seeds per row: none 1, divico 3, fastv 1."):
        assert text in report, text


def test_a_comparison_of_a_method_not_run_says_so(grid: Path, tmp_path: Path) -> None:
    write_report(read_cells(grid), tmp_path, comparisons=[("divico", "random_trained")], header="")
    assert "### Paired difference divico - random_trained, clean\n\nNot run: random_trained.\n" in (
        tmp_path / "report.md").read_text()
