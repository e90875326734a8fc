"""Batches from the collator on the tiny LLaVA: shapes, padding, images, query positions, grouping."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from pipeline.data.collator import (
    MODEL_INPUTS,
    CollatorConfig,
    LlavaCollator,
    pad_to_square,
    visual_token_count,
)
from pipeline.data.conversation import IGNORE_INDEX
from pipeline.data.loader import Sample


def sample(key: str, image: Image.Image | None, *rounds: tuple[str, str]) -> Sample:
    conversations = []
    for question, answer in rounds:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    if image is not None:
        conversations[0]["value"] = "<image>\n" + conversations[0]["value"]
    return Sample(key=key, image=image, conversations=conversations, meta={})


RED = Image.new("RGB", (40, 80), (255, 0, 0))
BLUE = Image.new("RGB", (90, 30), (0, 0, 255))
MIXED = [
    sample("0000000_a", RED, ("What color is the shape?", "red"), ("Is it tall?", "Yes")),
    sample("0000001_b", None, ("What is two plus two?", "four")),
    sample("0000002_c", BLUE, ("What color is the shape in the top left corner of the picture?", "blue")),
]


@pytest.fixture(scope="module")
def collator(tiny_llava_dir) -> LlavaCollator:
    return LlavaCollator.from_pretrained(tiny_llava_dir, CollatorConfig(model_max_length=512))


def test_pad_to_square_fills_with_the_image_mean(collator):
    fill = collator.fill
    assert fill == tuple(round(mean * 255) for mean in collator.image_processor.image_mean) == (123, 117, 104)
    squared = pad_to_square(RED, fill)
    assert squared.size == (80, 80)
    assert squared.getpixel((0, 0)) == squared.getpixel((79, 79)) == fill  # left and right bands
    assert squared.getpixel((40, 40)) == (255, 0, 0) and squared.getpixel((20, 0)) == (255, 0, 0)
    assert squared.getpixel((19, 40)) == fill and squared.getpixel((60, 40)) == fill
    wide = pad_to_square(BLUE, fill)
    assert wide.size == (90, 90) and wide.getpixel((45, 0)) == fill and wide.getpixel((45, 45)) == (0, 0, 255)
    # After the processor's normalisation the padding is (close to) zero: it carries no signal.
    pixels = collator.pixel_values([RED])
    assert pixels.shape == (1, 3, 140, 140)
    assert pixels[0, :, 70, 0].abs().max() < 0.02 and pixels[0, 0, 70, 70] > 1.0


def test_no_padding_mode_uses_the_processor_resize_and_crop(tiny_llava_dir):
    cropping = LlavaCollator.from_pretrained(tiny_llava_dir, CollatorConfig(image_aspect_ratio="none"))
    pixels = cropping.pixel_values([RED])
    assert pixels.shape == (1, 3, 140, 140) and pixels[0, 0].min() > 1.0  # all red: cropped, not padded


def test_batch_shapes_dtypes_and_right_padding(collator):
    batch = collator(MIXED)
    size, length = batch["input_ids"].shape
    assert size == 3
    for name in ("input_ids", "attention_mask", "labels", "query_positions"):
        assert batch[name].dtype == torch.long
    assert batch["labels"].shape == batch["attention_mask"].shape == (size, length)
    assert batch["pixel_values"].shape == (2, 3, 140, 140) and batch["pixel_values"].dtype == torch.float32
    # Images in batch order: rows 0 and 2.
    assert torch.equal(batch["pixel_values"][0], collator.pixel_values([RED])[0])
    assert torch.equal(batch["pixel_values"][1], collator.pixel_values([BLUE])[0])

    lengths = batch["attention_mask"].sum(1)
    for row in range(size):
        real = int(lengths[row])
        assert batch["attention_mask"][row, :real].all() and not batch["attention_mask"][row, real:].any()
        assert (batch["input_ids"][row, real:] == collator.pad_token_id).all()
        assert (batch["labels"][row, real:] == IGNORE_INDEX).all()
        single = collator.conversation.encode(MIXED[row].conversations, key=MIXED[row].key,
                                              has_image=MIXED[row].image is not None)
        assert batch["input_ids"][row, :real].tolist() == single.input_ids
        assert batch["labels"][row, :real].tolist() == single.labels

    image_id = collator.conversation.image_token_id
    assert batch["num_tokens"] == int(lengths.sum())
    assert batch["num_visual_tokens"] == int((batch["input_ids"] == image_id).sum()) == 200
    assert batch["num_label_tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())
    assert batch["num_unlabelled"] == 0 and batch["num_dropped_rounds"] == 0


def test_query_positions_point_right_before_the_first_answer(collator):
    batch = collator(MIXED)
    for row, query in enumerate(batch["query_positions"].tolist()):
        labels = batch["labels"][row]
        assert (labels[:query + 1] == IGNORE_INDEX).all() and labels[query + 1] != IGNORE_INDEX
        answer = MIXED[row].conversations[1]["value"]
        answer_ids = list(itertools.takewhile(lambda label: label != IGNORE_INDEX, labels[query + 1:].tolist()))
        assert collator.tokenizer.decode(answer_ids).strip() == answer + "</s>"


def test_text_only_batch_has_no_pixel_values(collator):
    batch = collator([MIXED[1], sample("0000009_t", None, ("Say hi", "hi"))])
    assert "pixel_values" not in batch and batch["num_visual_tokens"] == 0


def test_left_padding_config(tiny_llava_dir):
    left = LlavaCollator.from_pretrained(tiny_llava_dir, CollatorConfig(padding_side="left"))
    batch = left(MIXED)
    assert batch["attention_mask"][:, -1].all()
    for row, query in enumerate(batch["query_positions"].tolist()):
        assert batch["labels"][row, query] == IGNORE_INDEX and batch["labels"][row, query + 1] != IGNORE_INDEX


def test_prompts_are_left_padded_first_turns(collator):
    batch = collator.prompts(MIXED)
    size, length = batch["input_ids"].shape
    assert "labels" not in batch and batch["attention_mask"][:, -1].all()
    assert batch["query_positions"].tolist() == [length - 1] * size
    assert batch["answers"] == ["red", "four", "blue"] and batch["keys"] == [s.key for s in MIXED]
    assert batch["pixel_values"].shape[0] == 2
    training = collator(MIXED)
    for row in range(size):
        real = int(batch["attention_mask"][row].sum())
        query = int(training["query_positions"][row])
        assert batch["input_ids"][row, length - real:].tolist() == training["input_ids"][row, :query + 1].tolist()
        assert collator.tokenizer.decode(batch["input_ids"][row, -1:]).endswith("ASSISTANT:")  # the generation prompt


def test_visual_token_count_from_processor_and_from_model_config(tiny_llava_dir):
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    config = AutoConfig.from_pretrained(tiny_llava_dir)
    assert visual_token_count(processor) == 100
    processor.patch_size = None
    assert visual_token_count(processor, config) == 100
    with pytest.raises(ValueError, match="no patch_size"):
        visual_token_count(processor)


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        CollatorConfig(image_aspect_ratio="square")
    with pytest.raises(ValueError, match="padding_side"):
        CollatorConfig(padding_side="middle")


def test_the_model_trains_on_a_batch(collator, tiny_llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    batch = collator(MIXED)
    output = model(**{name: batch[name] for name in MODEL_INPUTS if name in batch and name != "query_positions"})
    # The loss is the mean next-token cross-entropy over the answer tokens, and only those:
    # each answer (with its </s>) predicted from the position before it.
    total, count = 0.0, 0
    for row, example in enumerate(MIXED):
        labels = batch["labels"][row]
        answer_positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        answers = [turn["value"] for turn in example.conversations[1::2]]
        assert collator.tokenizer.decode(labels[answer_positions]) == "".join(f" {answer}</s>" for answer in answers)
        log_probs = output.logits[row].double().log_softmax(-1)
        total -= sum(log_probs[position - 1, labels[position]] for position in answer_positions)
        count += len(answer_positions)
    torch.testing.assert_close(output.loss.double(), total / count, rtol=1e-5, atol=0)
    output.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
