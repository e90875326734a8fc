"""The settings of `divico eval`, torch-free: a stage graph can read and write them without
loading the model stack.

    divico eval [--config FILE ...] model=DIR data=DIR [key=value ...]

Keys are flat (no section prefix); the collator's (template, model_max_length,
image_aspect_ratio) are the training recipe's `data.*` ones, declared once in
pipeline/data/settings.py. The exceptions: `tags.NAME=VALUE` adds one tag, and the compression
keys are spelled as in a training recipe, `divico.mode=`, `divico.tau=`, `divico.layer=`,
`divico.seed=` (the older `mode=`, `tau=`, `layer=`, `seed=` still work, with a message).

What a benchmark cell varies besides the model: `image_noise` (the robustness condition of
the paper's Table II: Gaussian noise of that standard deviation added to every encoded image,
the same noise for an image whatever the method, drawn from `noise_seed` and the image),
`divico.seed` (random mode's draw of kept tokens) and `tags` (labels copied into the summary, e.g.
tags.method=divico tags.condition=noise, so a cell's JSON says which cell it is).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from pipeline.data.settings import CollatorSettings
from pipeline.model.settings import MustDropSettings


log = logging.getLogger(__name__)

HELDOUT = "heldout"  # the task of `divico eval` without a benchmark: answer accuracy on held-out samples
HELDOUT_MAX_NEW_TOKENS = 8  # the held-out answers are a word or two


class EvalError(RuntimeError):
    """The evaluation failed on a file it read (corrupt weights, unreadable data); the message names it."""


@dataclass
class CompressionOverrides:
    """`divico.*`: override the saved DiViCo settings, or wrap a plain model (fastv, random and
    select_only need no trained weights); divico.mode=none evaluates without compression."""

    mode: str | None = None
    tau: float | None = None
    layer: int | None = None  # K: the saved setting, or DiViCo's default
    seed: int | None = None  # random mode's per-image draw of kept tokens
    mustdrop: MustDropSettings | None = None  # MustDrop's filter layers and thresholds (divico.mustdrop.gamma=...)

    def given(self) -> dict[str, str | float | int]:
        return {name: value for name, value in vars(self).items() if value is not None}


def canonical_overrides(overrides: list[str]) -> list[str]:
    """`tau=T` as `divico.tau=T` (and mode, layer, seed): eval spelled them flat before it
    spelled them as training does."""
    canonical = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key in vars(CompressionOverrides()):
            log.warning("%s= is deprecated: write divico.%s=%s, as in a training recipe", key, key, value)
            override = f"divico.{override}"
        canonical.append(override)
    return canonical


@dataclass
class EvalConfig(CollatorSettings):  # + template, model_max_length, image_aspect_ratio
    # A Hugging Face LLaVA folder; with divico.json (+ divico.safetensors) beside it, a DiViCo model.
    model: Path = MISSING
    data: Path = MISSING  # a shard directory (`divico prep shard`) or a LLaVA-format JSON list
    image_root: Path | None = None  # the images of a JSON `data`
    max_samples: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: 8 on a held-out set; on a benchmark LLaVA's limit (128, MMBench 1024)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    # Fast generation: a static KV cache, the layers after the cut and each decode step replayed
    # from CUDA graphs on a GPU (CompressedLlava.generate(fast=True)); the same greedy answers.
    fast: bool = False
    divico: CompressionOverrides = field(default_factory=CompressionOverrides)
    scorer: str = "exact_match"  # a name in pipeline.eval.score.SCORERS
    # Standard deviation of the Gaussian noise added to each image's projector output; 0 = none.
    image_noise: float = 0.0
    noise_seed: int = 0  # with the image's pixels, seeds its noise (so every method sees the same noise)
    # Copied verbatim into the summary (nothing else reads them). Values given as key=value are
    # parsed as YAML first: quote one that must keep its spelling, e.g. tags.run="'007'".
    tags: dict[str, str] = field(default_factory=dict)
    # A TensorBoard run folder: the figures as eval/<task>/<figure> with an hparams entry (task,
    # method, mode, tau, kept), so the evaluations of a sweep compare in one hparams view.
    tensorboard: Path | None = None
