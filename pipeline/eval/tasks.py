"""`divico eval --task T`: a model answers a benchmark's questions as LLaVA's evaluation scripts
ask them, into a resumable predictions file (pipeline/eval/predictions.py), and the benchmark's
official scorer (pipeline/eval/benchmarks/) scores that file.

    divico eval --task textvqa|pope|mme|mmbench|gqa model=DIR data=FOLDER --predictions FILE
                [--chunk I/N] [--out SUMMARY.json] [--json] [key=value ...]

FOLDER is the benchmark's folder in LLaVA's evaluation layout (./playground/data/eval/<name>;
for MME, its MME/ folder). Its question file and images (or MMBench's TSV) and its annotations
are read and checked before any model loads. Each question is asked as "<image>\\n" + its text
in LLaVA's vicuna_v1 template, system prompt included (template= overrides it), answered
greedily (temperature 0) with LLaVA's limit on new tokens (max_new_tokens= overrides it), in
left-padded batches through the compressed KV cache. Each row of FILE: question_id, prompt,
text (LLaVA's answers format) and model_id (the model folder's absolute path), mode, tau, kept
(the visual tokens kept per image), image_noise (eval's image_noise=), metadata. A rerun with
other such values is refused: give another FILE.

--chunk I/N answers the I-th of N contiguous chunks of the questions into FILE's part I of N and
does not score (one process per GPU, e.g. a SLURM array); a later run without --chunk merges
the parts, answers whatever they lack, and scores.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.train.config import ConfigError
from pipeline.data.loader import Sample
from pipeline.eval.benchmarks import BenchmarkError, Question, benchmark
from pipeline.eval.config import EvalConfig
from pipeline.eval.data import one_question
from pipeline.eval.generate import answer_batches
from pipeline.eval.predictions import (answered, appending, chunk_of, part_path, read_rows, unanswered,
                                        write_in_order)

log = logging.getLogger(__name__)

BENCHMARK_TEMPLATE = "vicuna_v1"


def as_sample(question: Question) -> Sample:
    """The question as a one-turn conversation, its image decoded now (one batch at a time)."""
    return one_question(question.load_image(), question.text, key=str(question.question_id),
                        meta={"question": question})


def read_benchmark(task: str, folder: Path) -> tuple[list[Question], Path]:
    """The benchmark's questions and annotations path; ConfigError naming what is missing or malformed."""
    module = benchmark(task)
    if not folder.is_dir():
        raise ConfigError(f"data={folder}: not a folder (the {task} folder of LLaVA's evaluation layout)")
    annotations = folder / module.ANNOTATIONS
    if not annotations.exists():
        raise ConfigError(f"{annotations}: not found ({task} scores against it)")
    try:
        return module.questions(folder), annotations
    except BenchmarkError as error:
        raise ConfigError(str(error)) from error


def run_task(cfg: EvalConfig, task: str, predictions: Path, *, chunk: tuple[int, int] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Answer the questions of `task` not yet in `predictions`, then score them (unless `chunk`).
    Returns the summary: the run's settings, counts, throughput and the official figures."""
    from pipeline.eval.main import load_collator, load_model, model_settings, noisy_images, validate

    if cfg.template == "auto":  # LLaVA's scripts ask every benchmark in vicuna_v1, its system prompt included
        cfg = replace(cfg, template=BENCHMARK_TEMPLATE)
    validate(cfg, benchmark=True)
    module = benchmark(task)
    questions, annotations = read_benchmark(task, cfg.data)
    settings = model_settings(cfg.model, **cfg.divico.given())
    collator = load_collator(cfg.model, cfg)
    visual = collator.num_visual_tokens
    compresses = settings is not None and settings.compresses
    run = {"model_id": str(cfg.model.resolve()), "mode": settings.mode if settings else "none",
           "tau": settings.tau if compresses else None,
           "kept": settings.kept_tokens(visual) if compresses else visual,
           "image_noise": cfg.image_noise}
    mine = chunk_of(questions, *chunk) if chunk else questions
    path = part_path(predictions, *chunk) if chunk else predictions
    done = answered(path, questions, run, parts=chunk is None)
    todo = unanswered(mine, done)
    log.info("%s: %d questions%s, %d answered before; mode %s, tau %s, %s of %d visual tokens kept", task, len(mine),
             f" (chunk {chunk[0]} of {chunk[1]})" if chunk else "", len(mine) - len(todo), run["mode"], run["tau"],
             run["kept"], visual)
    todo = todo[:cfg.max_samples]  # None: all
    seconds, generated, measured = 0.0, 0, []
    if todo:
        model = load_model(cfg.model, **cfg.divico.given(), device=cfg.device)
        with appending(path) as append, noisy_images(model, cfg.image_noise, cfg.noise_seed):
            for batch in answer_batches(model, collator, map(as_sample, todo), batch_size=cfg.batch_size,
                                        max_new_tokens=cfg.max_new_tokens or module.MAX_NEW_TOKENS,
                                        progress=progress, total=len(todo), fast=cfg.fast):
                rows = [{"question_id": sample.meta["question"].question_id, "prompt": sample.meta["question"].prompt,
                         "text": text, **run, "metadata": {}} for sample, text in zip(batch.samples, batch.texts)]
                append(rows)
                for row in rows:
                    done[row["question_id"], row["prompt"]].append(row)
                seconds += batch.seconds
                generated += batch.generated_tokens
                measured += [kept for kept in batch.visual_kept if kept is not None]
    summary = {"task": task, "model": str(cfg.model), **{k: v for k, v in run.items() if k != "model_id"},
               "visual_tokens": visual, "questions": len(mine), "answered_now": len(todo),
               "seconds": seconds, "generated_tokens": generated, "fast": cfg.fast, "predictions": str(path),
               "tags": dict(cfg.tags)}
    if run["kept"] is None and measured:  # a mode that decides per image: the mean over the answers made now
        summary["kept"] = round(sum(measured) / len(measured), 2)
    missing = len(unanswered(mine, done))
    if missing:
        summary["missing"] = missing
        return summary
    write_in_order(path, mine, done)
    if chunk is None:
        try:
            summary["figures"] = module.score(read_rows(path, cut_torn_tail=False), annotations)
        except BenchmarkError as error:
            raise ConfigError(f"scoring {path}: {error}") from error
    return summary
