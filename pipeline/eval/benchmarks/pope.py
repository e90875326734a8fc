"""POPE, scored as LLaVA's eval_pope.py scores it.

`annotations` is LLaVA's pope/ folder: coco/coco_pope_{adversarial,popular,random}.json (JSON
lines: question_id, image, text, label yes|no) and llava_pope_test.jsonl, the question file,
whose "category" gives each question's split. For each split, the predictions of that split's
questions, in answer-file order, are paired by position with the split's label lines, as the
official script does (it checks no ids); a count that differs is an error here (the official
zip would silently drop the tail).

An answer is "no" when, after cutting it at its first "." and deleting commas, one of its
space-separated words is exactly "No", "not" or "no"; anything else is "yes" (so "NO" is yes).
Per split, with "yes" the positive class: accuracy, precision, recall, f1 and yes_ratio (the
share of answers that are yes), as fractions; then their means over the splits. The paper's
POPE figure is the mean F1.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from pipeline.eval.benchmarks import BenchmarkError, Question, read_json_lines, read_question_lines

SPLITS = ("adversarial", "popular", "random")
QUESTIONS_FILE = "llava_pope_test.jsonl"
IMAGES = "val2014"  # COCO val2014
ANNOTATIONS = "."  # the folder itself: coco/ and the question file
MAX_NEW_TOKENS = 128
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def questions(folder: Path) -> list[Question]:
    return read_question_lines(folder / QUESTIONS_FILE, folder / IMAGES)


def yes_or_no(text: str) -> str:
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(word in ("No", "not", "no") for word in words) else "yes"


def split_metrics(answers: list[str], labels: list[str]) -> dict[str, float]:
    """The five figures of one split; `answers` and `labels` are "yes"/"no", paired."""
    pairs = list(zip(answers, labels, strict=True))
    true_pos = sum(a == "yes" and l == "yes" for a, l in pairs)
    false_pos = sum(a == "yes" and l == "no" for a, l in pairs)
    false_neg = sum(a == "no" and l == "yes" for a, l in pairs)
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    return {"accuracy": sum(a == l for a, l in pairs) / len(pairs), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": answers.count("yes") / len(answers)}


def score(predictions: list[dict[str, Any]], annotations: Path) -> dict[str, Any]:
    category = {row["question_id"]: row["category"] for row in read_json_lines(annotations / QUESTIONS_FILE)}
    results: dict[str, Any] = {}
    for split in SPLITS:
        label_file = annotations / "coco" / f"coco_pope_{split}.json"
        labels = [row["label"] for row in read_json_lines(label_file)]
        if any(label not in ("yes", "no") for label in labels):
            raise BenchmarkError(f"{label_file}: a label other than yes/no")
        unknown = [p["question_id"] for p in predictions if p["question_id"] not in category]
        if unknown:
            raise BenchmarkError(f"question_id {unknown[0]!r} is not in {annotations / QUESTIONS_FILE}")
        answers = [yes_or_no(p["text"]) for p in predictions if category[p["question_id"]] == split]
        if len(answers) != len(labels):
            raise BenchmarkError(f"{label_file}: {len(labels)} labels, but {len(answers)} predictions of "
                                 f"category {split!r}")
        results[split] = split_metrics(answers, labels)
    results.update({metric: statistics.fmean(results[split][metric] for split in SPLITS) for metric in METRICS})
    results["questions"] = len(predictions)
    return results
