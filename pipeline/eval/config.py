"""The settings of `divico eval`, torch-free: a stage graph can read and write them without
loading the model stack.

    divico eval [--config FILE ...] model=DIR data=DIR [key=value ...]

Keys are flat (no section prefix); the collator's (template, model_max_length,
image_aspect_ratio) are the training recipe's `data.*` ones, declared once in
pipeline/data/settings.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from pipeline.data.settings import CollatorSettings


class EvalError(RuntimeError):
    """The evaluation failed on a file it read (corrupt weights, unreadable data); the message names it."""


@dataclass
class EvalConfig(CollatorSettings):  # + template, model_max_length, image_aspect_ratio
    # A Hugging Face LLaVA folder; with divico.json (+ divico.safetensors) beside it, a DiViCo model.
    model: Path = MISSING
    data: Path = MISSING  # a shard directory (`divico prep shard`) or a LLaVA-format JSON list
    image_root: Path | None = None  # the images of a JSON `data`
    max_samples: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 8
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    # Override the saved DiViCo settings, or wrap a plain model (fastv, random and select_only
    # need no trained weights); mode=none evaluates without compression.
    mode: str | None = None
    tau: float | None = None
    scorer: str = "exact_match"  # a name in pipeline.eval.score.SCORERS
