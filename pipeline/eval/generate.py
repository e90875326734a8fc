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


@dataclass
class Answers:
    rows: list[dict[str, Any]] = field(default_factory=list)  # key, question_type, question, answer, prediction
    tokens: int = 0  # prompt (with visual) + generated tokens
    generated_tokens: int = 0
    seconds: float = 0.0  # inside generate() only


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
def generate_answers(model: torch.nn.Module, collator: LlavaCollator, samples: Iterable[Sample], *,
                     batch_size: int, max_new_tokens: int, max_samples: int | None = None,
                     progress: bool = True) -> Answers:
    """Greedy answers of `model` (LlavaForConditionalGeneration or CompressedLlava) in eval mode:
    no dropout and no sampled gap noise. Its train/eval mode is restored afterwards."""
    compressed = isinstance(model, CompressedLlava)
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    answers = Answers()
    was_training = model.training
    model.eval()
    try:
        for batch_samples in tqdm(batches(samples, batch_size, max_samples), desc="eval", unit="batch",
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
            answers.seconds += time.perf_counter() - started
            new_tokens = output[:, batch["input_ids"].shape[1]:].cpu()
            generated = int((new_tokens != collator.pad_token_id).sum())  # EOS counts, the padding after it not
            answers.generated_tokens += generated
            answers.tokens += batch["num_tokens"] + generated
            for row, sample in enumerate(batch_samples):
                answers.rows.append({
                    "key": sample.key, "question_type": question_type(sample), "question": first_question(sample),
                    "answer": batch["answers"][row],
                    "prediction": collator.tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()})
    finally:
        model.train(was_training)
    return answers
