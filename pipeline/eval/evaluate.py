"""`divico eval`: answer accuracy on a held-out set.

For each sample the first human turn becomes a left-padded generation prompt (the training
template, so the model sees what it was trained on); greedy decoding of a few tokens; the
answer is scored by normalised exact match against the first gpt answer. Reported overall
and per question type, each beside a chance level (the rate of the type's most common
answer: what always answering it would score on this set), with throughput and the visual
tokens the model keeps per image.

Models: a plain LlavaForConditionalGeneration folder, or one with DiViCo settings
(divico.json, + divico.safetensors) beside it, which is evaluated through CompressedLlava;
--mode/--tau override the saved settings or wrap a plain model (fastv, random and
select_only need no trained weights). In code, `evaluate(model, collator, samples)` takes an
in-memory model of either kind.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import string
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from pipeline.data.collator import CollatorConfig, LlavaCollator
from pipeline.data.conversation import IMAGE_TOKEN
from pipeline.data.loader import MANIFEST_NAME, Sample, ShardDataset
from pipeline.device import default_dtype, resolve_device
from pipeline.model.compressed_llava import SETTINGS_FILE, CompressedLlava
from pipeline.model.divico import DiViCoConfig, kept_count

log = logging.getLogger(__name__)

# VQA-style normalisation: number words as digits, no articles, no punctuation.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")

# Question types by leading words, as VQA groups its questions (longest prefix wins).
QUESTION_TYPES = ("what color is", "what shape is", "what word is", "how many letters", "how many",
                  "is there", "are there", "which", "what is", "what", "where", "who", "is", "are", "does", "do")


def normalize_answer(text: str) -> str:
    """Lowercase; apostrophes dropped ("don't" -> "dont"), other punctuation a space; articles
    dropped; number words as digits; single spaces."""
    words = PUNCTUATION.sub(" ", text.lower().replace("</s>", " ").replace("'", "")).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words if word not in ARTICLES)


def first_question(sample: Sample) -> str:
    """The first human turn without the image marker and without the answer-format instruction
    (the first non-empty line)."""
    lines = [line.strip() for line in sample.conversations[0]["value"].replace(IMAGE_TOKEN, "").splitlines()]
    return next((line for line in lines if line), "")


def question_type(sample: Sample) -> str:
    """meta["question_type"] when the data carries one, else the question's leading words."""
    if sample.meta.get("question_type"):
        return str(sample.meta["question_type"])
    words = " ".join(PUNCTUATION.sub(" ", first_question(sample).lower()).split()) + " "
    return next((prefix for prefix in QUESTION_TYPES if words.startswith(prefix + " ")), "other")


@dataclass
class EvalResult:
    samples: int
    accuracy: float
    chance: float  # always answering each question type's most common answer
    by_type: dict[str, dict[str, Any]]  # type -> samples, accuracy, chance, majority_answer
    tokens_per_s: float  # prompt (with visual) + generated tokens over generation time
    samples_per_s: float
    generated_tokens: int
    visual_tokens: int  # per image, entering the language model
    visual_tokens_kept: int  # per image, after compression (== visual_tokens without it)
    mode: str  # DiViCo mode, "none" for a plain model
    tau: float | None
    predictions: list[dict[str, Any]] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-sample predictions (what --json prints)."""
        return {k: v for k, v in asdict(self).items() if k != "predictions"}


def read_samples(data: str | Path, image_root: str | Path | None = None) -> Iterator[Sample]:
    """Samples from a shard directory (manifest.json inside; read with the training loader, its
    seeded order) or a LLaVA-format JSON list with images under `image_root`."""
    data = Path(data)
    if data.is_dir():
        if not (data / MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"{data} is a folder without {MANIFEST_NAME}: not a shard directory")
        yield from ShardDataset(data, rank=0, world_size=1, batch_size=1, seed=0)
        return
    if not data.is_file():
        raise FileNotFoundError(f"evaluation data {data} not found")
    entries = json.loads(data.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{data}: expected a JSON list of LLaVA entries")
    for index, entry in enumerate(entries):
        key = f"{index:07d}_{entry.get('id', '')}"
        image = None
        if entry.get("image"):
            if image_root is None:
                raise ValueError(f"{data}: entry {index} has an image; pass --image-root")
            path = Path(image_root) / entry["image"]
            try:
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
            except (OSError, ValueError) as error:
                raise ValueError(f"{data}: entry {index} image {path}: {error}") from error
        meta = {k: v for k, v in entry.items() if k != "conversations"} | {"index": index}
        yield Sample(key=key, image=image, conversations=entry.get("conversations") or [], meta=meta)


def _batches(samples: Iterable[Sample], batch_size: int, max_samples: int | None) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for count, sample in enumerate(samples):
        if max_samples is not None and count >= max_samples:
            break
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def evaluate(model: torch.nn.Module, collator: LlavaCollator, samples: Iterable[Sample], *, batch_size: int = 16,
             max_new_tokens: int = 8, max_samples: int | None = None, progress: bool = True) -> EvalResult:
    """Greedy answers of `model` (LlavaForConditionalGeneration or CompressedLlava, in memory,
    e.g. mid-training: its train/eval mode is restored) to each sample's first question, scored
    against the first answer."""
    compressed = isinstance(model, CompressedLlava)
    config = model.config if compressed else None
    device = _device(model)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    predictions, tokens, generated_tokens, seconds = [], 0, 0, 0.0
    was_training = model.training
    model.eval()
    try:
        for batch_samples in tqdm(_batches(samples, batch_size, max_samples), desc="eval", unit="batch",
                                  disable=not progress):
            batch = collator.prompts(batch_samples)
            inputs = {"input_ids": batch["input_ids"].to(device),
                      "attention_mask": batch["attention_mask"].to(device)}
            if "pixel_values" in batch:
                inputs["pixel_values"] = batch["pixel_values"].to(device, dtype)
            if compressed:
                inputs["query_positions"] = batch["query_positions"].to(device)
            started = time.perf_counter()
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=collator.pad_token_id)
            seconds += time.perf_counter() - started
            new_tokens = output[:, batch["input_ids"].shape[1]:].cpu()
            generated = int((new_tokens != collator.pad_token_id).sum())  # EOS counts, the padding after it not
            generated_tokens += generated
            tokens += batch["num_tokens"] + generated
            for row, sample in enumerate(batch_samples):
                prediction = collator.tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
                answer = batch["answers"][row]
                predictions.append({"key": sample.key, "question_type": question_type(sample),
                                    "question": first_question(sample), "answer": answer, "prediction": prediction,
                                    "correct": normalize_answer(prediction) == normalize_answer(answer)})
    finally:
        model.train(was_training)
    if not predictions:
        raise ValueError("no samples to evaluate")

    by_type: dict[str, dict[str, Any]] = {}
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for prediction in predictions:
        grouped[prediction["question_type"]].append(prediction)
    majority_total = 0
    for name in sorted(grouped):
        group = grouped[name]
        majority_answer, majority = Counter(normalize_answer(p["answer"]) for p in group).most_common(1)[0]
        majority_total += majority
        by_type[name] = {"samples": len(group), "accuracy": sum(p["correct"] for p in group) / len(group),
                         "chance": majority / len(group), "majority_answer": majority_answer}

    visual = collator.num_visual_tokens
    return EvalResult(
        samples=len(predictions), accuracy=sum(p["correct"] for p in predictions) / len(predictions),
        chance=majority_total / len(predictions), by_type=by_type, tokens_per_s=tokens / seconds,
        samples_per_s=len(predictions) / seconds, generated_tokens=generated_tokens,
        visual_tokens=visual,
        visual_tokens_kept=int(kept_count(visual, config.tau)) if compressed and config.compresses else visual,
        mode=config.mode if compressed else "none", tau=config.tau if compressed and config.compresses else None,
        predictions=predictions)


def load_model(path: str | Path, *, mode: str | None = None, tau: float | None = None,
               device: str = "auto") -> torch.nn.Module:
    """The checkpoint at `path`: through CompressedLlava when DiViCo settings lie beside it or
    `mode` asks for one, else the plain LLaVA model. bf16 on GPU, fp32 on CPU."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
    device = resolve_device(device)
    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=default_dtype(device)).to(device)
    overrides = {name: value for name, value in (("mode", mode), ("tau", tau)) if value is not None}
    if (path / SETTINGS_FILE).is_file():
        return CompressedLlava.from_saved(llava, path, **overrides).to(device)
    if not overrides or overrides.get("mode") == "none":
        return llava
    divico = DiViCoConfig(**overrides)
    if divico.uses_gap_encoder:
        raise ValueError(f"{path} has no DiViCo weights ({SETTINGS_FILE}); mode {divico.mode!r} needs a trained "
                         "gap encoder (fastv, random and select_only do not)")
    return CompressedLlava(llava, divico).to(device)


@dataclass
class EvalConfig:
    model: Path
    data: Path
    image_root: Path | None = None
    max_samples: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 8
    template: str = "auto"
    model_max_length: int = 2048
    mode: str | None = None
    tau: float | None = None
    device: str = "auto"


def main(cfg: EvalConfig, *, progress: bool = True) -> EvalResult:
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1 or (cfg.max_samples is not None and cfg.max_samples < 1):
        raise ValueError("--batch-size, --max-new-tokens and --max-samples must be >= 1")
    if not Path(cfg.data).exists():
        raise FileNotFoundError(f"evaluation data {cfg.data} not found")
    model = load_model(cfg.model, mode=cfg.mode, tau=cfg.tau, device=cfg.device)
    collator = LlavaCollator(AutoProcessor.from_pretrained(cfg.model),
                             CollatorConfig(template=cfg.template, model_max_length=cfg.model_max_length),
                             AutoConfig.from_pretrained(cfg.model))
    log.info("evaluating %s (mode %s, template %s, %d visual tokens per image) on %s", cfg.model,
             model.config.mode if isinstance(model, CompressedLlava) else "none", collator.template,
             collator.num_visual_tokens, cfg.data)
    return evaluate(model, collator, read_samples(cfg.data, cfg.image_root), batch_size=cfg.batch_size,
                    max_new_tokens=cfg.max_new_tokens, max_samples=cfg.max_samples, progress=progress)


def print_result(result: EvalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"answer accuracy (mode {result.mode}"
                        + (f", tau {result.tau:.3f}" if result.tau is not None else "") + ")")
    for column in ("question type", "samples", "accuracy", "chance", "majority answer"):
        table.add_column(column, justify="left" if column in ("question type", "majority answer") else "right")
    for name, row in result.by_type.items():
        table.add_row(name, str(row["samples"]), f"{row['accuracy']:.1%}", f"{row['chance']:.1%}",
                      row["majority_answer"])
    table.add_row("all", str(result.samples), f"{result.accuracy:.1%}", f"{result.chance:.1%}", "", style="bold")
    console = Console()
    console.print(table)
    console.print(f"{result.tokens_per_s:.1f} tokens/s, {result.samples_per_s:.2f} samples/s, "
                  f"visual tokens kept per image: {result.visual_tokens_kept} of {result.visual_tokens}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="answer accuracy of a model on a held-out set")
    parser.add_argument("--model", type=Path, required=True,
                        help="Hugging Face LLaVA folder (with divico.json beside it for a DiViCo model)")
    parser.add_argument("--data", type=Path, required=True,
                        help="shard directory (divico prep shard) or LLaVA-format JSON")
    parser.add_argument("--image-root", type=Path, default=None, help="image folder for a JSON --data")
    parser.add_argument("--mode", default=None, help="DiViCo mode override (none, fastv, divico, ...)")
    parser.add_argument("--tau", type=float, default=None, help="kept fraction override")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--template", default="auto", help="auto, vicuna_v1 or chat_template")
    parser.add_argument("--model-max-length", type=int, default=2048)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="also write every answer (key, question, answer, prediction, correct) as JSON lines")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = EvalConfig(model=args.model, data=args.data, image_root=args.image_root, max_samples=args.max_samples,
                     batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, template=args.template,
                     model_max_length=args.model_max_length, mode=args.mode, tau=args.tau, device=args.device)
    result = main(cfg, progress=not args.json)
    if args.predictions:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        args.predictions.write_text("".join(json.dumps(p) + "\n" for p in result.predictions))
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print_result(result)
    return 0
