"""Samples -> model batches, LLaVA-1.5 style: conversation template and labels
(pipeline/data/conversation.py), "pad" square images through the checkpoint's own image
processor, right padding for training and left-padded prompts for generation.

Batch keys: input_ids, attention_mask, labels (long, [B, L]); pixel_values ([N, 3, H, W], the
samples with images in batch order; absent when none has one); query_positions ([B], the last
token before the first answer: DiViCo's selection query); and counts for logging (plain ints):
num_tokens, num_visual_tokens, num_label_tokens, num_unlabelled, num_dropped_rounds.
MODEL_INPUTS names the keys the model's forward takes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from pipeline.data.conversation import IGNORE_INDEX, IMAGE_TOKEN, ConversationTokenizer, Tokenized
from pipeline.data.settings import CollatorSettings

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "labels", "query_positions")
PADDING_SIDES = ("right", "left")


@dataclass
class CollatorConfig(CollatorSettings):
    """The shared settings plus the caller's padding side: right for training batches
    (generation prompts from `prompts` are always left-padded)."""

    padding_side: str = "right"

    def __post_init__(self) -> None:
        self.validate()
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side={self.padding_side!r}; choose one of {PADDING_SIDES}")

    @classmethod
    def from_settings(cls, settings: CollatorSettings, padding_side: str) -> CollatorConfig:
        """The collator settings of a config that inherits them (DataConfig, EvalConfig)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(CollatorSettings)}, padding_side=padding_side)


def pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """The image centred on a square canvas of its longer side, filled with `fill` (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def visual_token_count(processor: Any, model_config: Any = None) -> int:
    """Visual tokens one image becomes, as the checkpoint's processor computes it (patch grid of
    the processed image + additional tokens, minus CLS under the "default" feature strategy);
    from the vision config (a CLIP tower: patches + CLS) when the processor lacks the fields."""
    strategy = (getattr(processor, "vision_feature_select_strategy", None)
                or getattr(model_config, "vision_feature_select_strategy", None))
    patch_size = getattr(processor, "patch_size", None)
    if patch_size:
        blank = Image.new("RGB", (64, 64))
        height, width = processor.image_processor(images=[blank], return_tensors="pt")["pixel_values"].shape[-2:]
        extra = getattr(processor, "num_additional_image_tokens", 0) or 0
    elif model_config is not None:
        vision = model_config.vision_config
        height = width = vision.image_size
        patch_size, extra = vision.patch_size, 1
    else:
        raise ValueError("the processor has no patch_size and no model config was given: cannot tell how many "
                         "visual tokens an image becomes")
    count = (height // patch_size) * (width // patch_size) + extra
    return count - 1 if strategy == "default" else count


class LlavaCollator:
    """A list of Samples (key, image | None, conversations, meta) -> a batch dict."""

    def __init__(self, processor: Any, config: CollatorConfig, model_config: Any = None):
        self.config = config
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:  # liuhaotian-style tokenizers pad with unk, as LLaVA does
            self.pad_token_id = self.tokenizer.unk_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an unk token to pad with")
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id is None or image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token")
        self.image_token_id = image_token_id
        chat_template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        self.num_visual_tokens = visual_token_count(processor, model_config)
        self.conversation = ConversationTokenizer(
            self.tokenizer, template=config.template, chat_template=chat_template, image_token_id=image_token_id,
            num_visual_tokens=self.num_visual_tokens, model_max_length=config.model_max_length)
        self.fill = tuple(int(round(mean * 255)) for mean in self.image_processor.image_mean)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, config: CollatorConfig) -> LlavaCollator:
        return cls(AutoProcessor.from_pretrained(model_path), config, AutoConfig.from_pretrained(model_path))

    @property
    def template(self) -> str:
        return self.conversation.template

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        images = [image.convert("RGB") for image in images]
        if self.config.image_aspect_ratio == "pad":
            images = [pad_to_square(image, self.fill) for image in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        encoded = []
        for sample in samples:
            tokenized = self.conversation.encode(sample.conversations, key=sample.key, has_image=sample.image is not None)
            if tokenized.unlabelled:
                log.warning("sample %s: its first round does not fit model_max_length=%d; kept without labels",
                            sample.key, self.config.model_max_length)
            encoded.append(tokenized)
        batch = self._pad(encoded, self.config.padding_side)
        batch["num_label_tokens"] = int((batch["labels"] != IGNORE_INDEX).sum())
        batch["num_unlabelled"] = sum(tokenized.unlabelled for tokenized in encoded)
        batch["num_dropped_rounds"] = sum(tokenized.dropped_rounds for tokenized in encoded)
        self._add_images(batch, samples)
        return batch

    def prompts(self, samples: Sequence[Any]) -> dict[str, Any]:
        """Left-padded generation prompts from each sample's first human turn, with the first
        gpt answers ("answers") and keys ("keys") for scoring; no labels."""
        encoded = [self.conversation.encode_prompt(sample.conversations, key=sample.key,
                                                   has_image=sample.image is not None) for sample in samples]
        batch = self._pad(encoded, "left")
        del batch["labels"]
        batch["answers"] = [sample.conversations[1]["value"] for sample in samples]
        batch["keys"] = [sample.key for sample in samples]
        self._add_images(batch, samples)
        return batch

    def _pad(self, encoded: list[Tokenized], side: str) -> dict[str, Any]:
        length = max(len(tokenized.input_ids) for tokenized in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        query_positions = torch.empty(len(encoded), dtype=torch.long)
        for row, tokenized in enumerate(encoded):
            size = len(tokenized.input_ids)
            start = 0 if side == "right" else length - size
            input_ids[row, start:start + size] = torch.tensor(tokenized.input_ids)
            labels[row, start:start + size] = torch.tensor(tokenized.labels)
            attention_mask[row, start:start + size] = 1
            query_positions[row] = start + tokenized.query_position
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "query_positions": query_positions, "num_tokens": int(attention_mask.sum()),
                "num_visual_tokens": sum(tokenized.num_visual_tokens for tokenized in encoded)}

    def _add_images(self, batch: dict[str, Any], samples: Sequence[Any]) -> None:
        images = [sample.image for sample in samples if sample.image is not None]
        if images:
            batch["pixel_values"] = self.pixel_values(images)
