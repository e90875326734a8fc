"""The lmms-eval model plugin (pipeline/eval/lmms.py): registered through the entry point, run by
lmms-eval's own CLI on a task defined over a local fixture dataset (tests/fixtures/lmms_task/),
answering exactly as `divico eval --task` does."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model

import benchmark_layouts
from pipeline.eval.lmms import DiViCoLmms

TASK_DIR = Path(__file__).parent / "fixtures" / "lmms_task"


def test_lmms_eval_finds_the_divico_model_by_its_entry_point():
    assert get_model("divico") is DiViCoLmms


def test_lmms_eval_cli_runs_a_task_with_the_answers_of_divico_eval(tiny_llava_dir, tmp_path):
    pope = benchmark_layouts.pope(tmp_path / "pope")
    questions = [json.loads(line) for line in (pope / "llava_pope_test.jsonl").read_text().splitlines()]
    labels = ["yes", "no"] * 3
    (tmp_path / "questions.jsonl").write_text("".join(
        json.dumps({"question_id": q["question_id"], "image": str(pope / "val2014" / q["image"]),
                    "question": q["text"].split("\n")[0], "answer": label}) + "\n"
        for q, label in zip(questions, labels)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(["lmms-eval", "--model", "divico", "--model_args",
                          f"pretrained={tiny_llava_dir},mode=fastv,tau=0.111,device=cpu,fast=True",
                          "--tasks", "divico_fixture_pope", "--include_path", str(TASK_DIR), "--batch_size", "1",
                          "--output_path", "out", "--log_samples"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (samples_file,) = (tmp_path / "out").rglob("*_samples_divico_fixture_pope.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]["divico_fixture_pope"]

    native = tmp_path / "native.jsonl"
    assert subprocess.run(["divico", "eval", "--task", "pope", f"model={tiny_llava_dir}", f"data={pope}",
                           "mode=fastv", "tau=0.111", "batch_size=1", "max_new_tokens=3", "device=cpu",
                           "--predictions", str(native), "--json"], capture_output=True).returncode == 0
    texts = [json.loads(line)["text"] for line in native.read_text().splitlines()]
    assert [sample["filtered_resps"] for sample in samples] == texts
    assert results["exact_match,none"] == pytest.approx(sum(t.lower() == l for t, l in zip(texts, labels)) / 6)


def test_sampling_and_several_images_are_refused(tiny_llava_dir):
    model = DiViCoLmms(pretrained=str(tiny_llava_dir), device="cpu")
    model.task_dict = {"t": {"test": [{"id": 0}]}}

    def request(gen_kwargs: dict, visuals: list) -> Instance:
        return Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1},
                        arguments=("Is it red?", gen_kwargs, lambda doc: visuals, 0, "t", "test"))

    with pytest.raises(ValueError, match="t: asks to sample"):
        model.generate_until([request({"do_sample": True}, [])])
    image = benchmark_layouts.Image.new("RGB", (30, 30))
    with pytest.raises(ValueError, match="t, doc 0: 2 visuals; the divico model takes one image"):
        model.generate_until([request({}, [image, image])])
    (text,) = model.generate_until([request({"max_new_tokens": 2, "until": ["\n"]}, [image])])
    assert isinstance(text, str) and "\n" not in text
