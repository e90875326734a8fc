"""Held-out samples for `divico eval`: read from shards or a LLaVA-format JSON list, with the
question each is asked (the first human turn) and its question type."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from pipeline.train.config import ConfigError
from pipeline.contract import IMAGE_TOKEN
from pipeline.data.loader import Sample, ShardDataset
from pipeline.data.shard_format import MANIFEST_FILE
from pipeline.eval.config import EvalError
from pipeline.eval.score import PUNCTUATION

# Question types by leading words, as VQA groups its questions (longest prefix wins).
QUESTION_TYPES = ("what color is", "what shape is", "what word is", "how many letters", "how many",
                  "is there", "are there", "which", "what is", "what", "where", "who", "is", "are", "does", "do")


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


def one_question(image: Image.Image | None, text: str, *, key: str = "question", meta: dict | None = None) -> Sample:
    """A one-turn conversation asking `text`: "<image>\n" + text (LLaVA's order) when there is an
    image and the text has no image marker of its own; the answer turn left empty."""
    if image is not None and IMAGE_TOKEN not in text:
        text = f"{IMAGE_TOKEN}\n{text}"
    return Sample(key=key, image=image, meta=meta or {},
                  conversations=[{"from": "human", "value": text}, {"from": "gpt", "value": ""}])


def check_data(data: Path) -> None:
    """Raise ConfigError unless `data` is a shard directory or a file."""
    if data.is_dir() and not (data / MANIFEST_FILE).is_file():
        raise ConfigError(f"data={data}: a folder without {MANIFEST_FILE}, not a shard directory")
    if not data.exists():
        raise ConfigError(f"data={data}: not found")


def read_samples(data: str | Path, image_root: str | Path | None = None) -> Iterator[Sample]:
    """Samples from a shard directory (read with the training loader, its seeded order) or a
    LLaVA-format JSON list with images under `image_root`."""
    data = Path(data)
    check_data(data)
    if data.is_dir():
        try:
            shards = ShardDataset(data, rank=0, world_size=1, batch_size=1, seed=0)
        except (OSError, ValueError) as error:  # a manifest that does not match its shards; the message says how
            raise EvalError(f"data={data}: {error}") from error
        yield from shards
        return
    try:
        entries = json.loads(data.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvalError(f"{data}: cannot read it as JSON ({error})") from error
    if not isinstance(entries, list) or not entries:
        raise EvalError(f"{data}: expected a non-empty JSON list of LLaVA entries")
    for index, entry in enumerate(entries):
        conversations = entry.get("conversations") or []
        if len(conversations) < 2:
            raise EvalError(f"{data}: entry {index} has no answer (fewer than two turns)")
        image = None
        if entry.get("image"):
            if image_root is None:
                raise ConfigError(f"image_root: not set, but entry {index} of {data} has an image")
            path = Path(image_root) / entry["image"]
            try:
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
            except (OSError, ValueError) as error:
                raise EvalError(f"{data}: entry {index} image {path}: {error}") from error
        meta = {k: v for k, v in entry.items() if k != "conversations"} | {"index": index}
        yield Sample(key=f"{index:07d}_{entry.get('id', '')}", image=image, conversations=conversations, meta=meta)
