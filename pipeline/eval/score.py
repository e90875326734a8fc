"""Scoring answers: normalisation, the scorers, and accuracy overall and per question type,
each beside a chance level.

A scorer says whether one prediction answers one reference answer. SCORERS names them for
the `scorer=` key: a new scorer is a function in its own module plus one line here.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Scorer = Callable[[str, str], bool]  # (prediction, answer) -> correct

# VQA-style normalisation: number words as digits, no articles, no punctuation.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lowercase; apostrophes dropped ("don't" -> "dont"), other punctuation a space; articles
    dropped; number words as digits; single spaces."""
    words = PUNCTUATION.sub(" ", text.lower().replace("</s>", " ").replace("'", "")).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words if word not in ARTICLES)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


SCORERS: dict[str, Scorer] = {
    "exact_match": exact_match,
}


@dataclass
class Scores:
    accuracy: float
    chance: float  # always answering each question type's most common answer
    by_type: dict[str, dict[str, Any]]  # type -> samples, accuracy, chance, majority_answer


def score(predictions: list[dict[str, Any]], scorer: Scorer = exact_match) -> Scores:
    """Set each prediction's "correct" (from its "prediction" and "answer") and sum them up
    overall and by "question_type". A type's chance level is what answering its most common
    (normalised) answer every time scores."""
    if not predictions:
        raise ValueError("no predictions to score")
    for prediction in predictions:
        prediction["correct"] = scorer(prediction["prediction"], prediction["answer"])
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for prediction in predictions:
        grouped[prediction["question_type"]].append(prediction)
    by_type, chance_total = {}, 0
    for name in sorted(grouped):
        group = grouped[name]
        majority_answer = Counter(normalize_answer(p["answer"]) for p in group).most_common(1)[0][0]
        chance = sum(scorer(majority_answer, p["answer"]) for p in group)
        chance_total += chance
        by_type[name] = {"samples": len(group), "accuracy": sum(p["correct"] for p in group) / len(group),
                         "chance": chance / len(group), "majority_answer": majority_answer}
    return Scores(accuracy=sum(p["correct"] for p in predictions) / len(predictions),
                  chance=chance_total / len(predictions), by_type=by_type)
