"""`divico eval --task T` end to end on the tiny LLaVA: each benchmark's folder in LLaVA's layout
-> resumable predictions file -> the official scorer; killed and resumed, and split in chunks,
it writes the same file as one uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import benchmark_layouts
from cli_helpers import run_divico

from pipeline.eval.benchmarks import BenchmarkError, benchmark, read_predictions
from pipeline.data.settings import CollatorSettings
from pipeline.eval.main import load_collator
from pipeline.eval.predictions import chunk_of, read_rows
from pipeline.eval.tasks import BENCHMARK_TEMPLATE, as_sample
from pipeline.report.accuracy import HEADLINES

EVAL = ["max_new_tokens=3", "device=cpu", "model_max_length=512"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("benchmarks")
    return {task: write(root / task) for task, write in benchmark_layouts.LAYOUTS.items()}


@pytest.mark.parametrize("task", sorted(benchmark_layouts.LAYOUTS))
def test_each_benchmark_is_answered_into_llava_answers_and_scored(task, folders, tiny_llava_dir, tmp_path, capsys):
    predictions, out = tmp_path / "answers.jsonl", tmp_path / "summary.json"
    args = ["eval", "--task", task, f"model={tiny_llava_dir}", f"data={folders[task]}", "mode=fastv", "tau=0.111",
            "batch_size=3", *EVAL, f"tensorboard={tmp_path / 'tb'}", "--predictions", str(predictions),
            "--out", str(out), "--json"]
    assert run_divico(args) == 0
    summary = json.loads(capsys.readouterr().out)
    questions = benchmark(task).questions(folders[task])
    rows = read_rows(predictions, cut_torn_tail=False)
    assert [row["question_id"] for row in rows] == [q.question_id for q in questions]  # question order
    assert all(row["mode"] == "fastv" and row["tau"] == 0.111 and row["kept"] == summary["kept"] for row in rows)
    assert summary["kept"] == round(0.111 * summary["visual_tokens"]) and summary["answered_now"] == len(questions)
    # Scoring is a separate step: the same file scored alone gives the same figures.
    annotations = folders[task] / benchmark(task).ANNOTATIONS
    assert summary["figures"] == benchmark(task).score(read_predictions(predictions), annotations)
    assert json.loads(out.read_text()) == summary
    # The figures in TensorBoard: eval/<task>/<figure>, the headline among them.
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    headline, scale, _ = HEADLINES[task]
    assert events.Scalars(f"eval/{task}/{headline}")[0].value == pytest.approx(summary["figures"][headline], rel=1e-6)
    # Rerun: nothing left to answer, no model loaded, the same file and figures.
    before = predictions.read_bytes()
    assert run_divico(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["answered_now"] == 0 and again["figures"] == summary["figures"] and predictions.read_bytes() == before


def test_questions_are_asked_as_llava_asks_them(folders, tiny_llava_dir):
    collator = load_collator(tiny_llava_dir, CollatorSettings(template=BENCHMARK_TEMPLATE))
    question = benchmark("pope").questions(folders["pope"])[0]
    batch = collator.prompts([as_sample(question)])
    prompt = collator.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert prompt == ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the user's questions. USER: "
                      + "<image>" * collator.num_visual_tokens + "\nIs there a dog in the image?\nAnswer the question "
                      "using a single word or phrase. ASSISTANT:")
    mmbench = {q.question_id: q for q in benchmark("mmbench").questions(folders["mmbench"])}
    assert mmbench[1].prompt == "Look at the sky.\nIs it raining?\nA. yes\nB. no"
    assert mmbench[1].text == mmbench[1].prompt + "\nAnswer with the option's letter from the given choices directly."
    assert mmbench[1000000].prompt == "What is shown?\nA. a dog\nB. red\nC. blue\nD. a cat"  # nan hint: none
    assert mmbench[0].load_image().size == (48, 40)
    mme = benchmark("mme").questions(folders["mme"])
    assert [q.question_id for q in mme][-1] == "artwork/images/10002.jpg" and mme[-1].image.is_file()
    assert mme[0].text == "Is there a train in this image?\nAnswer the question using a single word or phrase."


def test_a_killed_evaluation_resumes_to_the_same_file(folders, tiny_llava_dir, tmp_path):
    """Killed (SIGKILL) after its first answers, rerun: every question answered once, and the
    file equals an uninterrupted run's (batches of 1, so batching cannot change an answer)."""
    args = ["divico", "eval", "--task", "pope", f"model={tiny_llava_dir}", f"data={folders['pope']}",
            "batch_size=1", *EVAL, "--json"]
    whole = tmp_path / "whole.jsonl"
    assert subprocess.run([*args, "--predictions", str(whole)], capture_output=True).returncode == 0
    resumed = tmp_path / "resumed.jsonl"
    process = subprocess.Popen([*args, "--predictions", str(resumed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (resumed.exists() and resumed.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert process.poll() is None, "the evaluation ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = read_rows(resumed, cut_torn_tail=False)
    assert 2 <= len(partial) < 6
    with resumed.open("a") as file:
        file.write('{"question_id": 9, "te')  # a torn last line, as a kill mid-write leaves
    finished = subprocess.run([*args, "--predictions", str(resumed)], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    summary = json.loads(finished.stdout)
    assert summary["answered_now"] == 6 - len(partial) and "dropping a torn last line" in finished.stderr
    assert resumed.read_bytes() == whole.read_bytes()


def test_chunks_across_gpus_merge_into_the_same_file(folders, tiny_llava_dir, tmp_path, capsys):
    args = ["eval", "--task", "gqa", f"model={tiny_llava_dir}", f"data={folders['gqa']}", "batch_size=1", *EVAL,
            "--json"]
    assert run_divico([*args, "--predictions", str(tmp_path / "whole.jsonl")]) == 0
    whole = json.loads(capsys.readouterr().out)
    merged = tmp_path / "merged.jsonl"
    for index in (1, 0):  # any order
        assert run_divico([*args, "--predictions", str(merged), "--chunk", f"{index}/2"]) == 0
        part = json.loads(capsys.readouterr().out)
        assert "figures" not in part and part["questions"] == [2, 1][index]
    assert [row["question_id"] for row in read_rows(tmp_path / "merged.1-of-2.jsonl", cut_torn_tail=False)] == \
        ["20968379"]
    assert run_divico([*args, "--predictions", str(merged)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["answered_now"] == 0 and summary["figures"] == whole["figures"]
    assert merged.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_chunks_split_like_llava():
    questions = list(range(10))
    assert [chunk_of(questions, i, 4) for i in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_bad_benchmark_files_and_resumes_are_refused_before_the_model_loads(folders, tiny_llava_dir, tmp_path,
                                                                           caplog):
    base = ["eval", "--task", "textvqa", f"model={tiny_llava_dir}", *EVAL]
    predictions = ["--predictions", str(tmp_path / "p.jsonl")]
    assert run_divico([*base, f"data={tmp_path / 'nowhere'}", *predictions]) == 2
    assert "nowhere: not a folder" in caplog.text
    broken = tmp_path / "textvqa"
    benchmark_layouts.textvqa(broken)
    (broken / "train_images" / "00685bc495504d61.jpg").unlink()
    assert run_divico([*base, f"data={broken}", *predictions]) == 2
    assert "2 of the 4 images llava_textvqa_val_v051_ocr.jsonl names are not there (first: 00685bc495504d61.jpg)" \
        in caplog.text
    (broken / "llava_textvqa_val_v051_ocr.jsonl").write_text('{"question_id": "x", "image": "x.jpg"}\n')
    assert run_divico([*base, f"data={broken}", *predictions]) == 2
    assert "llava_textvqa_val_v051_ocr.jsonl, question 1: needs \"question_id\", \"image\" and \"text\"" in caplog.text
    (broken / "TextVQA_0.5.1_val.json").unlink()
    assert run_divico([*base, f"data={broken}", *predictions]) == 2
    assert "TextVQA_0.5.1_val.json: not found (textvqa scores against it)" in caplog.text
    assert run_divico([*base, f"data={folders['textvqa']}"]) == 2 and "give --predictions FILE" in caplog.text
    assert run_divico([*base, f"data={folders['textvqa']}", *predictions, "--chunk", "2/2"]) == 2
    assert "--chunk 2/2: expected I/N with 0 <= I < N" in caplog.text
    # Answers of one setting are not resumed under another, nor those of another benchmark.
    assert run_divico([*base, f"data={folders['textvqa']}", "max_samples=1", *predictions]) == 0
    assert run_divico([*base, f"data={folders['textvqa']}", "mode=fastv", "tau=0.2", *predictions]) == 2
    assert "answers written with {'model_id'" in caplog.text and "give another --predictions file" in caplog.text
    assert run_divico(["eval", "--task", "gqa", f"model={tiny_llava_dir}", f"data={folders['gqa']}", *EVAL,
                       *predictions]) == 2
    assert "is not a question of this benchmark" in caplog.text


def test_a_question_image_that_does_not_decode_names_the_question(folders, tmp_path):
    question = benchmark("mmbench").questions(folders["mmbench"])[0]
    broken = type(question)(question_id=7, text="t", prompt="t", image="bm90IGFuIGltYWdl")  # "not an image"
    with pytest.raises(BenchmarkError, match="question 7: its base64 image: not a readable image"):
        broken.load_image()
