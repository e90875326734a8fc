"""LLaVA-1.5 conversations -> token ids and labels.

Two templates:
- "vicuna_v1": LLaVA's conv_vicuna_v1 (liuhaotian-style weights): the system prompt, then
  "USER: <image>\\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>" (sep " ", sep2 "</s>").
- "chat_template": the checkpoint's own chat template (llava-hf), with the content-list
  message format. An answer the template does not close with the end-of-sequence token gets
  one appended, so every answer teaches the model to stop.
"auto" picks "chat_template" when the checkpoint has one, else "vicuna_v1".

Labels: only the assistant answers and their end-of-sequence token carry labels; everything
else is IGNORE_INDEX. The whole conversation is tokenized in one call and each token is
labelled by its character offsets, so the ids are exactly those of the full text (no
boundary artefacts from tokenizing pieces separately); every labelled span is decoded back
and checked against its answer, so a tokenizer that merges prompt and answer characters
fails loudly instead of training on shifted labels.

The <image> marker is moved to the start of the first human turn and expanded to the model's
visual token count. Truncation to model_max_length drops whole trailing rounds; visual
tokens are never cut. A sample whose first round alone does not fit is kept, cut at
model_max_length, with no labels (`Tokenized.unlabelled`): it costs one row of compute but
keeps batch shapes and the rank-synchronous step count intact, and the caller logs and
counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.contract import IGNORE_INDEX, IMAGE_TOKEN

TEMPLATES = ("vicuna_v1", "chat_template")

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VICUNA_V1_ROLES = ("USER", "ASSISTANT")
VICUNA_V1_SEP = " "
VICUNA_V1_SEP2 = "</s>"

HUMAN, GPT = "human", "gpt"


def resolve_template(requested: str, chat_template: str | None) -> str:
    """The template to use: `requested`, or for "auto" the checkpoint's chat template when it has one."""
    if requested == "auto":
        return "chat_template" if chat_template else "vicuna_v1"
    if requested not in TEMPLATES:
        raise ValueError(f"unknown conversation template {requested!r}; choose auto, {', '.join(TEMPLATES)}")
    if requested == "chat_template" and not chat_template:
        raise ValueError("template 'chat_template' requested but the checkpoint's tokenizer/processor has no chat template")
    return requested


def conversation_rounds(conversations: list[dict[str, Any]], *, key: str, has_image: bool) -> list[tuple[str, str]]:
    """(question, answer) rounds from LLaVA-format turns, with the <image> marker removed.

    The marker may sit at the start or the end of the first human turn (LLaVA data has both);
    the templates put it back at the start. An image sample without a marker gets one there
    too. A marker anywhere else, more than one, or one in a text-only sample is an error.
    """
    if not conversations:
        raise ValueError(f"sample {key}: empty conversations")
    if len(conversations) % 2:
        raise ValueError(f"sample {key}: {len(conversations)} turns; expected human/gpt pairs")
    rounds = []
    for index in range(0, len(conversations), 2):
        human, gpt = conversations[index], conversations[index + 1]
        if human.get("from") != HUMAN or gpt.get("from") != GPT:
            raise ValueError(f"sample {key}: turns {index} and {index + 1} are from "
                             f"{human.get('from')!r}, {gpt.get('from')!r}; expected 'human', 'gpt'")
        question, answer = human.get("value"), gpt.get("value")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ValueError(f"sample {key}: turn values must be strings (turns {index}, {index + 1})")
        if IMAGE_TOKEN in answer:
            raise ValueError(f"sample {key}: {IMAGE_TOKEN} marker in gpt turn {index + 1}")
        if index == 0 and has_image:
            question = _strip_leading_or_trailing_marker(question)
        if IMAGE_TOKEN in question:
            where = "a text-only sample" if not has_image else f"human turn {index}"
            raise ValueError(f"sample {key}: stray {IMAGE_TOKEN} marker in {where}; only one, at the start "
                             "or end of the first human turn of an image sample, is allowed")
        rounds.append((question, answer))
    return rounds


def _strip_leading_or_trailing_marker(question: str) -> str:
    text = question.strip()
    if text.startswith(IMAGE_TOKEN):
        text = text[len(IMAGE_TOKEN):]
    elif text.endswith(IMAGE_TOKEN):
        text = text[:-len(IMAGE_TOKEN)]
    return text.strip()


@dataclass
class Rendered:
    """Template output: the text and the character span of each answer (with its end token)."""

    text: str
    answer_spans: list[tuple[int, int]]


def render_vicuna_v1(rounds: list[tuple[str, str]], *, has_image: bool, generation_prompt: bool = False) -> Rendered:
    """LLaVA's conv_vicuna_v1.get_prompt(); with `generation_prompt`, the first question only,
    ending in "ASSISTANT:" as LLaVA prompts for an answer."""
    user, assistant = VICUNA_V1_ROLES
    text = VICUNA_V1_SYSTEM + VICUNA_V1_SEP
    spans = []
    for index, (question, answer) in enumerate(rounds):
        if index == 0 and has_image:
            question = f"{IMAGE_TOKEN}\n{question}"
        text += f"{user}: {question}{VICUNA_V1_SEP}{assistant}:"
        if generation_prompt:
            break
        start = len(text)
        text += f" {answer}{VICUNA_V1_SEP2}"
        spans.append((start, len(text)))
    return Rendered(text, spans)


def render_chat_template(rounds: list[tuple[str, str]], *, has_image: bool, tokenizer: Any, chat_template: str,
                         generation_prompt: bool = False) -> Rendered:
    """The checkpoint's chat template, rendered round by round to find where each answer lies:
    the answer is what the full render adds after the render with the generation prompt."""
    eos = tokenizer.eos_token

    def render(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    messages: list[dict[str, Any]] = []
    text, rendered_so_far, spans = "", "", []
    for index, (question, answer) in enumerate(rounds):
        content = [{"type": "image"}] if index == 0 and has_image else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": question}]})
        prompt = render(messages, add_generation_prompt=True)
        if not prompt.startswith(rendered_so_far):
            raise ValueError("the chat template renders earlier rounds differently once a round is added; "
                             "labels cannot be placed (use --template vicuna_v1)")
        text += prompt[len(rendered_so_far):]
        if generation_prompt:
            break
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        rendered_so_far = render(messages, add_generation_prompt=False)
        if not rendered_so_far.startswith(prompt):
            raise ValueError("the chat template's generation prompt is not a prefix of the rendered answer turn; "
                             "labels cannot be placed (use --template vicuna_v1)")
        answer_text = rendered_so_far[len(prompt):]
        if eos not in answer_text:
            answer_text = answer_text.rstrip() + eos
        spans.append((len(text), len(text) + len(answer_text)))
        text += answer_text
    return Rendered(text, spans)


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    query_position: int  # last token before the first answer (the prompt's last token for prompts)
    num_visual_tokens: int  # 0 for text-only samples
    dropped_rounds: int  # trailing rounds removed to fit model_max_length
    unlabelled: bool  # the first round did not fit: cut at model_max_length, no labels


class ConversationTokenizer:
    """Conversations -> Tokenized, for one checkpoint's tokenizer, template and visual token count."""

    def __init__(self, tokenizer: Any, *, template: str, chat_template: str | None, image_token_id: int,
                 num_visual_tokens: int, model_max_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: labels are placed by character "
                             "offsets, which only fast (tokenizers-backed) tokenizers report")
        self.tokenizer = tokenizer
        self.template = resolve_template(template, chat_template)
        self.chat_template = chat_template
        self.image_token_id = image_token_id
        self.num_visual_tokens = num_visual_tokens
        self.model_max_length = model_max_length
        # The fixed text before the visual tokens must leave room for them and an answer.
        head = len(self._token_ids(self._render([("", "")], has_image=True, generation_prompt=True).text))
        if head + num_visual_tokens >= model_max_length:
            raise ValueError(f"model_max_length={model_max_length} cannot hold the prompt head ({head} tokens) "
                             f"plus {num_visual_tokens} visual tokens and an answer")

    def _render(self, rounds: list[tuple[str, str]], *, has_image: bool, generation_prompt: bool) -> Rendered:
        if self.template == "vicuna_v1":
            return render_vicuna_v1(rounds, has_image=has_image, generation_prompt=generation_prompt)
        return render_chat_template(rounds, has_image=has_image, tokenizer=self.tokenizer,
                                    chat_template=self.chat_template, generation_prompt=generation_prompt)

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # The templates render no BOS; the tokenizer adds it when the model expects one.
        add_special = not (self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token))
        encoding = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        return list(encoding["input_ids"]), [tuple(offset) for offset in encoding["offset_mapping"]]

    def _token_ids(self, text: str) -> list[int]:
        return self._encode(text)[0]

    def _image_position(self, ids: list[int], has_image: bool, key: str) -> int | None:
        positions = [index for index, token in enumerate(ids) if token == self.image_token_id]
        if len(positions) != int(has_image):
            raise ValueError(f"sample {key}: the rendered text holds {len(positions)} image tokens, "
                             f"expected {int(has_image)}")
        return positions[0] if has_image else None

    def _expand(self, values: list[int], at: int | None, fill: int) -> list[int]:
        """`values` with the entry at the image token replaced by one `fill` per visual token."""
        if at is None:
            return values
        return values[:at] + [fill] * self.num_visual_tokens + values[at + 1:]

    def encode(self, conversations: list[dict[str, Any]], *, key: str, has_image: bool) -> Tokenized:
        """Training ids and labels for one sample."""
        rounds = conversation_rounds(conversations, key=key, has_image=has_image)
        rendered = self._render(rounds, has_image=has_image, generation_prompt=False)
        ids, offsets = self._encode(rendered.text)
        labels = [IGNORE_INDEX] * len(ids)
        answer_starts, round_ends = [], []  # token index of each answer's first token / just past its end
        for start, end in rendered.answer_spans:
            positions = [index for index, (token_start, token_end) in enumerate(offsets)
                         if token_start < end and token_end > start]
            decoded = self.tokenizer.decode([ids[index] for index in positions], clean_up_tokenization_spaces=False)
            # Whitespace may decode differently (SentencePiece's leading space); characters may not.
            if not positions or decoded.split() != rendered.text[start:end].split():
                raise ValueError(f"sample {key}: the labelled tokens decode to {decoded!r}, not the answer "
                                 f"{rendered.text[start:end]!r}; the tokenizer merges prompt and answer text")
            for index in positions:
                labels[index] = ids[index]
            answer_starts.append(positions[0])
            round_ends.append(positions[-1] + 1)

        image_at = self._image_position(ids, has_image, key)
        ids = self._expand(ids, image_at, self.image_token_id)
        labels = self._expand(labels, image_at, IGNORE_INDEX)
        num_visual = self.num_visual_tokens if has_image else 0
        # The image sits in the first question, so every answer moves by the same amount.
        shift = num_visual - 1 if has_image else 0
        first_answer = answer_starts[0] + shift
        round_ends = [end + shift for end in round_ends]

        fitting = [end for end in round_ends if end <= self.model_max_length]
        if fitting:
            cut = fitting[-1]
            return Tokenized(ids[:cut], labels[:cut], first_answer - 1, num_visual,
                             dropped_rounds=len(round_ends) - len(fitting), unlabelled=False)
        cut = self.model_max_length
        if has_image and image_at + num_visual > cut:
            raise ValueError(f"sample {key}: its visual tokens end at {image_at + num_visual}, past "
                             f"model_max_length={cut}")
        return Tokenized(ids[:cut], [IGNORE_INDEX] * cut, min(first_answer, cut) - 1, num_visual,
                         dropped_rounds=len(round_ends), unlabelled=True)

    def encode_prompt(self, conversations: list[dict[str, Any]], *, key: str, has_image: bool) -> Tokenized:
        """Generation prompt from the first human turn (no answer, no labels)."""
        rounds = conversation_rounds(conversations, key=key, has_image=has_image)
        rendered = self._render(rounds[:1], has_image=has_image, generation_prompt=True)
        ids = self._token_ids(rendered.text)
        ids = self._expand(ids, self._image_position(ids, has_image, key), self.image_token_id)
        num_visual = self.num_visual_tokens if has_image else 0
        if len(ids) > self.model_max_length:
            raise ValueError(f"sample {key}: prompt of {len(ids)} tokens exceeds model_max_length={self.model_max_length}")
        return Tokenized(ids, [IGNORE_INDEX] * len(ids), len(ids) - 1, num_visual, dropped_rounds=0, unlabelled=False)
