"""The benchmarks' scorers (pipeline/eval/benchmarks/) against hand-computed figures, on
fixtures written in each benchmark's real file layout."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pytest
from cli_helpers import run_divico

from pipeline.eval.benchmarks import BenchmarkError, benchmark, gqa, mmbench, mme, pope, read_predictions, textvqa


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("text, parsed", [("Yes, there is.", "yes"), ("No.", "no"), ("There is not a cat", "no"),
                                          ("NO", "yes"), ("no, none", "no"), ("Yes. No.", "yes"), ("Nope", "yes")])
def test_pope_reads_yes_or_no_as_llava_does(text, parsed):
    assert pope.yes_or_no(text) == parsed


@pytest.fixture()
def pope_dir(tmp_path: Path) -> Path:
    labels = {"adversarial": ["yes", "yes", "no", "no"], "popular": ["yes", "no", "yes", "no"], "random": ["no", "yes"]}
    first_id = {"adversarial": 1, "popular": 10000001, "random": 20000001}
    questions = []
    for split, split_labels in labels.items():
        rows = [{"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": "Is there a cat in the image?",
                 "label": label} for i, label in enumerate(split_labels)]
        write_lines(tmp_path / "coco" / f"coco_pope_{split}.json", rows)
        questions += [{"question_id": first_id[split] + i, "image": row["image"], "category": split,
                       "text": row["text"] + "\nAnswer the question using a single word or phrase."}
                      for i, row in enumerate(rows)]
    write_lines(tmp_path / pope.QUESTIONS_FILE, questions)
    return tmp_path


def test_pope_scores_per_split_and_their_means(pope_dir):
    answers = {1: "Yes, there is.", 2: "No.", 3: "There is not a cat", 4: "NO",
               10000001: "yes", 10000002: "no", 10000003: "yes", 10000004: "no", 20000001: "no", 20000002: "no"}
    order = [10000001, 1, 20000001, 2, 10000002, 3, 10000003, 20000002, 4, 10000004]  # splits interleaved
    figures = pope.score([{"question_id": q, "text": answers[q]} for q in order], pope_dir)
    assert figures["adversarial"] == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    assert figures["popular"] == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5}
    assert figures["random"] == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert figures["f1"] == pytest.approx(0.5) and figures["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(BenchmarkError, match=r"coco_pope_random.json: 2 labels, but 1 predictions of category 'random'"):
        pope.score([{"question_id": q, "text": answers[q]} for q in order if q != 20000002], pope_dir)
    with pytest.raises(BenchmarkError, match="question_id 7 is not in"):
        pope.score([{"question_id": 7, "text": "yes"}], pope_dir)


@pytest.fixture()
def mme_dir(tmp_path: Path) -> Path:
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "existence").mkdir(parents=True)
    (root / "existence" / "a.txt").write_text("Is there a dog in this image? Please answer yes or no.\tYes\n"
                                              "Is there a cat in this image? Please answer yes or no.\tNo\n")
    (root / "existence" / "b.txt").write_text("Is there a car in this image? Please answer yes or no.\tNo\n"
                                              "Is there a bus in this image? Please answer yes or no.\tYes\n")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "c.txt").write_text(
        "Is this artwork by X? Please answer yes or no.\tYes\nIs this artwork by Y?  Please answer yes or no.\tNo\n")
    return root


def mme_prediction(question_id: str, question: str, text: str) -> dict:
    return {"question_id": question_id, "prompt": question + "\nAnswer the question using a single word or phrase.",
            "text": text}


def test_mme_scores_acc_and_acc_plus_per_category(mme_dir):
    predictions = [
        mme_prediction("existence/a.jpg", "Is there a dog in this image?", "Yes"),
        mme_prediction("existence/a.jpg", "Is there a cat in this image?", "No, there is no cat."),
        mme_prediction("existence/b.jpg", "Is there a car in this image?", "yes"),
        mme_prediction("existence/b.jpg", "Is there a bus in this image?", "Yes"),
        mme_prediction("artwork/images/c.jpg", "Is this artwork by X?", "I think yes"),  # neither: wrong
        mme_prediction("artwork/images/c.jpg", "Is this artwork by Y?", "no"),  # its file has two spaces
    ]
    figures = mme.score(predictions, mme_dir)
    assert figures["categories"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert figures["categories"]["artwork"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert figures["perception"] == 175.0 and figures["cognition"] == 0
    assert len(figures["missing"]) == 12 and "OCR" in figures["missing"]
    with pytest.raises(BenchmarkError, match=r"'existence/b.jpg': 1 predictions, an MME image has 2 questions"):
        mme.score(predictions[:3], mme_dir)
    with pytest.raises(BenchmarkError, match="is not in its answers file"):
        mme.score([mme_prediction("existence/a.jpg", "Is there a fox in this image?", "no")], mme_dir)
    with pytest.raises(BenchmarkError, match="no d.txt under"):
        mme.score([mme_prediction("existence/d.jpg", "Is there a fox?", "no")], mme_dir)


@pytest.mark.parametrize("answer, parsed", [("Yes", "yes"), ("no", "no"), ("Yes, it is", "yes"), ("No.", "no"),
                                            ("nothing", "no"), ("I see", "other"), ("The answer is yes", "other")])
def test_mme_parses_an_answer_like_calculation_py(answer, parsed):
    assert mme.parse(answer) == parsed


def test_gqa_scores_balanced_questions_by_exact_match(tmp_path):
    questions = {"q1": {"answer": "dog", "isBalanced": True, "types": {"structural": "query"}},
                 "q2": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
                 "q3": {"answer": "red", "isBalanced": True, "types": {"structural": "query"}},
                 "q4": {"answer": "no", "isBalanced": False, "types": {"structural": "logical"}}}
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps(questions))
    predictions = [{"question_id": "q1", "text": "Dog."}, {"question_id": "q2", "text": "Yes"},
                   {"question_id": "q3", "text": "blue"}]
    figures = gqa.score(predictions, path)
    assert figures == {"accuracy": pytest.approx(200 / 3), "binary": 100.0, "open": 50.0, "questions": 3,
                       "se": pytest.approx(100 * (1 / 3) ** 0.5 / 3 ** 0.5)}  # sample s.d. of (1, 1, 0): 1/sqrt(3)
    with pytest.raises(BenchmarkError, match="balanced question 'q3' has no prediction"):
        gqa.score(predictions[:2], path)


def test_predictions_files_and_task_names_are_checked(tmp_path):
    good = write_lines(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "yes", "answer_id": "x"}])
    assert read_predictions(good) == [{"question_id": 1, "text": "yes", "answer_id": "x"}]
    bad = write_lines(tmp_path / "bad.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": 2}])
    with pytest.raises(BenchmarkError, match=r"bad.jsonl, prediction 2: needs \"question_id\" and a \"text\" string"):
        read_predictions(bad)
    (tmp_path / "broken.jsonl").write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2,\n')
    with pytest.raises(BenchmarkError, match="broken.jsonl, line 2: not JSON"):
        read_predictions(tmp_path / "broken.jsonl")
    with pytest.raises(BenchmarkError, match="task 'vqav2': expected one of"):
        benchmark("vqav2")
    assert benchmark("pope") is pope


@pytest.mark.parametrize("answer, normalized", [
    ("The Dog.", "dog"), ("two", "2"), ("None", "0"), ("dont", "don't"), ("couldn'tve", "couldn't've"),
    ("yall'll", "y'all'll"), ("somebody'd", "somebodyd"), ("lets", "lets"), ("3,000", "3000"), ("1.5", "1.5"),
    ("U.S.A.", "usa"), ("coca-cola!", "coca cola"), ("a - b", "b"), ('he said "hi"', "he said hi"),
    ("Line\none", "line 1"), ("it's", "it 's")])
def test_textvqa_normalizes_like_evalai(answer, normalized):
    assert textvqa.normalize(answer) == normalized


def test_textvqa_scores_leave_one_out_vqa_accuracy(tmp_path):
    answers = ["dog"] * 3 + ["puppy"] * 7
    assert textvqa.answer_score("Dog.", answers) == pytest.approx(0.9)  # (3 x 2/3 + 7 x 1) / 10
    assert textvqa.answer_score("a puppy", answers) == 1.0 and textvqa.answer_score("cat", answers) == 0.0
    data = [{"question": "What animal is it?", "image_id": "003a8ae2ef43b901", "question_id": 34602, "answers": answers},
            {"question": "What is written?", "image_id": "00685bc495504d61", "question_id": 34603,
             "answers": ["stop"] * 10}]
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    suffix = "\nAnswer the question using a single word or phrase."
    predictions = [
        {"question_id": "003a8ae2ef43b901", "prompt": "What animal is it?\nReference OCR token: " + suffix, "text": "Dog"},
        {"question_id": "00685bc495504d61", "prompt": "What is written?\nReference OCR token: stop, sign" + suffix,
         "text": "STOP"}]
    assert textvqa.score(predictions, path) == {"accuracy": pytest.approx(95.0), "questions": 2,
                                                "se": pytest.approx(5.0)}  # s.d. of (0.9, 1) / sqrt(2)
    assert textvqa.question_of("OCR tokens: a, b Question: Why? Short answer:") == "Why?"
    assert textvqa.question_of("Reference OCR token: a\nWhy?" + suffix) == "Why?"
    with pytest.raises(BenchmarkError, match=r"no question 'what is this\?' for image '003a8ae2ef43b901'"):
        textvqa.score([{**predictions[0], "prompt": "What is this?" + suffix}], path)


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split"]


def write_mmbench(path: Path, rows: list[tuple]) -> Path:
    """Rows (index, options, answer, category, l2-category) as the dev TSV has them, base64 image and all."""
    image = base64.b64encode(b"\x89PNG fixture bytes" * 50).decode()
    with path.open("w", newline="") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(MMBENCH_COLUMNS)
        for index, choices, answer, category, l2 in rows:
            cells = [*choices, "", "", "", ""][:4]
            writer.writerow([index, "What is shown?", "nan", *cells, answer, category, image, "src", l2, "nan", "dev"])
    return path


@pytest.mark.parametrize("text, letter", [("B", "B"), ("B.", "B"), ("(C)", "C"), ("The answer is B", "B"),
                                          ("A dog is shown here", "B"),  # "A" the article: the text rule decides
                                          ("It is a dog", "B"), ("A. a cat", "A"), ("C: red", "C"),
                                          ("blue or red", None), ("B or C", None)])
def test_mmbench_extracts_the_option_by_the_official_rules(text, letter):
    assert mmbench.extract(text, {"A": "a cat", "B": "a dog", "C": "red", "D": "blue"}) == letter


def test_mmbench_circular_evaluation(tmp_path):
    four = ["a cat", "a dog", "red", "blue"]
    rows = [(0, four, "B", "attribute", "finegrained"), (1000000, four[1:] + four[:1], "A", "attribute", "finegrained"),
            (2000000, four[2:] + four[:2], "D", "attribute", "finegrained"),
            (3000000, four[3:] + four[:3], "C", "attribute", "finegrained"),
            (1, ["yes", "no"], "A", "existence", "coarse"), (1000001, ["no", "yes"], "B", "existence", "coarse")]
    path = write_mmbench(tmp_path / "mmbench_dev_20230712.tsv", rows)
    answers = {0: "B", 1000000: "A", 2000000: "The answer is (D).", 3000000: "a dog", 1: "A",
               1000001: "I would say A because of the sky"}  # the last: no letter, no option text: wrong
    figures = mmbench.score([{"question_id": i, "text": t} for i, t in answers.items()], path)
    assert figures == {"accuracy": 50.0, "se": pytest.approx(50.0), "questions": 2, "rows": 6, "unresolved": 1,
                       "category": {"attribute": 100.0, "existence": 0.0},
                       "l2-category": {"coarse": 0.0, "finegrained": 100.0}}
    # One wrong circular copy fails its whole question.
    figures = mmbench.score([{"question_id": i, "text": "C" if i == 2000000 else t} for i, t in answers.items()], path)
    assert figures["accuracy"] == 0.0
    with pytest.raises(BenchmarkError, match=r"1 rows have no prediction \(first: index 1000001\)"):
        mmbench.score([{"question_id": i, "text": t} for i, t in answers.items() if i != 1000001], path)


def test_divico_eval_score_prints_the_official_figures(pope_dir, tmp_path, capsys, caplog):
    answers = write_lines(tmp_path / "answers.jsonl", [
        {"question_id": q, "prompt": "Is there a cat in the image?", "text": "yes", "answer_id": "x", "model_id": "m",
         "metadata": {}} for q in (1, 2, 3, 4, 10000001, 10000002, 10000003, 10000004, 20000001, 20000002)])
    score = ["eval", "score", "--task", "pope", "--annotations", str(pope_dir), "--predictions", str(answers)]
    assert run_divico([*score, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == pope.score(read_predictions(answers), pope_dir) and printed["yes_ratio"] == 1.0
    assert run_divico(score) == 0 and "adversarial/f1" in capsys.readouterr().out
    assert run_divico([*score[:-1], str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: not found" in caplog.text
    assert run_divico([*score[:2], "model=x", *score[2:]]) == 2 and "nothing else (got ['model=x'])" in caplog.text
    assert run_divico(["eval", "model=x", "--annotations", "a"]) == 2 and "only with `divico eval score`" in caplog.text
    assert run_divico([*score[:2], "--task", "heldout", *score[4:]]) == 2 and "--task (a benchmark)" in caplog.text
