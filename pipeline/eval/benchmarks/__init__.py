"""The paper's benchmarks, each scored the way its official scorer scores it.

Each module reads the benchmark's annotation files in the layout LLaVA's evaluation guide has
users download (./playground/data/eval/<benchmark>/) and scores predictions in LLaVA's answers
format: JSON lines with at least "question_id" and "text", in answer-file order, whoever wrote
them (`divico eval`, or LLaVA's own scripts). Every module has

    questions(folder: Path) -> list[Question]   the questions as LLaVA's scripts ask them
    ANNOTATIONS: str                             what `score` reads, relative to the folder
    MAX_NEW_TOKENS: int                          LLaVA's generation limit for the benchmark
    score(predictions: list[dict], annotations: Path) -> dict[str, Any]

where `folder` is the benchmark's folder of that layout (e.g. playground/data/eval/pope);
`score` returns the official figures under their usual names. Both raise BenchmarkError naming
the file and what is wrong with it. BENCHMARKS maps a task name to its module.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

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


@dataclass(frozen=True)
class Question:
    question_id: str | int  # as the question file has it; the answer keeps its type
    text: str  # what the model is asked after "<image>\n" (with the answer-format instruction)
    prompt: str  # what LLaVA's answers file records as "prompt"
    image: Path | str  # an image file, or a base64-encoded image (MMBench's TSV)
    category: str = ""

    @property
    def key(self) -> tuple[str | int, str]:
        """What tells questions apart: TextVQA's and MME's question_id is the image's, shared by
        its questions. (A file may still ask the same twice: those answers are interchangeable.)"""
        return self.question_id, self.prompt

    def load_image(self) -> Image.Image:
        """The RGB image; BenchmarkError naming the question when it does not decode."""
        try:
            source = io.BytesIO(base64.b64decode(self.image, validate=True)) if isinstance(self.image, str) \
                else self.image
            with Image.open(source) as image:
                return image.convert("RGB")
        except (OSError, ValueError, binascii.Error) as error:
            where = self.image if isinstance(self.image, Path) else "its base64 image"
            raise BenchmarkError(f"question {self.question_id!r}: {where}: not a readable image ({error})") from error


def read_question_lines(path: Path, images: Path) -> list[Question]:
    """A question file of LLaVA's evaluation layout (JSON lines: question_id, image relative to
    `images`, text, category) as Questions; BenchmarkError naming the file for a malformed line
    or images that are not there (all checked before any model loads)."""
    questions, missing = [], []
    for number, row in enumerate(read_json_lines(path), 1):
        if not isinstance(row, dict) or not {"question_id", "image", "text"} <= row.keys():
            raise BenchmarkError(f"{path}, question {number}: needs \"question_id\", \"image\" and \"text\"")
        image = images / row["image"]
        if not image.is_file():
            missing.append(image)
        questions.append(Question(question_id=row["question_id"], text=row["text"], prompt=row["text"],
                                  image=image, category=str(row.get("category", ""))))
    if missing:
        raise BenchmarkError(f"{images}: {len(missing)} of the {len(questions)} images {path.name} names are not "
                             f"there (first: {missing[0].name})")
    if not questions:
        raise BenchmarkError(f"{path}: no questions")
    return questions
