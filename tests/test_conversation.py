"""Conversation templates and labels on the tiny LLaVA's real tokenizer and processor."""

from __future__ import annotations

import pytest
from PIL import Image

from pipeline.data.collator import CollatorConfig, LlavaCollator
from pipeline.data.conversation import (
    IGNORE_INDEX,
    VICUNA_V1_SYSTEM,
    ConversationTokenizer,
    conversation_rounds,
    render_vicuna_v1,
    resolve_template,
)

# llava-hf/llava-1.5-7b-hf's chat template: answers end in a space, not </s>.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SINGLE = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]
MULTI = [
    {"from": "human", "value": "How many stars are there?\n<image>"},
    {"from": "gpt", "value": "three"},
    {"from": "human", "value": "Is there a square in the image?"},
    {"from": "gpt", "value": "Yes, in the top left corner."},
]
TEXT_ONLY = [
    {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "four"},
    {"from": "human", "value": "And three plus five?"}, {"from": "gpt", "value": "eight"},
]
CASES = {"single": (SINGLE, True), "multi": (MULTI, True), "text_only": (TEXT_ONLY, False)}


@pytest.fixture(scope="module", params=["chat_template", "vicuna_v1"])
def collator(request, tiny_llava_dir) -> LlavaCollator:
    return LlavaCollator.from_pretrained(tiny_llava_dir, CollatorConfig(template=request.param, model_max_length=512))


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of labelled token ids."""
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_labels_are_exactly_the_answers_and_eos(collator, case):
    conversations, has_image = CASES[case]
    tokenizer = collator.tokenizer
    encoded = collator.conversation.encode(conversations, key=case, has_image=has_image)
    answers = [turn["value"] for turn in conversations[1::2]]

    runs = labelled_runs(encoded.labels)
    assert [tokenizer.decode(run).strip() for run in runs] == [answer + "</s>" for answer in answers]
    for index, label in enumerate(encoded.labels):
        assert label in (IGNORE_INDEX, encoded.input_ids[index])
    # Each answer follows "ASSISTANT:" and the next round starts right after its </s>.
    starts = [i for i, label in enumerate(encoded.labels)
              if label != IGNORE_INDEX and (i == 0 or encoded.labels[i - 1] == IGNORE_INDEX)]
    for start in starts:
        assert tokenizer.decode(encoded.input_ids[:start]).endswith("ASSISTANT:")
    unlabelled_text = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX])
    assert not any(answer in unlabelled_text for answer in answers)

    image_tokens = encoded.input_ids.count(collator.conversation.image_token_id)
    assert image_tokens == encoded.num_visual_tokens == (100 if has_image else 0)
    assert encoded.query_position == starts[0] - 1
    assert encoded.dropped_rounds == 0 and not encoded.unlabelled


def test_visual_token_count_matches_the_processor_expansion(collator, processor):
    expanded = processor(text="USER: <image>\nhi ASSISTANT:", images=Image.new("RGB", (50, 80)), return_tensors="pt")
    assert collator.num_visual_tokens == int((expanded["input_ids"] == processor.image_token_id).sum()) == 100


def test_image_marker_at_end_moves_to_start(collator):
    at_start = [{"from": "human", "value": "<image>\nHow many stars are there?"}, MULTI[1]]
    at_end = [{"from": "human", "value": "How many stars are there?\n<image>"}, MULTI[1]]
    encode = collator.conversation.encode
    assert encode(at_start, key="s", has_image=True).input_ids == encode(at_end, key="e", has_image=True).input_ids
    ids = encode(at_end, key="e", has_image=True).input_ids
    image_id = collator.conversation.image_token_id
    first, last = ids.index(image_id), len(ids) - 1 - ids[::-1].index(image_id)
    assert last - first + 1 == 100
    assert collator.tokenizer.decode(ids[:first]).endswith("USER: ")
    assert collator.tokenizer.decode(ids[last + 1:]).startswith("\nHow many stars")


def test_image_sample_without_marker_gets_one(collator):
    plain = [{"from": "human", "value": "What color is the circle?"}, SINGLE[1]]
    encode = collator.conversation.encode
    assert encode(plain, key="p", has_image=True).input_ids == encode(SINGLE, key="s", has_image=True).input_ids


@pytest.mark.parametrize("conversations, has_image, message", [
    ([{"from": "human", "value": "What <image> is this?"}, SINGLE[1]], True, "stray <image>"),
    ([SINGLE[0], SINGLE[1], {"from": "human", "value": "<image>\nAgain?"}, SINGLE[1]], True, "stray <image>"),
    ([{"from": "human", "value": "<image>\n<image>\nTwo?"}, SINGLE[1]], True, "stray <image>"),
    (SINGLE, False, "text-only"),
    ([SINGLE[0], {"from": "gpt", "value": "<image>"}], True, "gpt turn"),
    ([SINGLE[1], SINGLE[0]], True, "expected 'human', 'gpt'"),
    ([SINGLE[0]], True, "pairs"),
    ([], True, "empty"),
])
def test_malformed_conversations_name_the_sample(conversations, has_image, message):
    with pytest.raises(ValueError, match=message) as error:
        conversation_rounds(conversations, key="0000042_bad", has_image=has_image)
    assert "0000042_bad" in str(error.value)


def test_vicuna_v1_text_is_llavas():
    rendered = render_vicuna_v1(conversation_rounds(MULTI, key="m", has_image=True), has_image=True)
    assert rendered.text == (VICUNA_V1_SYSTEM + " USER: <image>\nHow many stars are there? ASSISTANT: three</s>"
                             "USER: Is there a square in the image? ASSISTANT: Yes, in the top left corner.</s>")
    assert [rendered.text[start:end] for start, end in rendered.answer_spans] == [
        " three</s>", " Yes, in the top left corner.</s>"]
    prompt = render_vicuna_v1(conversation_rounds(MULTI, key="m", has_image=True), has_image=True,
                              generation_prompt=True)
    assert prompt.text == VICUNA_V1_SYSTEM + " USER: <image>\nHow many stars are there? ASSISTANT:"


def test_chat_template_text_is_the_checkpoints(processor):
    collator = LlavaCollator(processor, CollatorConfig(template="chat_template"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    expected = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    ids = collator.conversation.encode(SINGLE, key="s", has_image=True).input_ids
    image_id = collator.conversation.image_token_id
    collapsed = [t for i, t in enumerate(ids) if t != image_id or ids[i - 1] != image_id]
    assert collator.tokenizer.decode(collapsed) == "<s>" + expected


def test_template_without_eos_still_labels_eos(processor):
    conversation = ConversationTokenizer(processor.tokenizer, template="chat_template", chat_template=LLAVA_HF_TEMPLATE,
                                         image_token_id=processor.image_token_id, num_visual_tokens=100,
                                         model_max_length=512)
    encoded = conversation.encode(MULTI, key="m", has_image=True)
    runs = labelled_runs(encoded.labels)
    assert [processor.tokenizer.decode(run).strip() for run in runs] == ["three</s>", "Yes, in the top left corner.</s>"]
    text = processor.tokenizer.decode(encoded.input_ids)
    assert "ASSISTANT: three</s>USER: Is there a square in the image? ASSISTANT:" in text


def test_auto_template_follows_the_checkpoint(processor):
    assert resolve_template("auto", processor.chat_template) == "chat_template"
    assert resolve_template("auto", None) == "vicuna_v1"
    assert resolve_template("vicuna_v1", processor.chat_template) == "vicuna_v1"
    assert LlavaCollator(processor, CollatorConfig()).template == "chat_template"
    with pytest.raises(ValueError, match="no chat template"):
        resolve_template("chat_template", None)
    with pytest.raises(ValueError, match="unknown conversation template"):
        resolve_template("vicuna_v2", None)


def test_prompt_is_the_training_prefix(collator):
    for key, (conversations, has_image) in CASES.items():
        encoded = collator.conversation.encode(conversations, key=key, has_image=has_image)
        prompt = collator.conversation.encode_prompt(conversations, key=key, has_image=has_image)
        assert prompt.input_ids == encoded.input_ids[:encoded.query_position + 1]
        assert prompt.query_position == len(prompt.input_ids) - 1
        assert set(prompt.labels) == {IGNORE_INDEX}


def test_truncation_drops_later_rounds_and_keeps_visual_tokens(tiny_llava_dir):
    long_second = [MULTI[0], MULTI[1], MULTI[2], {"from": "gpt", "value": "many words " * 40}]
    full = LlavaCollator.from_pretrained(tiny_llava_dir, CollatorConfig(template="vicuna_v1", model_max_length=2048))
    full_length = len(full.conversation.encode(long_second, key="l", has_image=True).input_ids)
    first_round = full.conversation.encode(MULTI[:2], key="f", has_image=True)

    limit = len(first_round.input_ids) + 5
    assert limit < full_length
    short = LlavaCollator.from_pretrained(tiny_llava_dir, CollatorConfig(template="vicuna_v1", model_max_length=limit))
    encoded = short.conversation.encode(long_second, key="l", has_image=True)
    assert encoded.input_ids == first_round.input_ids and encoded.labels == first_round.labels
    assert encoded.dropped_rounds == 1 and not encoded.unlabelled
    assert encoded.input_ids.count(short.conversation.image_token_id) == 100

    # The first round alone does not fit: kept, cut, no labels, every visual token intact.
    limit = first_round.query_position - 3
    tight = LlavaCollator.from_pretrained(tiny_llava_dir, CollatorConfig(template="vicuna_v1", model_max_length=limit))
    encoded = tight.conversation.encode(long_second, key="l", has_image=True)
    assert encoded.unlabelled and encoded.dropped_rounds == 2
    assert len(encoded.input_ids) == limit and set(encoded.labels) == {IGNORE_INDEX}
    assert encoded.input_ids.count(tight.conversation.image_token_id) == 100
    assert encoded.input_ids == first_round.input_ids[:limit]


def test_max_length_that_cannot_hold_the_visual_tokens_is_rejected(tiny_llava_dir):
    with pytest.raises(ValueError, match="cannot hold the prompt head"):
        LlavaCollator.from_pretrained(tiny_llava_dir, CollatorConfig(template="vicuna_v1", model_max_length=120))


def test_a_tokenizer_merging_prompt_and_answer_fails_loudly():
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    # No pre-tokenizer: BPE learns merges across the "ASSISTANT: yes" boundary.
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.train_from_iterator(["USER: <image>\nok? ASSISTANT: yes</s>"] * 50, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<image>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    conversation = ConversationTokenizer(tokenizer, template="vicuna_v1", chat_template=None,
                                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                         num_visual_tokens=4, model_max_length=512)
    with pytest.raises(ValueError, match="0000007_merge.*merges prompt and answer"):
        conversation.encode([{"from": "human", "value": "ok?"}, {"from": "gpt", "value": "yes"}],
                            key="0000007_merge", has_image=False)
