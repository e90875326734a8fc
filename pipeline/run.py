"""`divico run`: the embedded default. The whole pipeline on CPU, on a tiny LLaVA, in minutes.

    synthetic data (train, finetune, held-out: three seeds)  ->  shards  ->  tiny LLaVA (random init)
      -> stage "base": the tiny model (language model, projector and its random CLIP tower) trained
         in full on "train", no compression (standing in for the released LLaVA-1.5 weights)
      -> stage "divico-tau<1000*tau>" for each tau: LoRA + DiViCo from that base, one epoch of "finetune"
      -> held-out answer accuracy of each model (and of training-free FastV on the base) vs chance
      -> report/: accuracy against tau (table, plot) and the efficiency report (divico report)

The stage graph is configs/pipelines/demo.yaml, run here in one process (`divico launch local`
and `divico launch slurm` run the same file). Everything goes under --root (default: the file's
root, runs/demo); a stage whose outputs are complete is skipped on rerun, an interrupted one
resumes from its newest checkpoint. key=value arguments change the file, e.g. the sizes:
vars.train.samples=480 vars.taus=[0.1111111]. Ends with a summary table and the TensorBoard command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launch.local import run_in_process
from launch.stages import Pipeline, PipelineError, load_pipeline
from pipeline.contract import EXIT_BAD_INPUT, TRAIN_SUMMARY_FILE, run_name
from pipeline.report.accuracy import read_summary, summary_row
from pipeline.stats import paired_difference

if TYPE_CHECKING:
    from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "pipelines" / "demo.yaml"
# The summary's rows, in this order. Each row's method and tau are its summary's, as `divico
# report accuracy` reads them (demo.yaml sets no tags.method: the method is the file's run name
# without its tau label): base, fastv, divico (a specialist), moe (the Mixture-of-Experts model)
# or nearest (the specialist of the nearest tau, run at a tau it was not trained at).
EVAL_STAGES = ("eval_base", "eval_fastv", "eval_divico", "eval_moe", "eval_moe_unseen", "eval_nearest")
MODES = {"none": "none", "fastv": "fastv (no training)"}  # eval's mode -> the table's words
# What each method is compared with on the same questions, at its tau (then the base).
AGAINST = {"divico": ["fastv"], "moe": ["divico", "nearest"], "nearest": [], "fastv": []}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("run", help="the embedded default: every stage on a tiny model, on CPU",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="output folder (default: runs/demo in the repository)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to configs/pipelines/demo.yaml, e.g. "
                                                     "vars.heldout.samples=40")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    root = [f"root={args.root.resolve()}"] if args.root else []
    try:
        pipeline = load_pipeline(DEMO, [*root, *args.overrides], workdir=REPO)
        status = run_in_process(pipeline)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if status == 0:
        print_summary(pipeline, time.perf_counter() - started)
    return status


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the demo: its row as `divico report accuracy` reads it (method and tau
    from the summary's own fields), the summary itself, and its per-question answers."""

    row: dict[str, Any]
    summary: dict[str, Any]
    predictions: Path

    @property
    def name(self) -> str:
        """The run name the row stands for (`divico-tau111`, `base`): the table's stage."""
        return run_name(self.row["method"], self.row["tau"])


def read_evaluations(pipeline: Pipeline) -> dict[str, Evaluation]:
    """Every evaluation of EVAL_STAGES by its run name, in stage order."""
    evaluations = {}
    # demo.yaml: each eval's outputs are its summary and its answers.
    for summary_path, predictions in (task.outputs for stage in EVAL_STAGES for task in pipeline.stage(stage).tasks):
        summary = read_summary(summary_path)
        evaluation = Evaluation(summary_row(summary, summary_path), summary, predictions)
        evaluations[evaluation.name] = evaluation
    return evaluations


def paired_table(evaluations: dict[str, Evaluation]) -> Table:
    """Each compressed model against what AGAINST names at its tau and against the uncompressed
    models, on the same questions."""
    from rich.table import Table

    def predictions(name: str) -> list[dict]:
        return [json.loads(line) for line in evaluations[name].predictions.read_text().splitlines()]

    uncompressed = [name for name, evaluation in evaluations.items() if evaluation.row["tau"] is None]
    table = Table(title="paired on the same questions: accuracy difference ± its s.e.")
    for column in ("A vs B", "A - B", "± s.e.", "only A right", "only B right"):
        table.add_column(column, justify="left" if column == "A vs B" else "right", no_wrap=True)
    for name, evaluation in evaluations.items():
        method, tau = evaluation.row["method"], evaluation.row["tau"]
        if tau is None:
            continue
        # Matched by run name, i.e. tau to three digits (tau111): the tau a specialist's settings
        # hold and the one its eval command passes are the same rate, not always the same float.
        against = [run_name(other, tau) for other in AGAINST.get(method, [])] + uncompressed
        for other in (other for other in against if other in evaluations):
            paired = paired_difference(predictions(name), predictions(other))
            table.add_row(f"{name} vs {other}", f"{paired.difference:+.1%}", f"{paired.standard_error:.1%}",
                          str(paired.only_first), str(paired.only_second))
    return table


def print_summary(pipeline: Pipeline, seconds: float) -> None:
    """One row per evaluation (base, FastV per tau, DiViCo per tau), with its training run's figures."""
    from rich.console import Console
    from rich.table import Table

    evaluations = read_evaluations(pipeline)
    samples = next(iter(evaluations.values())).row["questions"]
    table = Table(title=f"divico run: held-out accuracy on {samples} synthetic questions")
    for column in ("stage", "mode", "tau", "visual tokens kept", "accuracy", "± s.e.", "chance", "final train loss",
                   "train tokens/s", "eval tokens/s"):
        table.add_column(column, justify="left" if column in ("stage", "mode") else "right", no_wrap=True)
    for name, evaluation in evaluations.items():
        row, result = evaluation.row, evaluation.summary
        # The training run behind an evaluation: its own folder (base, divico-tau111), or its
        # method's (moe); FastV and the nearest-specialist rows have none of their own.
        summary_path = pipeline.root / name / TRAIN_SUMMARY_FILE
        if not summary_path.is_file():
            summary_path = pipeline.root / row["method"] / TRAIN_SUMMARY_FILE
        train = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        # The row's value and se are percentages: "{:.1f}%" of them prints what "{:.1%}" of the fractions did.
        table.add_row(name, MODES.get(result["mode"], result["mode"]),
                      f"{row['tau']:.3f}" if row["tau"] else "-",
                      f"{row['kept']} / {result['visual_tokens']}",
                      f"{row['value']:.1f}%", f"{row['se']:.1f}%",
                      f"{result['chance']:.1%}",
                      f"{train['train/lm_loss']:.3f}" if train else "-",
                      f"{train['run/tokens_per_s']:.0f}" if train else "-", f"{result['tokens_per_s']:.0f}")
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print(paired_table(evaluations))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for evaluation in evaluations.values():
        by_method.setdefault(evaluation.row["method"], []).append(evaluation.summary)
    if "moe" in by_method:
        from pipeline.bench.accuracy_report import plot_moe

        figure = pipeline.root / "eval" / "moe.png"
        newest = max(Path(evaluation.row["file"]).stat().st_mtime_ns for evaluation in evaluations.values())
        if not figure.is_file() or figure.stat().st_mtime_ns < newest:  # a rerun that evaluated nothing keeps it
            plot_moe({"moe": by_method["moe"], "specialist": by_method.get("divico", []),
                      "nearest specialist": by_method.get("nearest", [])}, figure)
        print(f"The MoE model against the specialists, and its router weights, by tau: {figure}")
    report = pipeline.root / "report"
    print(f"Accuracy against tau: {report / 'accuracy.md'} and {report / 'accuracy.png'}; efficiency per mode: "
          f"{report / 'efficiency.md'}")
    print(f"finished in {seconds / 60:.1f} min. Chance = always giving each question type's most common answer; "
          f"s.e. = sqrt(p (1 - p) / n), n = {samples}: differences within about two of them are noise.\n"
          f"Models: {pipeline.root}/<stage>/model. TensorBoard: tensorboard --logdir {pipeline.tensorboard_dir}")
