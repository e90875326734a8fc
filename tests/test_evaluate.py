"""`divico eval` on the tiny LLaVA (random weights: low accuracy, but every number must add up)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from pipeline import cli
from pipeline.data.collator import CollatorConfig, LlavaCollator
from pipeline.data.loader import Sample
from pipeline.eval.evaluate import (
    EvalConfig,
    evaluate,
    load_model,
    main,
    normalize_answer,
    question_type,
    read_samples,
)
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.divico import DiViCoConfig

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (20, 160, 40)}
# 6 color questions (answers red x3, blue x2, green x1) and 3 arithmetic ones (5, 5, 7).
COLOR_ANSWERS = ["red", "blue", "red", "green", "red", "blue"]
SUMS = [(2, 3), (1, 4), (3, 4)]


@pytest.fixture(scope="module")
def eval_json(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    (root / "images").mkdir()
    entries = []
    for index, color in enumerate(COLOR_ANSWERS):
        Image.new("RGB", (60 + 10 * index, 50), COLORS[color]).save(root / "images" / f"{index}.png")
        question = "What color is the shape?\nAnswer the question using a single word or phrase."
        question = f"<image>\n{question}" if index % 2 else f"{question}\n<image>"
        entries.append({"id": f"c{index}", "image": f"{index}.png", "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": color}, {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes"}]})
    for a, b in SUMS:
        entries.append({"id": f"t{a}{b}", "conversations": [
            {"from": "human", "value": f"What is {a} plus {b}?"}, {"from": "gpt", "value": str(a + b)}]})
    data = root / "eval.json"
    data.write_text(json.dumps(entries))
    return data


@pytest.fixture(scope="module")
def collator(tiny_llava_dir) -> LlavaCollator:
    return LlavaCollator(AutoProcessor.from_pretrained(tiny_llava_dir), CollatorConfig(),
                         AutoConfig.from_pretrained(tiny_llava_dir))


@pytest.mark.parametrize("text, normalized", [
    ("Red.", "red"), ("  yes!</s>", "yes"), ("The cat", "cat"), ("An apple", "apple"), ("two", "2"),
    ("THREE", "3"), ("top-left", "top left"), ("don't", "dont"), ("a  b,c", "b c"), ("", ""),
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_normalization_does_not_merge_different_answers():
    assert normalize_answer("red") != normalize_answer("reds")
    assert normalize_answer("12") != normalize_answer("1 2")


def test_question_type_from_wording_or_meta():
    def sample(question, meta=None):
        return Sample("k", None, [{"from": "human", "value": question}, {"from": "gpt", "value": "x"}], meta or {})

    assert question_type(sample("<image>\nWhat color is the shape in the top left?")) == "what color is"
    assert question_type(sample("How many circles are there in the image?\n<image>")) == "how many"
    assert question_type(sample("How many letters are in the word 'cat'?")) == "how many letters"
    assert question_type(sample("Is there a red circle in the image?\nAnswer briefly.")) == "is there"
    assert question_type(sample("What is 3 plus 4?")) == "what is"
    assert question_type(sample("Whatever happened?")) == "other"
    assert question_type(sample("Is there?", {"question_type": "pope"})) == "pope"


def test_read_samples_from_json(eval_json):
    samples = list(read_samples(eval_json, eval_json.parent / "images"))
    assert len(samples) == 9 and [s.image is not None for s in samples] == [True] * 6 + [False] * 3
    assert samples[0].key == "0000000_c0" and samples[0].image.size == (60, 50)
    with pytest.raises(ValueError, match="pass --image-root"):
        list(read_samples(eval_json))
    with pytest.raises(FileNotFoundError, match="not found"):
        list(read_samples(eval_json.parent / "missing.json"))


def test_evaluate_plain_model_numbers_add_up(tiny_llava_dir, eval_json, collator):
    model = load_model(tiny_llava_dir, device="cpu")
    assert not isinstance(model, CompressedLlava)
    samples = list(read_samples(eval_json, eval_json.parent / "images"))
    result = evaluate(model, collator, samples, batch_size=4, max_new_tokens=4, progress=False)

    assert result.samples == len(result.predictions) == 9
    assert [p["key"] for p in result.predictions] == [s.key for s in samples]
    assert [p["answer"] for p in result.predictions] == COLOR_ANSWERS + ["5", "5", "7"]
    assert result.accuracy == sum(p["correct"] for p in result.predictions) / 9
    assert result.accuracy <= 2 / 9  # random weights
    assert set(result.by_type) == {"what color is", "what is"}
    colors, sums = result.by_type["what color is"], result.by_type["what is"]
    assert (colors["samples"], colors["majority_answer"], colors["chance"]) == (6, "red", 3 / 6)
    assert (sums["samples"], sums["majority_answer"], sums["chance"]) == (3, "5", 2 / 3)
    assert result.chance == pytest.approx((3 + 2) / 9)
    assert 0 < result.generated_tokens <= 9 * 4 and result.tokens_per_s > 0 and result.samples_per_s > 0
    assert (result.visual_tokens, result.visual_tokens_kept, result.mode, result.tau) == (100, 100, "none", None)

    # Left-padded batches answer exactly as one prompt at a time does.
    single = evaluate(model, collator, samples, batch_size=1, max_new_tokens=4, progress=False)
    assert [p["prediction"] for p in single.predictions] == [p["prediction"] for p in result.predictions]
    limited = evaluate(model, collator, samples, batch_size=4, max_new_tokens=4, max_samples=5, progress=False)
    assert limited.samples == 5 and limited.predictions == result.predictions[:5]


def test_evaluate_through_the_divico_wrapper(tiny_llava_dir, eval_json, collator):
    samples = list(read_samples(eval_json, eval_json.parent / "images"))[:5]
    plain = evaluate(load_model(tiny_llava_dir, device="cpu"), collator, samples, max_new_tokens=3, progress=False)
    keep_all = load_model(tiny_llava_dir, mode="fastv", tau=1.0, device="cpu")
    assert isinstance(keep_all, CompressedLlava)
    result = evaluate(keep_all, collator, samples, max_new_tokens=3, progress=False)
    assert [p["prediction"] for p in result.predictions] == [p["prediction"] for p in plain.predictions]

    compressed = evaluate(load_model(tiny_llava_dir, mode="fastv", tau=0.11, device="cpu"), collator, samples,
                          max_new_tokens=3, progress=False)
    assert (compressed.mode, compressed.tau, compressed.visual_tokens_kept) == ("fastv", 0.11, 11)
    with pytest.raises(ValueError, match="needs a trained gap encoder"):
        load_model(tiny_llava_dir, mode="divico", device="cpu")


def test_a_folder_with_divico_settings_loads_the_wrapper(tiny_llava_dir, eval_json, collator, tmp_path):
    folder = tmp_path / "exported"
    shutil.copytree(tiny_llava_dir, folder)
    CompressedLlava(load_model(folder, device="cpu"), DiViCoConfig(mode="divico", tau=1 / 9)).save_divico(folder)

    model = load_model(folder, device="cpu")
    assert isinstance(model, CompressedLlava) and model.config.mode == "divico"
    samples = list(read_samples(eval_json, eval_json.parent / "images"))[:3]
    model.train()  # as mid-training: evaluated in eval mode (no noise), handed back in train mode
    result = evaluate(model, collator, samples, max_new_tokens=2, progress=False)
    assert model.training
    assert (result.mode, result.visual_tokens_kept, result.samples) == ("divico", 11, 3)
    assert load_model(folder, mode="fastv", tau=0.2, device="cpu").config.mode == "fastv"


def test_evaluate_reads_a_shard_directory(make_shard_dir, tiny_llava_dir, collator):
    shards = make_shard_dir(6, 2)
    samples = list(read_samples(shards))
    assert sorted(s.key for s in samples) == [f"{index:07d}_id{index}" for index in range(6)]
    result = evaluate(load_model(tiny_llava_dir, device="cpu"), collator, samples, max_new_tokens=2, progress=False)
    assert result.samples == 6 and set(result.by_type) == {"other"}
    assert sorted(p["answer"] for p in result.predictions) == [f"answer {index}" for index in range(6)]
    with pytest.raises(FileNotFoundError, match="not a shard directory"):
        list(read_samples(shards.parent))


def test_divico_eval_command_prints_json(tiny_llava_dir, eval_json, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", str(tiny_llava_dir), "--data", str(eval_json),
                  "--image-root", str(eval_json.parent / "images"), "--max-samples", "4", "--max-new-tokens", "2",
                  "--json", "--predictions", str(tmp_path / "answers.jsonl")])
    assert exit_info.value.code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 4 and summary["visual_tokens"] == 100 and "predictions" not in summary
    assert set(summary) >= {"accuracy", "chance", "by_type", "tokens_per_s", "visual_tokens_kept"}
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["answer"] for a in answers] == COLOR_ANSWERS[:4]
    assert summary["accuracy"] == sum(a["correct"] for a in answers) / 4


def test_bad_settings_are_rejected(tiny_llava_dir, eval_json):
    with pytest.raises(ValueError, match="must be >= 1"):
        main(EvalConfig(model=tiny_llava_dir, data=eval_json, batch_size=0))
    with pytest.raises(FileNotFoundError, match="not found"):
        main(EvalConfig(model=tiny_llava_dir, data=eval_json.parent / "nope.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(eval_json.parent)
