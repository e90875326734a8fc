"""TextVQA val, scored as LLaVA's eval_textvqa.py scores it (the m4c TextVQA accuracy with the
EvalAI answer normalisation).

`annotations` is TextVQA_0.5.1_val.json ({"data": [{question, image_id, answers (10), ...}]}),
keyed by (image_id, lowercased question); a later duplicate replaces an earlier one. A
prediction's question_id is the image id (llava_textvqa_val_v051_ocr.jsonl's), and its question
is read back from its "prompt": between "Question: " and " Short answer:" when the prompt starts
"OCR tokens: "; else, with a "Reference OCR token: " line and three lines, the first line (the
second when the prompt starts with the OCR line); else, with two lines, the first.

Normalisation (prediction and each reference answer): lowercase; "," and "?" deleted, "'s" ->
" 's"; newlines and tabs as spaces; each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! deleted
when the text has it beside a space (or has digit-comma-digit), else a space; "." deleted
where no digit follows (at most 32 of them: the official call passes re.UNICODE as the count);
then per word: number words none..ten as digits, articles dropped, contractions restored.
A prediction scores the mean over the 10 leave-one-out subsets of the answers of
min(1, matches / 3); accuracy is the mean x 100.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from pipeline.eval.benchmarks import BenchmarkError, Question, read_question_lines
from pipeline.stats import mean_standard_error

QUESTIONS = "llava_textvqa_val_v051_ocr.jsonl"  # the question, its OCR tokens, the short-answer instruction
IMAGES = "train_images"  # TextVQA's val images ship in train_val_images.zip
ANNOTATIONS = "TextVQA_0.5.1_val.json"
MAX_NEW_TOKENS = 128

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, its mistyped lookbehind included
PERIODS_DELETED = 32
# The contractions EvalAI restores: each written form below is reached from every spelling that
# drops exactly one of its apostrophes ("dont" -> "don't"; "couldnt've" and "couldn'tve" ->
# "couldn't've"). EvalAI's table also holds "let's" and "she's" as no-ops and, reversed,
# "somebody'd" -> "somebodyd" (below). Keys with a capital I never match (words are lowercased first).
CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've").split()


def _contractions() -> dict[str, str]:
    table = {"somebody'd": "somebodyd"}
    for written in CONTRACTED:
        apostrophes = [i for i, char in enumerate(written) if char == "'"]
        for i in apostrophes:
            table[written[:i] + written[i + 1:]] = written
    return table


CONTRACTIONS = _contractions()


def questions(folder: Path) -> list[Question]:
    return read_question_lines(folder / QUESTIONS, folder / IMAGES)


def normalize(answer: str) -> str:
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = PERIOD.sub("", out, count=PERIODS_DELETED)
    words = [NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def answer_score(prediction: str, answers: list[str]) -> float:
    """The mean over the leave-one-out subsets of the 10 answers of min(1, matches / 3)."""
    answers = [normalize(answer) for answer in answers]
    prediction = normalize(prediction)
    return statistics.fmean(min(1.0, (answers[:i] + answers[i + 1:]).count(prediction) / 3)
                            for i in range(len(answers)))


def question_of(prompt: str) -> str:
    """The question inside an LLaVA TextVQA prompt, as eval_textvqa.py finds it."""
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise BenchmarkError(f"prompt {prompt!r}: starts with 'OCR tokens: ' but has no "
                                 "'Question: ... Short answer:'")
        return match.group(1)
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return lines[1] if prompt.startswith("Reference OCR token") else lines[0]
    if len(lines) == 2:
        return lines[0]
    raise BenchmarkError(f"prompt {prompt!r}: not an LLaVA TextVQA prompt (question, OCR line, instruction)")


def score(predictions: list[dict[str, Any]], annotations: Path) -> dict[str, Any]:
    if not annotations.is_file():
        raise BenchmarkError(f"{annotations}: not found (TextVQA_0.5.1_val.json)")
    try:
        data = json.loads(annotations.read_text())["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise BenchmarkError(f"{annotations}: not TextVQA annotations ({error})") from error
    references = {(row["image_id"], row["question"].lower()): row["answers"] for row in data}
    scores = []
    for prediction in predictions:
        if "prompt" not in prediction:
            raise BenchmarkError(f"question_id {prediction['question_id']!r}: TextVQA predictions need the \"prompt\"")
        key = (prediction["question_id"], question_of(prediction["prompt"]).lower())
        if key not in references:
            raise BenchmarkError(f"{annotations}: no question {key[1]!r} for image {key[0]!r}")
        if len(references[key]) != 10:
            raise BenchmarkError(f"{annotations}: {len(references[key])} answers for {key}, TextVQA has 10")
        scores.append(answer_score(prediction["text"], references[key]))
    if not scores:
        raise BenchmarkError("no predictions to score")
    return {"accuracy": 100 * statistics.fmean(scores), "se": mean_standard_error(scores, scale=100),
            "questions": len(scores)}
