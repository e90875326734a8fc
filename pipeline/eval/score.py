"""Scoring answers: normalisation, the scorers, and accuracy overall and per question type,
each beside a chance level.

A scorer says whether one prediction answers one reference answer. SCORERS names them for
the `scorer=` key: a new scorer is a function in its own module plus one line here.
"""

from __future__ import annotations

import math
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


@dataclass
class PairedDifference:
    """Two models' accuracies compared question by question on the same questions."""

    questions: int
    difference: float  # accuracy of the first minus accuracy of the second
    standard_error: float  # of that difference: the per-question differences' spread / sqrt(n)
    only_first: int  # questions only the first answers correctly
    only_second: int


def paired_difference(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> PairedDifference:
    """Compare two sets of scored predictions (rows with "key" and "correct", as `score` leaves
    them) on the same questions. Pairing removes what the questions share (their difficulty),
    so the standard error is that of the per-question differences, not of two independent means."""
    correct = {row["key"]: bool(row["correct"]) for row in second}
    if len(correct) != len(second) or sorted(correct) != sorted(row["key"] for row in first):
        raise ValueError("paired_difference: the two sets of predictions are not on the same questions")
    differences = [int(row["correct"]) - int(correct[row["key"]]) for row in first]
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else 0.0
    return PairedDifference(questions=n, difference=mean, standard_error=math.sqrt(variance / n),
                            only_first=differences.count(1), only_second=differences.count(-1))


@dataclass
class PairedInterval:
    """A paired accuracy difference over fine-tune seeds and questions, with its bootstrap spread."""

    difference: float  # mean over seeds of (accuracy of A - accuracy of B), same questions, same seed
    standard_error: float  # bootstrap s.e. of that mean
    low: float  # 95% percentile interval
    high: float
    seeds: int
    questions: int


def paired_bootstrap(differences: Any, *, resamples: int = 2000, seed: int = 0) -> PairedInterval:
    """`differences`: a (seeds, questions) array of per-question correctness differences (+1, 0,
    -1) of two methods, row s pairing the two at fine-tune seed s. Both sources of spread are
    resampled: seeds (which model training happened to give) and questions (which questions the
    held-out set happened to draw), seeds first, then questions, each with replacement."""
    import numpy as np

    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 2 or 0 in d.shape:
        raise ValueError(f"paired_bootstrap: expected a non-empty (seeds, questions) array, got shape {d.shape}")
    seeds, questions = d.shape
    rng = np.random.default_rng(seed)
    # Each resample's question counts (a multinomial draw) turn every seed's row into one mean.
    counts = rng.multinomial(questions, np.full(questions, 1 / questions), size=resamples)
    row_means = d @ counts.T / questions  # (seeds, resamples)
    picked = rng.integers(0, seeds, size=(resamples, seeds)) if seeds > 1 else np.zeros((resamples, 1), int)
    means = row_means[picked, np.arange(resamples)[:, None]].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedInterval(difference=float(d.mean()), standard_error=float(means.std(ddof=1)), low=float(low),
                          high=float(high), seeds=seeds, questions=questions)
