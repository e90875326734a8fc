"""The paper's benchmarks, each scored the way its official scorer scores it.

Each module reads the benchmark's annotation files in the layout LLaVA's evaluation guide has
users download (./playground/data/eval/<benchmark>/) and scores predictions in LLaVA's answers
format: JSON lines with at least "question_id" and "text", in answer-file order, whoever wrote
them (`divico eval`, or LLaVA's own scripts). Every module has

    score(predictions: list[dict], annotations: Path) -> dict[str, Any]

returning the official figures under their usual names, and raises BenchmarkError naming the
file and what is wrong with it. BENCHMARKS maps a task name to its module.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

BENCHMARKS = {"pope": "pipeline.eval.benchmarks.pope", "mme": "pipeline.eval.benchmarks.mme",
              "gqa": "pipeline.eval.benchmarks.gqa", "textvqa": "pipeline.eval.benchmarks.textvqa",
              "mmbench": "pipeline.eval.benchmarks.mmbench"}


class BenchmarkError(ValueError):
    """A benchmark file is missing or malformed, or predictions do not fit it; the message names it."""


def benchmark(task: str) -> ModuleType:
    if task not in BENCHMARKS:
        raise BenchmarkError(f"task {task!r}: expected one of {sorted(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[task])


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every non-empty line of a JSON-lines file; BenchmarkError naming the file and line."""
    if not path.is_file():
        raise BenchmarkError(f"{path}: not found")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise BenchmarkError(f"{path}, line {number}: not JSON ({error.msg})") from error
    return rows


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """A predictions file (LLaVA's answers format); each row needs question_id and text."""
    rows = read_json_lines(path)
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
            raise BenchmarkError(f"{path}, prediction {number}: needs \"question_id\" and a \"text\" string")
    return rows
