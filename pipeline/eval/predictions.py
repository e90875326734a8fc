"""The predictions file of a benchmark evaluation: JSON lines in LLaVA's answers format, one per
question, each finished batch appended and flushed to disk before the next starts.

A killed evaluation leaves a file of whole batches (and perhaps a torn last line, cut off when
it resumes); resuming answers only the questions without a line, so none is answered twice.
Across GPUs, each process answers one contiguous chunk of the questions (LLaVA's split) into
its own part file, `<stem>.<I>-of-<N><suffix>`; a run without a chunk takes the answers of the
parts and of the file itself as given. Once every question has its answer, the file is
rewritten in question order (LLaVA's answer files are; POPE's scorer pairs answers with labels
by position), atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from pipeline.train.config import ConfigError
from pipeline.durable import fsync_path, write_text_atomically
from pipeline.eval.benchmarks import BenchmarkError, Question

log = logging.getLogger(__name__)

# What a row records of the run that wrote it; resuming with other values is refused.
RUN_FIELDS = ("model_id", "mode", "tau", "kept", "image_noise")


def parse_chunk(text: str) -> tuple[int, int]:
    """"I/N" (0 <= I < N) as (I, N); ConfigError otherwise."""
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if match is None or not int(match[1]) < int(match[2]):
        raise ConfigError(f"--chunk {text}: expected I/N with 0 <= I < N (this process's chunk of N)")
    return int(match[1]), int(match[2])


def chunk_of(questions: list[Question], index: int, count: int) -> list[Question]:
    """Chunk `index` of `count` contiguous chunks of ceil(len / count) questions (LLaVA's split_list)."""
    size = math.ceil(len(questions) / count)
    return questions[index * size:(index + 1) * size]


def part_path(path: Path, index: int, count: int) -> Path:
    return path.with_name(f"{path.stem}.{index}-of-{count}{path.suffix}")


def read_rows(path: Path, *, cut_torn_tail: bool) -> list[dict[str, Any]]:
    """The rows of a predictions file ([] when absent). A last line without its newline is what
    a killed writer leaves: cut off (with `cut_torn_tail`) or ignored; any other line that is
    not a JSON object with question_id and text is an error naming the file and line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - len(whole))
        if cut_torn_tail:
            with path.open("r+b") as file:
                file.truncate(len(whole))
            fsync_path(path)
    rows = []
    for number, line in enumerate(whole.decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchmarkError(f"{path}, line {number}: not JSON ({error.msg})") from error
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
            raise BenchmarkError(f"{path}, line {number}: needs \"question_id\" and a \"text\" string")
        rows.append(row)
    return rows


def answered(path: Path, questions: list[Question], run: dict[str, Any], *,
             parts: bool) -> dict[tuple, list[dict[str, Any]]]:
    """The answers already written to `path` (and, with `parts`, to its chunk part files), by
    question key (question_id, prompt). ConfigError when one is not a question of `questions`
    or was written by another model, mode, tau, kept-token count or image noise (`run`)."""
    asked = {question.key for question in questions}
    files = [path, *(sorted(path.parent.glob(f"{path.stem}.*-of-*{path.suffix}")) if parts else [])]
    found: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for file in files:
        for row in read_rows(file, cut_torn_tail=file == path):
            key = (row["question_id"], row.get("prompt"))
            if key not in asked:
                raise ConfigError(f"{file}: question_id {row['question_id']!r} with prompt {row.get('prompt')!r} is "
                                  "not a question of this benchmark (predictions of another task?)")
            theirs = {name: row.get(name) for name in RUN_FIELDS}
            if theirs != run:
                raise ConfigError(f"{file}: answers written with {theirs}, this run is {run}; give another "
                                  "--predictions file")
            found[key].append(row)
    return found


def unanswered(questions: list[Question], done: dict[tuple, list[dict[str, Any]]]) -> list[Question]:
    """The questions without an answer in `done`, in order (a question asked twice needs two)."""
    seen: Counter[tuple] = Counter()
    todo = []
    for question in questions:
        if seen[question.key] >= len(done.get(question.key, ())):
            todo.append(question)
        seen[question.key] += 1
    return todo


@contextmanager
def appending(path: Path) -> Iterator[Callable[[list[dict[str, Any]]], None]]:
    """A function that appends rows to `path` and returns once they are on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        def append(rows: list[dict[str, Any]]) -> None:
            file.write("".join(json.dumps(row) + "\n" for row in rows))
            file.flush()
            os.fsync(file.fileno())

        yield append


def write_in_order(path: Path, questions: list[Question], done: dict[tuple, list[dict[str, Any]]]) -> None:
    """`path` rewritten atomically with one answer per question, in question order (every
    question must have one: `unanswered` is empty)."""
    left = {key: iter(rows) for key, rows in done.items()}
    write_text_atomically(path, "".join(json.dumps(next(left[question.key])) + "\n" for question in questions))
