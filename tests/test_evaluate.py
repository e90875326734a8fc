"""`divico eval` on the tiny LLaVA (random weights: low accuracy, but every number must add up)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from pipeline import cli
from pipeline.train.config import ConfigError
from pipeline.contract import DIVICO_WEIGHTS_FILE, EXIT_BAD_INPUT, EXIT_FAILURE
from pipeline.data.collator import CollatorConfig, LlavaCollator
from pipeline.data.loader import Sample
from pipeline.eval.config import CompressionOverrides, EvalConfig
from pipeline.eval.data import question_type, read_samples
from pipeline.eval.main import evaluate, llava_of, load_model, main
from pipeline.eval.score import normalize_answer
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.settings import DiViCoConfig

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
def samples(eval_json) -> list[Sample]:
    return list(read_samples(eval_json, eval_json.parent / "images"))


@pytest.fixture(scope="module")
def collator(tiny_llava_dir) -> LlavaCollator:
    return LlavaCollator(AutoProcessor.from_pretrained(tiny_llava_dir), CollatorConfig(padding_side="left"),
                         AutoConfig.from_pretrained(tiny_llava_dir))


@pytest.fixture(scope="module")
def plain_model(tiny_llava_dir):
    return load_model(tiny_llava_dir, device="cpu")


def with_answers(samples: list[Sample], answers: list[str]) -> list[Sample]:
    """The samples with their first gpt answer replaced (the prompt, and so the prediction, stays)."""
    changed = copy.deepcopy(samples)
    for sample, answer in zip(changed, answers, strict=True):
        sample.conversations[1]["value"] = answer
    return changed


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


def test_read_samples_from_json(eval_json, samples):
    assert len(samples) == 9 and [s.image is not None for s in samples] == [True] * 6 + [False] * 3
    assert samples[0].key == "0000000_c0" and samples[0].image.size == (60, 50)
    with pytest.raises(ConfigError, match="image_root: not set, but entry 0"):
        list(read_samples(eval_json))
    with pytest.raises(ConfigError, match="missing.json: not found"):
        list(read_samples(eval_json.parent / "missing.json"))


def test_evaluate_plain_model_numbers_add_up(plain_model, collator, samples):
    assert not isinstance(plain_model, CompressedLlava)
    result = evaluate(plain_model, collator, samples, batch_size=4, max_new_tokens=4, progress=False)

    assert result.samples == len(result.predictions) == 9
    assert [p["key"] for p in result.predictions] == [s.key for s in samples]
    assert [p["answer"] for p in result.predictions] == COLOR_ANSWERS + ["5", "5", "7"]
    assert set(result.by_type) == {"what color is", "what is"}
    colors, sums = result.by_type["what color is"], result.by_type["what is"]
    assert (colors["samples"], colors["majority_answer"], colors["chance"]) == (6, "red", 3 / 6)
    assert (sums["samples"], sums["majority_answer"], sums["chance"]) == (3, "5", 2 / 3)
    assert result.chance == pytest.approx((3 + 2) / 9)
    assert 0 < result.generated_tokens <= 9 * 4 and result.tokens_per_s > 0 and result.samples_per_s > 0
    assert (result.visual_tokens, result.visual_tokens_kept, result.mode, result.tau) == (100, 100, "none", None)

    # Left-padded batches answer exactly as one prompt at a time does.
    single = evaluate(plain_model, collator, samples, batch_size=1, max_new_tokens=4, progress=False)
    assert [p["prediction"] for p in single.predictions] == [p["prediction"] for p in result.predictions]
    limited = evaluate(plain_model, collator, samples, batch_size=4, max_new_tokens=4, max_samples=5, progress=False)
    assert limited.samples == 5 and limited.predictions == result.predictions[:5]


def test_accuracy_on_answers_we_control(plain_model, collator, samples):
    """Answers set to the model's own prediction (written differently) where `right`, to a word
    it cannot have said elsewhere: the score must find exactly those, overall and per type."""
    said = [p["prediction"] for p in evaluate(plain_model, collator, samples, max_new_tokens=3,
                                              progress=False).predictions]
    right = [True, False, True, True, False, False, True, False, False]
    answers = [f"The {text.upper()}." if ok else "zzyzx" for text, ok in zip(said, right, strict=True)]
    result = evaluate(plain_model, collator, with_answers(samples, answers), max_new_tokens=3, progress=False)

    assert [p["prediction"] for p in result.predictions] == said
    assert [p["correct"] for p in result.predictions] == right
    assert all(p["correct"] == (normalize_answer(p["prediction"]) == normalize_answer(p["answer"]))
               for p in result.predictions)
    assert result.by_type["what color is"]["accuracy"] == 3 / 6 and result.by_type["what is"]["accuracy"] == 1 / 3
    assert result.accuracy == pytest.approx(4 / 9)


def test_evaluate_through_the_divico_wrapper(tiny_llava_dir, plain_model, collator, samples):
    samples = samples[:5]
    plain = evaluate(plain_model, collator, samples, max_new_tokens=3, progress=False)
    keep_all = load_model(tiny_llava_dir, mode="fastv", tau=1.0, device="cpu")
    assert isinstance(keep_all, CompressedLlava)
    result = evaluate(keep_all, collator, samples, max_new_tokens=3, progress=False)
    assert [p["prediction"] for p in result.predictions] == [p["prediction"] for p in plain.predictions]

    compressed = evaluate(load_model(tiny_llava_dir, mode="fastv", tau=0.11, device="cpu"), collator, samples,
                          max_new_tokens=3, progress=False)
    assert (compressed.mode, compressed.tau, compressed.visual_tokens_kept) == ("fastv", 0.11, 11)
    with pytest.raises(ConfigError, match="needs a trained gap encoder"):
        load_model(tiny_llava_dir, mode="divico", device="cpu")


def test_fast_generation_gives_the_same_answers(tiny_llava_dir, plain_model, collator, samples):
    """A plain model (through mode none) and a compressed one, in batches with padding."""
    samples = samples[:5]
    for model in (plain_model, load_model(tiny_llava_dir, mode="fastv", tau=0.11, device="cpu")):
        eager = evaluate(model, collator, samples, batch_size=3, max_new_tokens=3, progress=False)
        fast = evaluate(model, collator, samples, batch_size=3, max_new_tokens=3, progress=False, fast=True)
        assert fast.predictions == eager.predictions and fast.accuracy == eager.accuracy
        assert (fast.fast, eager.fast, fast.mode) == (True, False, eager.mode)


@pytest.fixture(scope="module")
def divico_dir(tiny_llava_dir, tmp_path_factory) -> Path:
    """The tiny LLaVA with DiViCo settings beside it; sigma0 so large that the gap noise of
    train mode changes what the model says."""
    folder = tmp_path_factory.mktemp("divico_model") / "exported"
    shutil.copytree(tiny_llava_dir, folder)
    config = DiViCoConfig(mode="divico", tau=1 / 9, sigma0=100.0)
    CompressedLlava(load_model(folder, device="cpu"), config).save_divico(folder)
    return folder


def test_a_model_left_in_train_mode_is_evaluated_without_noise(divico_dir, collator, samples):
    model = load_model(divico_dir, device="cpu")
    assert isinstance(model, CompressedLlava) and model.config.mode == "divico" and not model.training
    samples = samples[:6]
    quiet = evaluate(model, collator, samples, max_new_tokens=3, progress=False)

    model.train()  # as mid-training
    torch.manual_seed(0)
    left_in_train = evaluate(model, collator, samples, max_new_tokens=3, progress=False)
    assert model.training  # handed back as it came
    assert [p["prediction"] for p in left_in_train.predictions] == [p["prediction"] for p in quiet.predictions]
    assert (left_in_train.mode, left_in_train.visual_tokens_kept, left_in_train.samples) == ("divico", 11, 6)

    # The noise this guards against: generating in train mode says something else.
    batch = collator.prompts(samples)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "query_positions")}
    noisy = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=collator.pad_token_id)
    model.eval()
    clean = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=collator.pad_token_id)
    assert not torch.equal(noisy, clean)
    assert load_model(divico_dir, mode="fastv", tau=0.2, device="cpu").config.mode == "fastv"


def test_evaluate_reads_a_shard_directory(make_shard_dir, plain_model, collator):
    shards = make_shard_dir(6, 2)
    samples = list(read_samples(shards))
    assert sorted(s.key for s in samples) == [f"{index:07d}_id{index}" for index in range(6)]
    result = evaluate(plain_model, collator, samples, max_new_tokens=2, progress=False)
    assert result.samples == 6 and set(result.by_type) == {"other"}
    assert sorted(p["answer"] for p in result.predictions) == [f"answer {index}" for index in range(6)]
    with pytest.raises(ConfigError, match="not a shard directory"):
        list(read_samples(shards.parent))


def test_main_takes_an_eval_config(tiny_llava_dir, eval_json):
    result = main(EvalConfig(model=tiny_llava_dir, data=eval_json, image_root=eval_json.parent / "images",
                             max_samples=3, max_new_tokens=2, device="cpu",
                             divico=CompressionOverrides(mode="fastv", tau=0.5)), progress=False)
    assert (result.samples, result.mode, result.visual_tokens_kept) == (3, "fastv", 50)


def test_divico_eval_command_writes_the_summary(tiny_llava_dir, eval_json, capsys, tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {tiny_llava_dir}\nmax_samples: 2\nmax_new_tokens: 2\ndevice: cpu\n")
    out, answers_file = tmp_path / "stage" / "summary.json", tmp_path / "answers.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--config", str(recipe), f"data={eval_json}", f"image_root={eval_json.parent / 'images'}",
                  "max_samples=4", "--json", "--out", str(out), "--predictions", str(answers_file)])
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed and list(out.parent.iterdir()) == [out]  # no temporary left
    assert printed["samples"] == 4 and printed["visual_tokens"] == 100 and "predictions" not in printed
    assert set(printed) == {"samples", "accuracy", "chance", "by_type", "tokens_per_s", "samples_per_s",
                            "generated_tokens", "visual_tokens", "visual_tokens_kept", "mode", "tau", "layer",
                            "divico_seed", "image_noise", "noise_seed", "fast", "tags", "router_weights"}
    assert (printed["divico_seed"], printed["image_noise"], printed["noise_seed"], printed["tags"],
            printed["router_weights"]) == (None, 0, 0, {}, None)
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [a["answer"] for a in answers] == COLOR_ANSWERS[:4]
    assert all(a["correct"] == (normalize_answer(a["prediction"]) == normalize_answer(a["answer"])) for a in answers)


def test_tags_and_the_new_settings_reach_the_summary(tiny_llava_dir, eval_json, capsys, tmp_path):
    """What a benchmark cell writes and reads back: its tags verbatim, its noise and its seed."""
    out = tmp_path / "cell.json"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", f"model={tiny_llava_dir}", f"data={eval_json}", f"image_root={eval_json.parent / 'images'}",
                  "device=cpu", "max_samples=2", "max_new_tokens=1", "mode=random", "tau=0.5", "seed=4",
                  "image_noise=0.5", "noise_seed=3", "tags.method=random", "tags.seed=4", "tags.condition=noise",
                  "fast=true", "--json", "--out", str(out)])
    assert exit_info.value.code == 0
    summary = json.loads(out.read_text())
    assert summary == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tags"] == {"method": "random", "seed": "4", "condition": "noise"}
    assert (summary["mode"], summary["divico_seed"], summary["image_noise"], summary["noise_seed"], summary["fast"]) == (
        "random", 4, 0.5, 3, True)


@contextlib.contextmanager
def projector_outputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every multi_modal_projector output while inside (one row per image, in evaluation order),
    as the language model receives it: the eval's noise hook runs before this one."""
    outputs: list[torch.Tensor] = []
    projector = llava_of(model).model.multi_modal_projector
    handle = projector.register_forward_hook(lambda module, args, output: outputs.append(output.detach().clone()))
    try:
        yield outputs
    finally:
        handle.remove()


def test_image_noise_is_added_to_the_encoded_images_and_removed_after(plain_model, collator, samples):
    images = samples[:6]

    def run(**noise) -> tuple[list[str], torch.Tensor]:
        with projector_outputs(plain_model) as outputs:
            result = evaluate(plain_model, collator, images, batch_size=3, max_new_tokens=2, progress=False, **noise)
        assert result.image_noise == noise.get("image_noise", 0.0)
        return [p["prediction"] for p in result.predictions], torch.cat(outputs)

    said, clean = run()
    assert clean.shape[0] == len(images)
    said_without, without = run(image_noise=0.0)
    assert said_without == said and torch.equal(without, clean)

    _, noisy = run(image_noise=10.0)
    added = noisy - clean
    assert added.std().item() == pytest.approx(10.0, rel=0.05) and abs(added.mean().item()) < 0.5
    assert not torch.allclose(added[0], added[1], atol=1.0)  # each image its own draw
    _, other_seed = run(image_noise=10.0, noise_seed=1)
    assert not torch.allclose(other_seed - clean, added, atol=1.0)

    # An error during generation still removes the hooks.
    def fail(module, args, output):
        raise RuntimeError("stop")

    failing = llava_of(plain_model).model.multi_modal_projector.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="stop"):
        evaluate(plain_model, collator, images, max_new_tokens=1, progress=False, image_noise=10.0)
    failing.remove()
    assert not llava_of(plain_model).model.vision_tower._forward_pre_hooks
    assert torch.equal(run()[1], clean)


def test_an_images_noise_is_the_same_alone_in_a_batch_and_under_every_method(tiny_llava_dir, plain_model,
                                                                              collator, samples):
    """Alone on the plain model vs. in another order, in batches mixed with text-only samples,
    on a FastV CompressedLlava: the added noise of each image must not change."""
    def added_noise(model, batch_samples, batch_size) -> torch.Tensor:
        rows = []
        for noise in (0.0, 10.0):
            with projector_outputs(model) as outputs:
                evaluate(model, collator, batch_samples, batch_size=batch_size, max_new_tokens=1, progress=False,
                         image_noise=noise, noise_seed=5)
            rows.append(torch.cat(outputs))
        return rows[1] - rows[0]

    alone = added_noise(plain_model, samples[:4], batch_size=1)
    fastv = load_model(tiny_llava_dir, mode="fastv", tau=0.5, device="cpu")
    order = [3, 1, 2, 0]  # images 0-3 in batches [text, 3, 1, text] and [2, 0]
    mixed = [samples[6], samples[3], samples[1], samples[7], samples[2], samples[0]]
    batched = added_noise(fastv, mixed, batch_size=4)
    assert batched.shape == alone.shape
    torch.testing.assert_close(batched, alone[order], atol=1e-4, rtol=0)


def test_seed_overrides_the_divico_seed(tiny_llava_dir, divico_dir, eval_json, collator, samples):
    batch = collator.prompts(samples[:4])
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "query_positions")}

    def kept(seed: int | None) -> torch.Tensor:
        model = load_model(tiny_llava_dir, mode="random", tau=0.11, seed=seed, device="cpu")
        assert model.config.seed == (0 if seed is None else seed)
        with torch.inference_mode():
            return model(**inputs).compressed_positions

    assert torch.equal(kept(None), kept(0)) and not torch.equal(kept(0), kept(7))
    assert load_model(divico_dir, seed=5, device="cpu").config.seed == 5  # over the saved setting
    assert not isinstance(load_model(tiny_llava_dir, seed=5, device="cpu"), CompressedLlava)  # seed alone wraps nothing
    result = main(EvalConfig(model=tiny_llava_dir, data=eval_json, image_root=eval_json.parent / "images",
                             max_samples=2, max_new_tokens=1, device="cpu",
                             divico=CompressionOverrides(mode="random", tau=0.5, seed=7)),
                  progress=False)
    assert (result.mode, result.divico_seed) == ("random", 7)


def truncated_copy(source: Path, folder: Path, name: str) -> Path:
    shutil.copytree(source, folder)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:len(data) // 2])
    return folder


@pytest.mark.parametrize("case, overrides, status, message", [
    ("tau", ["tau=1.5"], EXIT_BAD_INPUT, r"tau=1.5: the kept fraction must be in \(0, 1\]"),
    ("mode", ["mode=fast"], EXIT_BAD_INPUT, r"mode='fast': expected one of"),
    ("unknown key", ["max_sample=3"], EXIT_BAD_INPUT, r"max_sample: Key 'max_sample' not in 'EvalConfig'"),
    ("wrong type", ["batch_size=four"], EXIT_BAD_INPUT, r"batch_size: Value 'four'"),
    ("range", ["max_new_tokens=0"], EXIT_BAD_INPUT, r"max_new_tokens=0: must be >= 1"),
    ("scorer", ["scorer=bleu"], EXIT_BAD_INPUT, r"scorer='bleu': expected one of \['exact_match'\]"),
    ("template", ["template=alpaca"], EXIT_BAD_INPUT, r"template='alpaca'; choose one of"),
    ("no model folder", ["model={tmp}/nope"], EXIT_BAD_INPUT, r"model=\S+/nope: not found"),
    ("not a model folder", ["model={tmp}"], EXIT_BAD_INPUT, r"model=\S+: no config.json in it"),
    ("no data", ["data={tmp}/nope.json"], EXIT_BAD_INPUT, r"data=\S+/nope.json: not found"),
    ("data unset", ["data=???"], EXIT_BAD_INPUT, r"data: required, not set"),
    ("gap encoder", ["mode=divico"], EXIT_BAD_INPUT, r"has no DiViCo weights"),
    ("truncated weights", ["model={tmp}/cut"], EXIT_FAILURE, r"cut/model.safetensors: truncated or corrupt"),
    ("truncated divico weights", ["model={tmp}/cut_divico"], EXIT_FAILURE,
     rf"cut_divico/{DIVICO_WEIGHTS_FILE}: cannot read it"),
    ("empty data", ["data={tmp}/empty.json"], EXIT_FAILURE, r"empty.json: expected a non-empty JSON list"),
    ("negative noise", ["image_noise=-1"], EXIT_BAD_INPUT, r"image_noise=-1.0: must be a finite number >= 0"),
    ("infinite noise", ["image_noise=.inf"], EXIT_BAD_INPUT, r"image_noise=inf: must be a finite number >= 0"),
    ("noise type", ["image_noise=loud"], EXIT_BAD_INPUT, r"image_noise: Value 'loud'"),
    ("nested tag", ["tags.run.a=1"], EXIT_BAD_INPUT, r"tags.run=\{'a': 1\}: a tag's value must be a string"),
])
def test_bad_input_is_one_line_and_an_exit_status(case, overrides, status, message, tiny_llava_dir, divico_dir,
                                                  eval_json, tmp_path, caplog):
    if case == "truncated weights":
        truncated_copy(tiny_llava_dir, tmp_path / "cut", "model.safetensors")
    if case == "truncated divico weights":
        truncated_copy(divico_dir, tmp_path / "cut_divico", DIVICO_WEIGHTS_FILE)
    if case == "empty data":
        (tmp_path / "empty.json").write_text("[]")
    out = tmp_path / "summary.json"
    args = [f"model={tiny_llava_dir}", f"data={eval_json}", f"image_root={eval_json.parent / 'images'}",
            "device=cpu", *(o.format(tmp=tmp_path) for o in overrides)]
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *args, "--out", str(out), "--json"])
    assert exit_info.value.code == status
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and len(errors[0].splitlines()) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    assert not out.exists()


def test_the_divico_program_prints_one_line_and_no_traceback(tiny_llava_dir, eval_json):
    done = subprocess.run(["divico", "eval", f"model={tiny_llava_dir}", f"data={eval_json}", "tau=1.5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_BAD_INPUT
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if "ERROR" in line] == [
        next(line for line in done.stderr.splitlines() if line.endswith("tau=1.5: the kept fraction must be in (0, 1]"))]
