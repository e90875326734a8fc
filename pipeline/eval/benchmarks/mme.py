"""MME, scored as its eval_tool/calculation.py scores answers converted by LLaVA's
convert_answer_to_mme.py.

`annotations` is MME_Benchmark_release_version/. A prediction's question_id is its image's path
there ("<category>/[images/]<file>"), the identity LLaVA's llava_mme.jsonl uses; its "prompt" is
the question as asked. The reference answer is looked up as the converter does: the prompt
without LLaVA's short-answer instruction, stripped, plus " Please answer yes or no." (then with
two spaces), in the image's <stem>.txt (beside the image, or in questions_answers_YN/ for
artwork, celebrity, landmark, posters and scene), whose lines are "question<TAB>Yes|No".

An answer, lowercased and without tabs and newlines, counts as "yes" or "no" when it is exactly
that, else by whether its first four characters contain "yes" (then "no"); otherwise it is
wrong. Per category: acc = right answers / questions and acc+ = images with both questions
right / images, each x 100, score = acc + acc+ (at most 200). Perception sums the 10 perception
categories (at most 2000), cognition the 4 cognition ones (at most 800). Every image has two
questions; the official script reads them as consecutive pairs, here they are grouped by image.
Categories without predictions are listed under "missing" and left out of the sums.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.eval.benchmarks import BenchmarkError, Question, read_question_lines

QUESTIONS = "llava_mme.jsonl"  # in MME/, beside the release folder
ANNOTATIONS = "MME_Benchmark_release_version"  # also where the images are
MAX_NEW_TOKENS = 128

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
YES_NO = " Please answer yes or no."


def questions(folder: Path) -> list[Question]:
    return read_question_lines(folder / QUESTIONS, folder / ANNOTATIONS)


def parse(answer: str) -> str:
    answer = answer.lower().replace("\t", " ").replace("\n", " ")
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def reference_answers(annotations: Path, question_id: str) -> dict[str, str]:
    """question -> "yes"/"no" for one image, from its <stem>.txt."""
    category, *_, file = question_id.split("/")
    folder = annotations / category
    stem = Path(file).stem
    path = folder / "questions_answers_YN" / f"{stem}.txt"
    if not path.is_file():
        path = folder / f"{stem}.txt"
    if not path.is_file():
        raise BenchmarkError(f"question_id {question_id!r}: no {stem}.txt under {folder}")
    answers = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            question, sep, answer = line.rpartition("\t")
            if not sep or answer.strip().lower() not in ("yes", "no"):
                raise BenchmarkError(f"{path}, line {number}: expected \"question<TAB>Yes|No\"")
            answers[question] = answer.strip().lower()
    return answers


def score(predictions: list[dict[str, Any]], annotations: Path) -> dict[str, Any]:
    if not annotations.is_dir():
        raise BenchmarkError(f"{annotations}: not a folder (MME_Benchmark_release_version/)")
    by_image: dict[str, list[bool]] = defaultdict(list)
    for prediction in predictions:
        question_id = str(prediction["question_id"])
        if "prompt" not in prediction:
            raise BenchmarkError(f"question_id {question_id!r}: MME predictions need the \"prompt\" asked")
        references = reference_answers(annotations, question_id)
        question = prediction["prompt"].replace(SHORT_ANSWER, "").strip()
        reference = references.get(question + YES_NO, references.get(question + " " + YES_NO))
        if reference is None:
            raise BenchmarkError(f"question_id {question_id!r}: question {question!r} is not in its answers file")
        by_image[question_id].append(parse(prediction["text"]) == reference)
    by_category: dict[str, list[list[bool]]] = defaultdict(list)
    for question_id, right in by_image.items():
        if len(right) != 2:
            raise BenchmarkError(f"question_id {question_id!r}: {len(right)} predictions, an MME image has 2 questions")
        by_category[question_id.split("/")[0]].append(right)
    unknown = sorted(set(by_category) - set(PERCEPTION) - set(COGNITION))
    if unknown:
        raise BenchmarkError(f"categories {unknown}: not MME's ({', '.join(PERCEPTION + COGNITION)})")
    categories = {}
    for category, images in by_category.items():
        acc = 100 * sum(map(sum, images)) / (2 * len(images))
        acc_plus = 100 * sum(all(right) for right in images) / len(images)
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"perception": sum(categories[c]["score"] for c in PERCEPTION if c in categories),
            "cognition": sum(categories[c]["score"] for c in COGNITION if c in categories),
            "categories": categories, "missing": [c for c in PERCEPTION + COGNITION if c not in categories],
            "questions": 2 * sum(len(images) for images in by_category.values())}
