"""Scoring answers (pipeline/eval/score.py) on predictions and answers written here."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval.score import SCORERS, exact_match, normalize_answer, score
from pipeline.stats import paired_bootstrap, paired_difference


@pytest.mark.parametrize("text, normalized", [
    ("Red.", "red"), ("  yes!</s>", "yes"), ("The cat", "cat"), ("An apple", "apple"), ("two", "2"),
    ("THREE", "3"), ("top-left", "top left"), ("don't", "dont"), ("a  b,c", "b c"), ("", ""),
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_normalization_does_not_merge_different_answers():
    assert normalize_answer("red") != normalize_answer("reds")
    assert normalize_answer("12") != normalize_answer("1 2")


# (question type, answer, prediction, correct under exact match)
CASES = [
    ("what color", "red", "Red.", True),
    ("what color", "red", "The red", True),
    ("what color", "blue", "red", False),
    ("what color", "red", "reddish", False),
    ("how many", "2", "two", True),
    ("how many", "3", "2", False),
    ("how many", "3", "", False),
]


def predictions(cases):
    return [{"question_type": kind, "answer": answer, "prediction": prediction} for kind, answer, prediction, _ in cases]


def test_exact_match_scores_each_answer_and_each_type():
    rows = predictions(CASES)
    scores = score(rows)
    assert [row["correct"] for row in rows] == [correct for *_, correct in CASES]
    assert all(row["correct"] == (normalize_answer(row["prediction"]) == normalize_answer(row["answer"]))
               for row in rows)
    assert scores.accuracy == pytest.approx(3 / 7)
    assert scores.by_type == {
        "what color": {"samples": 4, "accuracy": 2 / 4, "chance": 3 / 4, "majority_answer": "red"},
        "how many": {"samples": 3, "accuracy": 1 / 3, "chance": 2 / 3, "majority_answer": "3"},
    }
    assert scores.chance == pytest.approx((3 + 2) / 7)  # always "red" for colours, always "3" for counts


def test_the_scorer_decides_correct_and_chance():
    def contains(prediction: str, answer: str) -> bool:
        return normalize_answer(answer) in normalize_answer(prediction)

    rows = predictions(CASES)
    scores = score(rows, contains)
    assert [row["correct"] for row in rows] == [True, True, False, True, True, False, False]  # "reddish" counts
    assert scores.by_type["what color"]["accuracy"] == 3 / 4 and scores.accuracy == pytest.approx(4 / 7)
    assert SCORERS["exact_match"] is exact_match


def test_nothing_to_score_is_an_error():
    with pytest.raises(ValueError, match="no predictions"):
        score([])


def test_paired_difference_on_the_same_questions():
    """Six questions: both right on 2, only the first on 3, only the second on 1, in another order."""
    first = [{"key": k, "correct": c} for k, c in zip("abcdef", [1, 1, 1, 1, 1, 0])]
    second = [{"key": k, "correct": c} for k, c in zip("fedcba", [1, 0, 0, 0, 1, 1])]
    paired = paired_difference(first, second)
    differences = [0, 0, 1, 1, 1, -1]  # a..f: first minus second
    mean = sum(differences) / 6
    spread = (sum((d - mean) ** 2 for d in differences) / 5) ** 0.5
    assert (paired.questions, paired.only_first, paired.only_second) == (6, 3, 1)
    assert paired.difference == pytest.approx(2 / 6)
    assert paired.standard_error == pytest.approx(spread / 6 ** 0.5)
    with pytest.raises(ValueError, match="not on the same questions"):
        paired_difference(first, second[:-1])


def test_paired_bootstrap_matches_the_hand_computed_case():
    """One seed, 200 questions: 40 only A right, 20 only B right, 140 tied. The difference is
    exactly 20 / 200; with one seed the bootstrap s.e. is the questions' s.e. of the mean,
    sqrt(var(d) / n), and the 95% interval about 1.96 of them either side."""
    d = np.array([[1] * 40 + [-1] * 20 + [0] * 140])
    mean = 20 / 200
    se = np.sqrt(((d - mean) ** 2).sum() / 199 / 200)
    result = paired_bootstrap(d, resamples=4000)
    assert (result.seeds, result.questions) == (1, 200)
    assert result.difference == pytest.approx(0.1)
    assert result.standard_error == pytest.approx(se, rel=0.08)
    assert result.low == pytest.approx(mean - 1.96 * se, abs=0.012)
    assert result.high == pytest.approx(mean + 1.96 * se, abs=0.012)


def test_paired_bootstrap_counts_the_seeds_spread():
    """Three seeds that disagree (+0.3, 0, -0.3 on every question) are no evidence of a difference,
    however many questions: the interval must cover 0, which a questions-only spread would not."""
    d = np.repeat(np.array([[1] * 3 + [0] * 7, [0] * 10, [-1] * 3 + [0] * 7]), 50, axis=1)
    result = paired_bootstrap(d)
    assert result.difference == pytest.approx(0.0)
    assert result.low < 0 < result.high and result.standard_error > 0.1
    with pytest.raises(ValueError, match="seeds, questions"):
        paired_bootstrap(np.zeros(5))
