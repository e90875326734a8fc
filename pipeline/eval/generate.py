"""Greedy answers to each sample's first question, in left-padded batches, timed."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from pipeline.data.collator import LlavaCollator
from pipeline.data.loader import Sample
from pipeline.eval.data import first_question, question_type
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.settings import DiViCoConfig


@dataclass
class AnsweredBatch:
    samples: list[Sample]
    texts: list[str]  # the decoded answers, special tokens skipped, stripped
    tokens: int  # prompt (with visual) + generated tokens
    generated_tokens: int  # EOS counts, the padding after it not
    seconds: float  # inside generate() only
    visual_kept: list[float | None]  # per sample, the visual tokens kept per image (None: no image, or not compressed)


@dataclass
class Answers:
    rows: list[dict[str, Any]] = field(default_factory=list)  # key, question_type, question, answer, prediction
    visual_kept: list[float] = field(default_factory=list)  # per sample with an image, when compressed
    tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


class KeptVisualTokens:
    """While inside, the kept visual tokens per sample of the first compressing forward since
    `reset()`, as `model`'s DiViCo step receives them: what every mode chose (measured, since a
    method such as Recoverable Compression decides its count per image)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model.divico if isinstance(model, CompressedLlava) else None
        self.per_sample: torch.Tensor | None = None

    def _record(self, module: torch.nn.Module, args: tuple, output) -> None:
        if self.per_sample is None:  # the prefill's (recomputing generation selects again each step)
            self.per_sample = args[2].sum(1).cpu()

    def reset(self) -> None:
        self.per_sample = None

    def per_image(self, images: torch.Tensor) -> list[float | None]:
        """Kept tokens per image of each sample, given its number of `images` (None where the
        sample has no image or nothing was compressed)."""
        if self.per_sample is None:
            return [None] * len(images)
        return [float(kept) / float(count) if count else None for kept, count in zip(self.per_sample, images)]

    def __enter__(self) -> KeptVisualTokens:
        self.handle = self.module.register_forward_hook(self._record) if self.module is not None else None
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


def batches(samples: Iterable[Sample], batch_size: int, max_samples: int | None) -> Iterator[list[Sample]]:
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


@torch.inference_mode()
def answer_batches(model: torch.nn.Module, collator: LlavaCollator, samples: Iterable[Sample], *, batch_size: int,
                   max_new_tokens: int, max_samples: int | None = None, progress: bool = True,
                   total: int | None = None, fast: bool = False) -> Iterator[AnsweredBatch]:
    """Greedy answers of `model` (LlavaForConditionalGeneration or CompressedLlava) in eval mode
    (no dropout, no sampled gap noise), one batch at a time, under a progress bar (with an ETA
    when `total`, the number of samples, is given). The model's train/eval mode is restored
    when the iteration ends or is abandoned. `fast`: CompressedLlava's fast generation (static
    cache, CUDA graphs on a GPU), a plain model through it as mode none."""
    if fast and not isinstance(model, CompressedLlava):  # mode none is the plain model's forward
        model = CompressedLlava(model, DiViCoConfig(mode="none"))
    compressed = isinstance(model, CompressedLlava)
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=total, desc="answers", unit="q", disable=not progress) as bar, \
                KeptVisualTokens(model) as kept:
            for batch_samples in batches(samples, batch_size, max_samples):
                batch = collator.prompts(batch_samples)
                inputs = {"input_ids": batch["input_ids"].to(device),
                          "attention_mask": batch["attention_mask"].to(device)}
                if "pixel_values" in batch:
                    inputs["pixel_values"] = batch["pixel_values"].to(device, dtype)
                if compressed:
                    inputs["query_positions"] = batch["query_positions"].to(device)
                kept.reset()
                started = time.perf_counter()
                # only CompressedLlava.generate takes `fast` (transformers' would pass it to the model)
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=collator.pad_token_id, **({"fast": True} if fast else {}))
                seconds = time.perf_counter() - started
                new_tokens = output[:, batch["input_ids"].shape[1]:].cpu()
                generated = int((new_tokens != collator.pad_token_id).sum())
                bar.update(len(batch_samples))
                images = (batch["input_ids"] == collator.image_token_id).sum(1) / collator.num_visual_tokens
                yield AnsweredBatch(
                    samples=batch_samples, tokens=batch["num_tokens"] + generated, generated_tokens=generated,
                    seconds=seconds, visual_kept=kept.per_image(images),
                    texts=[collator.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens])
    finally:
        model.train(was_training)


def generate_answers(model: torch.nn.Module, collator: LlavaCollator, samples: Iterable[Sample], *,
                     batch_size: int, max_new_tokens: int, max_samples: int | None = None,
                     progress: bool = True, fast: bool = False) -> Answers:
    """Every sample's first question answered (`answer_batches`) beside its first gpt answer."""
    answers = Answers()
    for batch in answer_batches(model, collator, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                max_samples=max_samples, progress=progress, fast=fast):
        answers.tokens += batch.tokens
        answers.generated_tokens += batch.generated_tokens
        answers.seconds += batch.seconds
        answers.visual_kept += [kept for kept in batch.visual_kept if kept is not None]
        for sample, text in zip(batch.samples, batch.texts, strict=True):
            answers.rows.append({"key": sample.key, "question_type": question_type(sample),
                                 "question": first_question(sample), "answer": sample.conversations[1]["value"],
                                 "prediction": text})
    return answers
