"""`divico eval`: answer accuracy on a held-out set; `divico eval --task T`: a benchmark answered
and scored; `divico eval score`: a benchmark's official score of a predictions file.

    divico eval [--config FILE ...] model=DIR data=DIR [key=value ...] [--out FILE.json]
                [--predictions FILE.jsonl] [--json]
    divico eval --task textvqa|pope|mme|mmbench|gqa model=DIR data=FOLDER [key=value ...]
                --predictions FILE.jsonl [--chunk I/N] [--out FILE.json] [--json]
    divico eval score --task textvqa|pope|mme|mmbench|gqa --annotations PATH --predictions FILE [--json]

`--task T` (pipeline/eval/tasks.py) asks the questions of a benchmark folder in LLaVA's
evaluation layout as LLaVA's scripts do, appends the answers to FILE batch by batch (a rerun
resumes; --chunk splits the questions across processes) and scores them.

`score` reads only a predictions file in LLaVA's answers format (JSON lines with question_id and
text, so answers written by LLaVA's own scripts score the same way) and the benchmark's
annotation file or folder in LLaVA's evaluation layout, and prints the official figures
(pipeline/eval/benchmarks/). A missing or malformed file exits 2 naming it.

Held-out: For each sample the first human turn becomes a left-padded generation prompt (the training
template, so the model sees what it was trained on); greedy decoding of a few tokens; the
answer is scored (normalised exact match by default) against the first gpt answer. Reported
overall and per question type, each beside a chance level (what always giving the type's
most common answer scores on this set), with throughput and the visual tokens the model
keeps per image.

Models: a plain LlavaForConditionalGeneration folder, or one with DiViCo settings
(divico.json, + divico.safetensors) beside it, which is evaluated through CompressedLlava;
divico.mode=/divico.tau=/divico.layer= override the saved settings or wrap a plain model,
divico.seed= overrides the saved random-mode seed (a plain model stays plain), divico.mustdrop.*
MustDrop's filter layers and thresholds. In code, `evaluate(model, collator, samples)` takes an
in-memory model of either kind.

image_noise=STD (noise_seed=N): Gaussian noise of standard deviation STD is added to each
encoded image, the output of the LLaVA model's multi_modal_projector, while the answers are
generated (the paper's Table II robustness test). An image's noise depends only on noise_seed
and its pixel values, so every method, batch size and sample order sees the same noise for it.
tags.NAME=VALUE labels are copied into the summary as "tags"; the summary also records
image_noise, noise_seed and divico_seed (the effective DiViCo seed, null for a plain model).

Reading: data.py; generation: generate.py; scoring: score.py; the keys: config.py.
Exit status: 2 for a bad key or value, 1 for a file that fails to load or read; each is one
logged line, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from pipeline.train.config import ConfigError, load_config
from pipeline.contract import DIVICO_SETTINGS_FILE, DIVICO_WEIGHTS_FILE, EXIT_BAD_INPUT, EXIT_FAILURE, tau_label
from pipeline.data.collator import CollatorConfig, LlavaCollator
from pipeline.data.settings import CollatorSettings
from pipeline.data.loader import Sample
from pipeline.device import default_dtype, resolve_device
from pipeline.durable import write_text_atomically
from pipeline.eval.benchmarks import BENCHMARKS, BenchmarkError, benchmark, read_predictions
from pipeline.eval.config import HELDOUT, HELDOUT_MAX_NEW_TOKENS, EvalConfig, EvalError, canonical_overrides
from pipeline.eval.data import check_data, read_samples
from pipeline.eval.generate import generate_answers
from pipeline.eval.predictions import parse_chunk
from pipeline.eval.score import SCORERS, Scorer, exact_match, score
from pipeline.eval.tasks import run_task
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.divico import image_seed
from pipeline.model.settings import DiViCoConfig, MustDropSettings

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
    visual_tokens_kept: int | float  # per image, after compression (== visual_tokens without it); a mean if the mode decides per image
    mode: str  # DiViCo mode, "none" for a plain model
    tau: float | None
    layer: int | None  # K, the layer where compression happens (None without compression)
    divico_seed: int | None  # the DiViCo setting `seed` of a CompressedLlava, None for a plain model
    image_noise: float  # standard deviation of the noise added to the encoded images (0: none)
    noise_seed: int
    fast: bool = False  # answered by fast generation (static cache, CUDA graphs on a GPU)
    tags: dict[str, str] = field(default_factory=dict)  # the caller's labels, copied verbatim
    # A Mixture-of-Experts model's mean router weight per expert over the kept tokens of every
    # prompt, by the expert's centre (tau067: the expert of tau 1/15); None for other models.
    router_weights: dict[str, float] | None = None
    predictions: list[dict[str, Any]] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-sample predictions (what --json prints and --out writes)."""
        return {k: v for k, v in asdict(self).items() if k != "predictions"}


# XORed into an image's noise seed: with noise_seed equal to the DiViCo seed, image_seed alone
# would seed the noise from the very generator random mode draws that image's kept tokens from,
# and the noise on the kept tokens would follow from their scores.
NOISE_STREAM = int.from_bytes(b"imgnoise", "little")


def llava_of(model: torch.nn.Module) -> LlavaForConditionalGeneration:
    """The LlavaForConditionalGeneration inside `model`: itself, CompressedLlava's, or a PEFT
    wrapper's base model; TypeError for anything else."""
    inner = model.llava if isinstance(model, CompressedLlava) else model
    get_base_model = getattr(inner, "get_base_model", None)  # PeftModel
    llava = get_base_model() if get_base_model is not None else inner
    if not isinstance(llava, LlavaForConditionalGeneration):
        raise TypeError(f"model: expected a LlavaForConditionalGeneration or CompressedLlava (optionally "
                        f"PEFT-wrapped), got {type(llava).__name__}")
    return llava


def check_image_noise(image_noise: float) -> None:
    """ConfigError unless `image_noise` is a usable standard deviation."""
    if not (math.isfinite(image_noise) and image_noise >= 0):
        raise ConfigError(f"image_noise={image_noise}: must be a finite number >= 0 (a standard deviation)")


def image_noise_for(pixels: torch.Tensor, std: float, noise_seed: int, shape: torch.Size) -> torch.Tensor:
    """The float32 CPU noise N(0, std^2) of `shape` for one image, drawn from a generator seeded
    with `noise_seed` and the image's pixel values (image_seed, the project's per-image rule):
    the same for that image in any batch, at any position, under every method."""
    generator = torch.Generator().manual_seed(image_seed(noise_seed, pixels) ^ NOISE_STREAM)
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


@contextlib.contextmanager
def noisy_images(model: torch.nn.Module, std: float, noise_seed: int = 0) -> Iterator[None]:
    """While inside, every image `model` encodes gets `image_noise_for` noise added to its
    multi_modal_projector output (so plain LLaVA and CompressedLlava, which both call the LLaVA
    model's get_image_features, see it alike). The seed comes from the vision tower's input,
    recorded on the way in: the projector's input may differ in its last bits with the batch
    around an image (batched kernels), its pixel values do not. The noise hook runs before any
    other hook on the projector, so those see the noisy features. std=0 installs nothing. The
    hooks are removed on leaving, also on error."""
    check_image_noise(std)
    if std == 0:
        yield
        return
    llava = llava_of(model).model
    pending: list[torch.Tensor] = []  # the pixel values of the vision tower call now under way

    def record_pixels(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        pending[:] = [kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]]

    def add_noise(module: torch.nn.Module, args: tuple, features: torch.Tensor) -> torch.Tensor:
        if not pending:
            raise RuntimeError("image noise: the projector ran without the vision tower (no pixel values to seed from)")
        pixels = pending.pop()
        if pixels.shape[0] != features.shape[0]:
            raise RuntimeError(f"image noise: {pixels.shape[0]} images entered the vision tower but the projector "
                               f"gave features for {features.shape[0]}")
        noise = torch.stack([image_noise_for(image, std, noise_seed, features.shape[1:]) for image in pixels])
        return features + noise.to(features.device, features.dtype)

    handles = [llava.vision_tower.register_forward_pre_hook(record_pixels, with_kwargs=True),
               llava.multi_modal_projector.register_forward_hook(add_noise, prepend=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class RouterWeights:
    """While inside, the mean router weights of `model`'s gap encoder over every kept token it
    encodes, by expert (`mean`: None when the encoder has no router or nothing was encoded)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.encoder = model.divico.gap_encoder if isinstance(model, CompressedLlava) else None
        self.experts = [tau_label(c) for c in model.config.moe.centres] if self.encoder is not None else []
        self.total: torch.Tensor | None = None
        self.tokens = 0

    def _record(self, module: torch.nn.Module, args: tuple, estimate) -> None:
        if estimate.router_weights is not None:
            weights = estimate.router_weights.detach().float().sum(0).cpu()
            self.total = weights if self.total is None else self.total + weights
            self.tokens += estimate.router_weights.shape[0]

    def __enter__(self) -> "RouterWeights":
        self.handle = self.encoder.register_forward_hook(self._record) if self.encoder is not None else None
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()

    @property
    def mean(self) -> dict[str, float] | None:
        if self.total is None:
            return None
        return dict(zip(self.experts, (self.total / self.tokens).tolist(), strict=True))


def kept_per_image(model: CompressedLlava, visual: int, measured: list[float]) -> int | float | None:
    """The mode's own count of kept visual tokens per image or, for a mode that decides per image,
    the mean `measured` (None when no sample had an image)."""
    count = model.config.kept_tokens(visual)
    if count is not None:
        return count
    return round(sum(measured) / len(measured), 2) if measured else None


def evaluate(model: torch.nn.Module, collator: LlavaCollator, samples: Iterable[Sample], *, batch_size: int = 16,
             max_new_tokens: int = HELDOUT_MAX_NEW_TOKENS, max_samples: int | None = None, scorer: Scorer = exact_match,
             progress: bool = True, image_noise: float = 0.0, noise_seed: int = 0,
             tags: dict[str, str] | None = None, fast: bool = False) -> EvalResult:
    """Greedy answers of `model` (LlavaForConditionalGeneration or CompressedLlava, in memory,
    e.g. mid-training: its train/eval mode is restored) to each sample's first question, scored
    against the first answer. image_noise > 0 answers from noisy encoded images (`noisy_images`);
    `tags` are copied into the result; `fast`: fast generation (`answer_batches`)."""
    with noisy_images(model, image_noise, noise_seed), RouterWeights(model) as routing:
        answers = generate_answers(model, collator, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   max_samples=max_samples, progress=progress, fast=fast)
    if not answers.rows:
        raise EvalError("no samples to evaluate")
    scores = score(answers.rows, scorer)
    compresses = isinstance(model, CompressedLlava) and model.config.compresses
    visual = collator.num_visual_tokens
    return EvalResult(
        samples=len(answers.rows), accuracy=scores.accuracy, chance=scores.chance, by_type=scores.by_type,
        tokens_per_s=answers.tokens / answers.seconds, samples_per_s=len(answers.rows) / answers.seconds,
        generated_tokens=answers.generated_tokens, visual_tokens=visual,
        visual_tokens_kept=kept_per_image(model, visual, answers.visual_kept) if compresses else visual,
        mode=model.config.mode if isinstance(model, CompressedLlava) else "none",
        tau=model.config.tau if compresses else None, layer=model.config.layer if compresses else None,
        divico_seed=model.config.seed if isinstance(model, CompressedLlava) else None,
        image_noise=float(image_noise), noise_seed=noise_seed, fast=fast, tags=dict(tags or {}),
        router_weights=routing.mean, predictions=answers.rows)


def check_model(path: Path) -> None:
    """ConfigError unless `path` is a Hugging Face model folder."""
    if not (path / "config.json").is_file():
        what = "not found" if not path.exists() else "no config.json in it (not a Hugging Face model folder)"
        raise ConfigError(f"model={path}: {what}")


def _given(**overrides) -> dict:
    return {name: value for name, value in overrides.items() if value is not None}


def model_settings(path: str | Path, *, mode: str | None = None, tau: float | None = None,
                   layer: int | None = None, seed: int | None = None,
                   mustdrop: MustDropSettings | None = None) -> DiViCoConfig | None:
    """The DiViCo settings `load_model` runs the checkpoint at `path` with (None: the plain LLaVA
    model), read without loading any weights. ConfigError for a request the folder cannot
    serve, EvalError for settings that do not parse."""
    path = Path(path)
    check_model(path)
    overrides = _given(mode=mode, tau=tau, layer=layer, seed=seed, mustdrop=mustdrop)
    if (path / DIVICO_SETTINGS_FILE).is_file():
        try:  # a request the saved model cannot serve (e.g. a tau outside a MoE model's range) is bad input
            return CompressedLlava.read_saved(path, **overrides)[0]
        except json.JSONDecodeError as error:
            raise EvalError(f"{path / DIVICO_SETTINGS_FILE}: not valid JSON ({error})") from error
        except ValueError as error:
            raise ConfigError(str(error)) from error
    if (mode is None and tau is None and layer is None) or mode == "none":
        return None
    wrap = DiViCoConfig(**overrides)
    if wrap.uses_gap_encoder:
        raise ConfigError(f"model={path} has no DiViCo weights ({DIVICO_SETTINGS_FILE}); mode {wrap.mode!r} needs "
                          "a trained gap encoder (fastv, random and select_only do not)")
    return wrap


def load_model(path: str | Path, *, mode: str | None = None, tau: float | None = None, layer: int | None = None,
               seed: int | None = None, mustdrop: MustDropSettings | None = None,
               device: str = "auto") -> torch.nn.Module:
    """The checkpoint at `path`: through CompressedLlava when DiViCo settings lie beside it or
    `mode`/`tau`/`layer` ask for one, else the plain LLaVA model; `seed` overrides the DiViCo seed of
    a CompressedLlava and alone wraps nothing. bf16 on GPU, fp32 on CPU. ConfigError for a
    request the folder cannot serve (checked before the weights load), EvalError for a file
    that does not load."""
    path = Path(path)
    settings = model_settings(path, mode=mode, tau=tau, layer=layer, seed=seed, mustdrop=mustdrop)
    saved = (path / DIVICO_SETTINGS_FILE).is_file()
    overrides = _given(mode=mode, tau=tau, layer=layer, seed=seed, mustdrop=mustdrop)
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
    return llava if settings is None else CompressedLlava(llava, settings).to(device)


def _unreadable_weights(folder: Path, error: SafetensorError) -> str:
    """Name the safetensors file that does not open (transformers' error does not)."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except SafetensorError as file_error:
            return f"{path}: truncated or corrupt ({file_error})"
    return f"model={folder}: cannot read the weights ({error})"


def validate(cfg: EvalConfig, *, benchmark: bool = False) -> None:
    """Raise ConfigError naming the first bad key; reads no weights. With `benchmark`, `data` is
    a benchmark's folder, which the benchmark's reader checks."""
    for name in ("batch_size", "max_new_tokens", "max_samples"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value}: must be >= 1")
    try:
        cfg.validate()  # the collator settings
        DiViCoConfig(**cfg.divico.given()).validate(prefix="divico.")
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if cfg.scorer not in SCORERS:
        raise ConfigError(f"scorer={cfg.scorer!r}: expected one of {sorted(SCORERS)}")
    check_image_noise(cfg.image_noise)
    for name, value in cfg.tags.items():  # omegaconf lets a nested key (tags.a.b=1) or a list through
        if not isinstance(value, str):
            raise ConfigError(f"tags.{name}={value!r}: a tag's value must be a string")
    try:
        device = torch.device(resolve_device(cfg.device))
    except RuntimeError as error:
        raise ConfigError(f"device={cfg.device!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device}: no GPU is visible")
    check_model(cfg.model)
    if not benchmark:
        check_data(cfg.data)
    if cfg.image_root is not None and not cfg.image_root.is_dir():
        raise ConfigError(f"image_root={cfg.image_root}: not a folder")


def load_collator(model: Path, settings: CollatorSettings) -> LlavaCollator:
    """The model folder's processor and config with the collator `settings`, left-padded."""
    try:
        return LlavaCollator(AutoProcessor.from_pretrained(model), CollatorConfig.from_settings(settings, "left"),
                             AutoConfig.from_pretrained(model))
    except OSError as error:
        raise EvalError(f"model={model}: cannot load its processor ({error})") from error
    except ValueError as error:  # e.g. template=chat_template for a checkpoint without one
        raise ConfigError(f"model={model}: {error}") from error


def main(cfg: EvalConfig, *, progress: bool = True) -> EvalResult:
    """Validate `cfg`, load its model, evaluate it."""
    validate(cfg)
    model = load_model(cfg.model, **cfg.divico.given(), device=cfg.device)
    collator = load_collator(cfg.model, cfg)
    log.info("evaluating %s (mode %s, template %s, %d visual tokens per image) on %s", cfg.model,
             model.config.mode if isinstance(model, CompressedLlava) else "none", collator.template,
             collator.num_visual_tokens, cfg.data)
    return evaluate(model, collator, read_samples(cfg.data, cfg.image_root), batch_size=cfg.batch_size,
                    max_new_tokens=cfg.max_new_tokens or HELDOUT_MAX_NEW_TOKENS, max_samples=cfg.max_samples,
                    scorer=SCORERS[cfg.scorer], progress=progress, image_noise=cfg.image_noise,
                    noise_seed=cfg.noise_seed, tags=cfg.tags, fast=cfg.fast)


def print_result(result: EvalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"answer accuracy (mode {result.mode}"
                        + (f", tau {result.tau:.3f}, K {result.layer}" if result.tau is not None else "")
                        + (f", image noise {result.image_noise:g}" if result.image_noise else "") + ")")
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
                        help="eval keys (pipeline/eval/config.py), e.g. model=DIR data=DIR divico.tau=0.111")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here (atomically)")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="also write every answer (key, question, answer, prediction, correct) as JSON lines")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--task", choices=[HELDOUT, *sorted(BENCHMARKS)], default=None,
                        help=f"the benchmark to answer (data=its folder in LLaVA's layout; default {HELDOUT}: "
                             "data= held-out shards or JSON) or, with `divico eval score`, to score")
    parser.add_argument("--chunk", default=None, metavar="I/N",
                        help="a benchmark task: answer only chunk I of N (one per GPU) into a part file, unscored")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="`divico eval score`: the benchmark's annotation file or folder (LLaVA's layout)")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """`divico eval`: the exit status; a bad key or a failed load is one logged line, no traceback."""
    if args.overrides[:1] == ["score"]:
        return score_command(args)
    if args.annotations:
        log.error("--annotations: only with `divico eval score` (`divico eval --task T` reads them from data=)")
        return EXIT_BAD_INPUT
    if args.task not in (None, HELDOUT):
        return task_command(args)
    if args.chunk:
        log.error("--chunk: only with a benchmark --task (%s)", ", ".join(sorted(BENCHMARKS)))
        return EXIT_BAD_INPUT
    try:
        cfg = load_config(args.config, canonical_overrides(args.overrides), schema=EvalConfig)
        result = main(cfg, progress=not args.json)
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    except EvalError as error:
        log.error("%s", error)
        return EXIT_FAILURE
    if cfg.tensorboard:
        log_scores(cfg.tensorboard, HELDOUT, {"accuracy": result.accuracy, "chance": result.chance},
                   {"mode": result.mode, "tau": result.tau, "kept": result.visual_tokens_kept, **result.tags})
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


def task_command(args: argparse.Namespace) -> int:
    """`divico eval --task T`: answer and score a benchmark (pipeline/eval/tasks.py)."""
    if args.predictions is None:
        log.error("--task %s: give --predictions FILE (the answers go there; a rerun resumes it)", args.task)
        return EXIT_BAD_INPUT
    try:
        chunk = parse_chunk(args.chunk) if args.chunk else None
        cfg = load_config(args.config, canonical_overrides(args.overrides), schema=EvalConfig)
        summary = run_task(cfg, args.task, args.predictions, chunk=chunk, progress=not args.json)
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    except (EvalError, BenchmarkError) as error:
        log.error("%s", error)
        return EXIT_FAILURE
    if cfg.tensorboard and "figures" in summary:
        log_scores(cfg.tensorboard, args.task, summary["figures"],
                   {k: summary[k] for k in ("mode", "tau", "kept")} | summary["tags"])
    if args.out:
        write_text_atomically(args.out, json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        print_figures(f"{args.task}: {summary['predictions']} (mode {summary['mode']}, tau {summary['tau']}, "
                      f"{summary['kept']} of {summary['visual_tokens']} visual tokens)",
                      summary.get("figures") or {k: summary[k] for k in ("questions", "answered_now", "missing")
                                                 if k in summary})
    return 0


def score_command(args: argparse.Namespace) -> int:
    """`divico eval score`: the exit status; the figures printed as JSON or a table."""
    extra = [*args.overrides[1:], *args.config, *([str(args.out)] if args.out else []),
             *([args.chunk] if args.chunk else [])]
    if extra or args.task in (None, HELDOUT) or not (args.annotations and args.predictions):
        log.error("divico eval score takes --task (a benchmark), --annotations and --predictions (and --json), "
                  "nothing else%s", f" (got {extra})" if extra else "")
        return EXIT_BAD_INPUT
    try:
        figures = benchmark(args.task).score(read_predictions(args.predictions), args.annotations)
    except BenchmarkError as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(figures))
    else:
        print_figures(f"{args.task}: {args.predictions} against {args.annotations}", figures)
    return 0


def log_scores(run_dir: Path, task: str, figures: dict[str, Any], hparams: dict[str, Any]) -> None:
    """Every number in `figures` as eval/<task>/<name> (nested names joined by /) at step 0, with
    an hparams entry of `hparams` + the task, in the TensorBoard run at `run_dir`."""
    from torch.utils.tensorboard import SummaryWriter

    scalars = {f"eval/{task}/{name}": float(value) for name, value in _flat(figures).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    with SummaryWriter(str(run_dir)) as writer:  # add_hparams writes the scalars too
        writer.add_hparams({"task": task, **{k: v for k, v in hparams.items() if v is not None}}, scalars,
                           run_name=".")


def print_figures(title: str, figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in _flat(figures).items():
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


def _flat(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in figures.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}/"))
        else:
            out[f"{prefix}{name}"] = value
    return out
