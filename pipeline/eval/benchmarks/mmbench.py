"""MMBench dev (English), scored with the official circular evaluation (opencompass's
eval_mmbench.py) and its rule-based answer extraction only: no GPT matcher is called.

`annotations` is the dev TSV (mmbench_dev_20230712.tsv: index, question, hint, A..D, answer,
category, image (base64), source, l2-category, comment, split). It already holds the circular
copies of each question: index = base + k x 1,000,000 with the options rotated and the answer
relabelled. A prediction's question_id is the row's index.

Extraction from a prediction, against the row's options (the letters whose text is not empty,
"nan" or "none"): (a) its whitespace-separated tokens; when exactly one option letter is a bare
token, that letter, unless a token "A" is present and there are more than 3 tokens (then
nothing); otherwise the first of the forms X. X, X: X) X). (X) (X). :X :X, :X. :X) :X) in which
exactly one option letter occurs as a token; (b) failing that, the only option whose lowercased
text is a substring of the lowercased prediction. Where the official script would then ask GPT
(and after three failures pick a seeded random letter), the row counts as wrong here: LLaVA
answers with a bare letter almost always, and the count of such rows is reported as
"unresolved".

A question (index < 1,000,000) scores 1 only if every row of its group (index % 1,000,000 equal
to it) is answered right. Accuracy is the mean over questions x 100, overall and per category
and l2-category.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.eval.benchmarks import BenchmarkError, Question
from pipeline.stats import mean_standard_error

ANNOTATIONS = "mmbench_dev_20230712.tsv"  # questions, options, answers and base64 images in one file
MAX_NEW_TOKENS = 1024  # LLaVA's model_vqa_mmbench.py
ANSWER_WITH_LETTER = "\nAnswer with the option's letter from the given choices directly."
CIRCULAR = 1_000_000
LETTERS = "ABCD"
FORMS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
         (":", "."), (":", ")"), (":", ")."))
COLUMNS = ("index", "question", "A", "B", "answer", "category")


def options(row: dict[str, str]) -> dict[str, str]:
    """The row's options, letter -> text, up to the first empty one."""
    found = {}
    for letter in LETTERS:
        text = (row.get(letter) or "").strip()
        if text.lower() in ("", "nan", "none"):
            break
        found[letter] = text
    return found


def questions(folder: Path) -> list[Question]:
    """Every row (circular copies included) asked as LLaVA's model_vqa_mmbench.py asks it with
    --single-pred-prompt: [hint + "\n"] + question + "\nA. option" ... + the letter instruction;
    the recorded prompt is without the instruction, as LLaVA records it."""
    path = folder / ANNOTATIONS
    asked = []
    for index, row in read_rows(path).items():
        if not (row.get("image") or "").strip():
            raise BenchmarkError(f"{path}: the row of index {index} has no image")
        hint = row.get("hint") or ""
        prompt = (hint + "\n" if hint.strip().lower() not in ("", "nan", "none") else "") + row["question"]
        prompt += "".join(f"\n{letter}. {text}" for letter, text in options(row).items())
        asked.append(Question(question_id=index, text=prompt + ANSWER_WITH_LETTER, prompt=prompt,
                              image=row["image"].strip(), category=row["category"]))
    if not asked:
        raise BenchmarkError(f"{path}: no rows")
    return asked


def letter_given(prediction: str, choices: dict[str, str]) -> str | None:
    """Rule (a): the option letter the prediction's tokens give, or None."""
    tokens = prediction.split()
    bare = [letter for letter in choices if letter in tokens]
    if len(bare) == 1:
        return None if "A" in tokens and len(tokens) > 3 else bare[0]  # "A" may be the article
    for prefix, suffix in FORMS:
        hits = [letter for letter in choices if prefix + letter + suffix in tokens]
        if len(hits) == 1:
            return hits[0]
    return None


def option_quoted(prediction: str, choices: dict[str, str]) -> str | None:
    """Rule (b): the only option whose text the prediction contains (case-insensitive), or None."""
    lowered = prediction.lower()
    hits = [letter for letter, text in choices.items() if text.lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def extract(prediction: str, choices: dict[str, str]) -> str | None:
    """The option letter a prediction gives, by rule (a), else (b); None when neither finds one."""
    return letter_given(prediction, choices) or option_quoted(prediction, choices)


def read_rows(path: Path) -> dict[int, dict[str, str]]:
    if not path.is_file():
        raise BenchmarkError(f"{path}: not found (the MMBench dev TSV)")
    csv.field_size_limit(sys.maxsize)  # the image column holds whole base64 images
    with path.open(newline="") as file:
        reader = csv.DictReader(file, delimiter="\t")
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(f"{path}: no column(s) {missing} (an MMBench TSV has {', '.join(COLUMNS)}, ...)")
        rows = {}
        for number, row in enumerate(reader, 2):
            try:
                rows[int(row["index"])] = row
            except ValueError:
                raise BenchmarkError(f"{path}, line {number}: index {row['index']!r} is not an integer") from None
    return rows


def score(predictions: list[dict[str, Any]], annotations: Path) -> dict[str, Any]:
    rows = read_rows(annotations)
    answered = {}
    for prediction in predictions:
        index = int(prediction["question_id"])
        if index not in rows:
            raise BenchmarkError(f"question_id {index}: no row with that index in {annotations}")
        answered[index] = prediction["text"]
    unanswered = sorted(set(rows) - set(answered))
    if unanswered:
        raise BenchmarkError(f"{annotations}: {len(unanswered)} rows have no prediction (first: index {unanswered[0]})")
    right, unresolved = {}, 0
    for index, row in rows.items():
        letter = extract(answered[index], options(row))
        unresolved += letter is None
        right[index] = letter == row["answer"].strip()
    groups: dict[int, list[bool]] = defaultdict(list)
    for index, correct in right.items():
        groups[index % CIRCULAR].append(correct)
    questions = sorted(index for index in rows if index < CIRCULAR)
    if not questions:
        raise BenchmarkError(f"{annotations}: no question with index < {CIRCULAR}")
    scored = {index: all(groups[index]) for index in questions}

    def accuracy(indices: list[int]) -> float:
        return 100 * sum(scored[i] for i in indices) / len(indices)

    by = {column: defaultdict(list) for column in ("category", "l2-category")}
    for index in questions:
        for column, groups_of in by.items():
            groups_of[rows[index].get(column) or "-"].append(index)
    return {"accuracy": accuracy(questions), "se": mean_standard_error([scored[i] for i in questions], scale=100),
            "questions": len(questions), "rows": len(rows),
            "unresolved": unresolved,
            **{column: {name: accuracy(indices) for name, indices in sorted(groups_of.items())}
               for column, groups_of in by.items()}}
