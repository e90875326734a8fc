"""Loading the tiny LLaVA for the model tests, on CPU or, with DIVICO_TEST_DEVICE=cuda, a GPU, and
the batches they feed it (prompts with and without images, training batches with labels)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

DEVICE = torch.device(os.environ.get("DIVICO_TEST_DEVICE", "cpu"))


def load_llava(path, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.to(DEVICE).eval()


QUESTIONS = ["What is it?", "How many red circles are there in the image now?", "Is there a star?"]
ANSWERS = ["A square", "three", "Yes"]


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (140, 140, 3), dtype=np.uint8))


def prompt(question: str, with_image: bool) -> str:
    return f"USER: {'<image>' if with_image else ''}\n{question} ASSISTANT:"


def prompts_batch(processor, with_image: list[bool], padding_side: str = "left"):
    processor.tokenizer.padding_side = padding_side
    texts = [prompt(QUESTIONS[i % 3], img) for i, img in enumerate(with_image)]
    images = [image(i) for i, img in enumerate(with_image) if img] or None
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    processor.tokenizer.padding_side = "left"
    return batch.to(DEVICE)


def training_batch(processor, with_image: list[bool]):
    """Right-padded prompt + answer with labels on the answer (and </s>) only."""
    processor.tokenizer.padding_side = "right"
    prompts = [prompt(QUESTIONS[i % 3], img) for i, img in enumerate(with_image)]
    texts = [p + f" {ANSWERS[i % 3]}</s>" for i, p in enumerate(prompts)]
    images = [image(i) for i, img in enumerate(with_image) if img] or None
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    prompt_lengths = [len(processor(images=[image(0)] if img else None, text=p)["input_ids"][0])
                      for p, img in zip(prompts, with_image)]
    processor.tokenizer.padding_side = "left"
    labels = batch["input_ids"].clone()
    for i, n in enumerate(prompt_lengths):
        labels[i, :n] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch.to(DEVICE)


def split_samples(batch, image_token_id: int):
    """The samples of a padded batch, each alone and unpadded, with its own pixel_values."""
    samples, image_index = [], 0
    for i in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][keep][None]
        sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if (ids == image_token_id).any():
            sample["pixel_values"] = batch["pixel_values"][image_index:image_index + 1]
            image_index += 1
        samples.append(sample)
    return samples
