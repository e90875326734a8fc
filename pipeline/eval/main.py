"""`divico eval`: answer accuracy on a held-out set.

    divico eval [--config FILE ...] model=DIR data=DIR [key=value ...] [--out FILE.json]
                [--predictions FILE.jsonl] [--json]

For each sample the first human turn becomes a left-padded generation prompt (the training
template, so the model sees what it was trained on); greedy decoding of a few tokens; the
answer is scored (normalised exact match by default) against the first gpt answer. Reported
overall and per question type, each beside a chance level (what always giving the type's
most common answer scores on this set), with throughput and the visual tokens the model
keeps per image.

Models: a plain LlavaForConditionalGeneration folder, or one with DiViCo settings
(divico.json, + divico.safetensors) beside it, which is evaluated through CompressedLlava;
mode=/tau= override the saved settings or wrap a plain model. In code,
`evaluate(model, collator, samples)` takes an in-memory model of either kind.

Reading: data.py; generation: generate.py; scoring: score.py; the keys: config.py.
Exit status: 2 for a bad key or value, 1 for a file that fails to load or read; each is one
logged line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from pipeline.config import ConfigError, load_config
from pipeline.contract import DIVICO_SETTINGS_FILE, DIVICO_WEIGHTS_FILE, EXIT_BAD_INPUT, EXIT_FAILURE
from pipeline.data.collator import CollatorConfig, LlavaCollator
from pipeline.data.loader import Sample
from pipeline.device import default_dtype, resolve_device
from pipeline.durable import write_text_atomically
from pipeline.eval.config import EvalConfig, EvalError
from pipeline.eval.data import check_data, read_samples
from pipeline.eval.generate import generate_answers
from pipeline.eval.score import SCORERS, Scorer, exact_match, score
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.divico import kept_count
from pipeline.model.settings import DiViCoConfig

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    samples: int
    accuracy: float
    chance: float  # always answering each question type's most common answer
    by_type: dict[str, dict[str, Any]]  # type -> samples, accuracy, chance, majority_answer
    tokens_per_s: float  # prompt (with visual) + generated tokens over generation time
    samples_per_s: float
    generated_tokens: int
    visual_tokens: int  # per image, entering the language model
    visual_tokens_kept: int  # per image, after compression (== visual_tokens without it)
    mode: str  # DiViCo mode, "none" for a plain model
    tau: float | None
    predictions: list[dict[str, Any]] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-sample predictions (what --json prints and --out writes)."""
        return {k: v for k, v in asdict(self).items() if k != "predictions"}


def evaluate(model: torch.nn.Module, collator: LlavaCollator, samples: Iterable[Sample], *, batch_size: int = 16,
             max_new_tokens: int = 8, max_samples: int | None = None, scorer: Scorer = exact_match,
             progress: bool = True) -> EvalResult:
    """Greedy answers of `model` (LlavaForConditionalGeneration or CompressedLlava, in memory,
    e.g. mid-training: its train/eval mode is restored) to each sample's first question, scored
    against the first answer."""
    answers = generate_answers(model, collator, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               max_samples=max_samples, progress=progress)
    if not answers.rows:
        raise EvalError("no samples to evaluate")
    scores = score(answers.rows, scorer)
    compresses = isinstance(model, CompressedLlava) and model.config.compresses
    visual = collator.num_visual_tokens
    return EvalResult(
        samples=len(answers.rows), accuracy=scores.accuracy, chance=scores.chance, by_type=scores.by_type,
        tokens_per_s=answers.tokens / answers.seconds, samples_per_s=len(answers.rows) / answers.seconds,
        generated_tokens=answers.generated_tokens, visual_tokens=visual,
        visual_tokens_kept=int(kept_count(visual, model.config.tau)) if compresses else visual,
        mode=model.config.mode if isinstance(model, CompressedLlava) else "none",
        tau=model.config.tau if compresses else None, predictions=answers.rows)


def check_model(path: Path) -> None:
    """ConfigError unless `path` is a Hugging Face model folder."""
    if not (path / "config.json").is_file():
        what = "not found" if not path.exists() else "no config.json in it (not a Hugging Face model folder)"
        raise ConfigError(f"model={path}: {what}")


def load_model(path: str | Path, *, mode: str | None = None, tau: float | None = None,
               device: str = "auto") -> torch.nn.Module:
    """The checkpoint at `path`: through CompressedLlava when DiViCo settings lie beside it or
    `mode` asks for one, else the plain LLaVA model. bf16 on GPU, fp32 on CPU. ConfigError for
    a request the folder cannot serve (checked before the weights load), EvalError for a file
    that does not load."""
    path = Path(path)
    check_model(path)
    overrides = {name: value for name, value in (("mode", mode), ("tau", tau)) if value is not None}
    saved = (path / DIVICO_SETTINGS_FILE).is_file()
    wrap = None if saved or not overrides or overrides.get("mode") == "none" else DiViCoConfig(**overrides)
    if wrap is not None and wrap.uses_gap_encoder:
        raise ConfigError(f"model={path} has no DiViCo weights ({DIVICO_SETTINGS_FILE}); mode {wrap.mode!r} needs "
                          "a trained gap encoder (fastv, random and select_only do not)")
    device = resolve_device(device)
    try:
        llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=default_dtype(device)).to(device)
    except SafetensorError as error:
        raise EvalError(_unreadable_weights(path, error)) from error
    except OSError as error:  # transformers' word for a missing or unreadable model file
        raise EvalError(f"model={path}: {error}") from error
    if saved:
        try:
            return CompressedLlava.from_saved(llava, path, **overrides).to(device)
        except SafetensorError as error:
            raise EvalError(f"{path / DIVICO_WEIGHTS_FILE}: cannot read it ({error})") from error
        except json.JSONDecodeError as error:
            raise EvalError(f"{path / DIVICO_SETTINGS_FILE}: not valid JSON ({error})") from error
        except (FileNotFoundError, ValueError) as error:  # a missing or mismatched file; the message names it
            raise EvalError(str(error)) from error
    return llava if wrap is None else CompressedLlava(llava, wrap).to(device)


def _unreadable_weights(folder: Path, error: SafetensorError) -> str:
    """Name the safetensors file that does not open (transformers' error does not)."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except SafetensorError as file_error:
            return f"{path}: truncated or corrupt ({file_error})"
    return f"model={folder}: cannot read the weights ({error})"


def validate(cfg: EvalConfig) -> None:
    """Raise ConfigError naming the first bad key; reads no weights."""
    for name in ("batch_size", "max_new_tokens", "max_samples"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value}: must be >= 1")
    divico = {name: getattr(cfg, name) for name in ("mode", "tau") if getattr(cfg, name) is not None}
    try:
        cfg.validate()  # the collator settings
        DiViCoConfig(**divico).validate()
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if cfg.scorer not in SCORERS:
        raise ConfigError(f"scorer={cfg.scorer!r}: expected one of {sorted(SCORERS)}")
    try:
        device = torch.device(resolve_device(cfg.device))
    except RuntimeError as error:
        raise ConfigError(f"device={cfg.device!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device}: no GPU is visible")
    check_model(cfg.model)
    check_data(cfg.data)
    if cfg.image_root is not None and not cfg.image_root.is_dir():
        raise ConfigError(f"image_root={cfg.image_root}: not a folder")


def main(cfg: EvalConfig, *, progress: bool = True) -> EvalResult:
    """Validate `cfg`, load its model, evaluate it."""
    validate(cfg)
    model = load_model(cfg.model, mode=cfg.mode, tau=cfg.tau, device=cfg.device)
    try:
        collator = LlavaCollator(AutoProcessor.from_pretrained(cfg.model),
                                 CollatorConfig.from_settings(cfg, padding_side="left"),
                                 AutoConfig.from_pretrained(cfg.model))
    except OSError as error:
        raise EvalError(f"model={cfg.model}: cannot load its processor ({error})") from error
    except ValueError as error:  # e.g. template=chat_template for a checkpoint without one
        raise ConfigError(f"model={cfg.model}: {error}") from error
    log.info("evaluating %s (mode %s, template %s, %d visual tokens per image) on %s", cfg.model,
             model.config.mode if isinstance(model, CompressedLlava) else "none", collator.template,
             collator.num_visual_tokens, cfg.data)
    return evaluate(model, collator, read_samples(cfg.data, cfg.image_root), batch_size=cfg.batch_size,
                    max_new_tokens=cfg.max_new_tokens, max_samples=cfg.max_samples, scorer=SCORERS[cfg.scorer],
                    progress=progress)


def print_result(result: EvalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"answer accuracy (mode {result.mode}"
                        + (f", tau {result.tau:.3f}" if result.tau is not None else "") + ")")
    for column in ("question type", "samples", "accuracy", "chance", "majority answer"):
        table.add_column(column, justify="left" if column in ("question type", "majority answer") else "right")
    for name, row in result.by_type.items():
        table.add_row(name, str(row["samples"]), f"{row['accuracy']:.1%}", f"{row['chance']:.1%}",
                      row["majority_answer"])
    table.add_row("all", str(result.samples), f"{result.accuracy:.1%}", f"{result.chance:.1%}", "", style="bold")
    console = Console()
    console.print(table)
    console.print(f"{result.tokens_per_s:.1f} tokens/s, {result.samples_per_s:.2f} samples/s, "
                  f"visual tokens kept per image: {result.visual_tokens_kept} of {result.visual_tokens}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="answer accuracy of a model on a held-out set",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[],
                        help="YAML file of eval keys; repeat to merge several in order (later ones win)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="eval keys (pipeline/eval/config.py), e.g. model=DIR data=DIR tau=0.111")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here (atomically)")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="also write every answer (key, question, answer, prediction, correct) as JSON lines")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """`divico eval`: the exit status; a bad key or a failed load is one logged line, no traceback."""
    try:
        result = main(load_config(args.config, args.overrides, schema=EvalConfig), progress=not args.json)
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    except EvalError as error:
        log.error("%s", error)
        return EXIT_FAILURE
    if args.predictions:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        args.predictions.write_text("".join(json.dumps(p) + "\n" for p in result.predictions))
    if args.out:
        write_text_atomically(args.out, json.dumps(result.summary(), indent=2) + "\n")
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print_result(result)
    return 0
