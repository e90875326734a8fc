"""GQA testdev-balanced, scored as its official eval.py scores LLaVA's converted predictions.

`annotations` is testdev_balanced_questions.json (questionId -> {answer, isBalanced, types, ...}).
A prediction is its text with trailing "." removed, lowercased (LLaVA's convert_gqa_for_eval.py);
it is right when it equals the answer. Over the balanced questions: accuracy, and accuracy on
binary and on open questions (open: structural type "query"), as percentages. A balanced
question without a prediction is an error, as in the official script.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.eval.benchmarks import BenchmarkError, Question, read_question_lines
from pipeline.stats import mean_standard_error

QUESTIONS = "llava_gqa_testdev_balanced.jsonl"
IMAGES = "data/images"
ANNOTATIONS = "data/testdev_balanced_questions.json"
MAX_NEW_TOKENS = 128


def questions(folder: Path) -> list[Question]:
    return read_question_lines(folder / QUESTIONS, folder / IMAGES)


def score(predictions: list[dict[str, Any]], annotations: Path) -> dict[str, Any]:
    if not annotations.is_file():
        raise BenchmarkError(f"{annotations}: not found (testdev_balanced_questions.json)")
    try:
        questions = json.loads(annotations.read_text())
    except json.JSONDecodeError as error:
        raise BenchmarkError(f"{annotations}: not JSON ({error.msg})") from error
    predicted = {str(p["question_id"]): p["text"].rstrip(".").lower() for p in predictions}
    right: dict[str, list[bool]] = {"binary": [], "open": []}
    for question_id, question in questions.items():
        if not question.get("isBalanced"):
            continue
        if question_id not in predicted:
            raise BenchmarkError(f"{annotations}: balanced question {question_id!r} has no prediction")
        kind = "open" if question["types"]["structural"] == "query" else "binary"
        right[kind].append(predicted[question_id] == question["answer"])
    every = right["binary"] + right["open"]
    if not every:
        raise BenchmarkError(f"{annotations}: no balanced questions")
    return {"accuracy": 100 * sum(every) / len(every), "se": mean_standard_error(every, scale=100),
            "questions": len(every),
            **{kind: 100 * sum(values) / len(values) for kind, values in right.items() if values}}
