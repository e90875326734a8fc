"""The statistics every report prints (torch-free): standard errors and paired comparisons.

    proportion_standard_error   an accuracy on n independent questions: sqrt(p (1 - p) / n)
    mean_standard_error         the mean of per-question scores (0/1 or real) or of per-seed accuracies
    mean_over_seeds             a row's accuracy over fine-tune seeds and its standard error
    paired_difference           two models on the same questions, one seed: difference and its s.e.
    paired_bootstrap            the same over seeds and questions, bootstrapped over both

`divico run`'s table, `divico report accuracy`, `divico bench accuracy`'s report and the
benchmarks' official figures all take their spreads from here, so one question count gives one
standard error everywhere.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def proportion_standard_error(proportion: float, trials: int, scale: float = 1.0) -> float:
    """Binomial standard error of a proportion measured on `trials` independent 0/1 trials (an
    accuracy on that many questions), times `scale` (100: in percent)."""
    return scale * math.sqrt(proportion * (1 - proportion) / trials)


def mean_standard_error(values: Sequence[float], scale: float = 1.0) -> float:
    """Standard error of the mean of `values`: their sample standard deviation / sqrt(n), times
    `scale` (100: in percent); 0 for fewer than two values, which have no spread to measure."""
    return scale * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def mean_over_seeds(accuracies: Sequence[float], questions: int) -> tuple[float, float]:
    """The mean of one setting's accuracies over fine-tune seeds (each on the same `questions`
    questions) and its standard error: the seeds' spread (what retraining moves) when there are
    several, else the binomial error over the questions (a training-free method on one base)."""
    mean = statistics.fmean(accuracies)
    if len(accuracies) > 1:
        return mean, mean_standard_error(accuracies)
    return mean, proportion_standard_error(mean, questions)


@dataclass
class PairedDifference:
    """Two models' accuracies compared question by question on the same questions."""

    questions: int
    difference: float  # accuracy of the first minus accuracy of the second
    standard_error: float  # of that difference: the per-question differences' spread / sqrt(n)
    only_first: int  # questions only the first answers correctly
    only_second: int


def paired_difference(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> PairedDifference:
    """Compare two sets of scored predictions (rows with "key" and "correct", as
    pipeline.eval.score.score leaves them) on the same questions. Pairing removes what the
    questions share (their difficulty), so the standard error is that of the per-question
    differences, not of two independent means."""
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
