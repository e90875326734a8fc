"""`divico report accuracy`: evaluation summaries joined into the accuracy-vs-tau table (the
paper's Table I, for the methods evaluated) and a plot, one panel per benchmark.

    divico report accuracy SUMMARY.json|FOLDER [...] --out DIR

Each SUMMARY (or every *.json in a FOLDER, recursively) is what `divico eval --out` writes: a
benchmark's (`--task T`: its official figures) or a held-out set's. Per file: the benchmark, the
method, tau and the headline figure with its standard error and question count:

  textvqa  accuracy (VQA accuracy, %)        mmbench  accuracy (circular, %)
  pope     f1 (mean over the splits, x 100)  gqa      accuracy (%)
  mme      perception (score, max 2000)      heldout  accuracy (normalised exact match, %)

(POPE's F1 and MME's scores have no per-question standard error; theirs is left blank.) The
method is the summary's tags.method when set, else the file's name without its tau label
(`divico-tau111.json` -> divico, launch's run names), so two models in the same mode stay apart.
Two files for the same benchmark, method and tau are an error (exit 2). Writes accuracy.md,
accuracy.csv and accuracy.png (uncompressed methods as dashed horizontal lines) into DIR.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.bench.accuracy_report import markdown_table
from pipeline.train.config import ConfigError
from pipeline.contract import EXIT_BAD_INPUT, tau_label
from pipeline.durable import write_text_atomically
from pipeline.eval.config import HELDOUT
from pipeline.stats import proportion_standard_error

log = logging.getLogger(__name__)

# benchmark -> (the figure reported, its scale to the table's unit, the column's title)
HEADLINES = {"textvqa": ("accuracy", 1, "TextVQA"), "pope": ("f1", 100, "POPE F1"),
             "mme": ("perception", 1, "MME perception"), "mmbench": ("accuracy", 1, "MMBench"),
             "gqa": ("accuracy", 1, "GQA"), HELDOUT: ("accuracy", 100, "held-out")}


def read_summary(path: Path) -> dict[str, Any]:
    """The JSON of one summary `divico eval --out` wrote; ConfigError naming the file."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not an evaluation summary ({error})") from error
    if not isinstance(summary, dict):
        raise ConfigError(f"{path}: not an evaluation summary (a JSON {type(summary).__name__})")
    return summary


def summary_row(summary: dict[str, Any], path: Path) -> dict[str, Any]:
    """One row of `summary` (read from `path`, whose name is the method when tags.method is not
    set): task, method, tau, kept, value, se (None where the figure has none), questions, file."""
    task = summary.get("task", HELDOUT)
    if task not in HEADLINES or not {"mode", "tau"} <= summary.keys():
        raise ConfigError(f"{path}: not an evaluation summary of `divico eval --out` (task {task!r})")
    tau = summary["tau"]
    stem = path.stem
    method = summary.get("tags", {}).get("method") or (stem.removesuffix(f"-{tau_label(tau)}") if tau else stem)
    name, scale, _ = HEADLINES[task]
    if task == HELDOUT:
        accuracy, questions = summary["accuracy"], summary["samples"]
        value, se = 100 * accuracy, proportion_standard_error(accuracy, questions, scale=100)
    else:
        if "figures" not in summary:
            raise ConfigError(f"{path}: {task} answered only in part ({summary.get('missing')} questions missing), "
                              "no figures")
        figures = summary["figures"]
        value, se, questions = scale * figures[name], figures.get("se"), figures.get("questions", summary["questions"])
    kept = summary.get("kept", summary.get("visual_tokens_kept"))
    return {"task": task, "method": method, "tau": tau, "kept": kept, "value": value, "se": se,
            "questions": questions, "file": str(path)}


def read_result(path: Path) -> dict[str, Any]:
    """The row of the summary at `path` (summary_row)."""
    return summary_row(read_summary(path), path)


def read_results(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of the summaries `paths` names: files, or folders of them (every *.json below)."""
    rows, seen = [], {}
    files = [file for path in paths for file in (sorted(path.rglob("*.json")) if path.is_dir() else [path])]
    for path in files:
        row = read_result(path)
        key = (row["task"], row["method"], None if row["tau"] is None else round(row["tau"], 6))
        if key in seen:
            raise ConfigError(f"{seen[key]} and {path}: both {row['task']} of method {row['method']!r} at tau "
                              f"{row['tau']}; set tags.method to tell them apart")
        seen[key] = path
        rows.append(row)
    if not rows:
        raise ConfigError("no summaries given")
    return rows


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    return f"{row['value']:.1f}" + (f" ± {row['se']:.1f}" if row["se"] is not None else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    tasks = [task for task in HEADLINES if any(row["task"] == task for row in rows)]
    lines = ["# Accuracy against tau", "",
             "Headline figure per benchmark ± its standard error (questions: "
             + ", ".join(f"{HEADLINES[t][2]} {max(r['questions'] for r in rows if r['task'] == t)}" for t in tasks)
             + "). Methods on the same questions; differences within about two standard errors are noise.", ""]
    by_key = {(row["method"], row["tau"], row["task"]): row for row in rows}
    settings = sorted({(row["method"], row["tau"]) for row in rows}, key=lambda s: (s[1] is not None, s[1] or 0, s[0]))
    body = []
    for method, tau in settings:
        kept = next(row["kept"] for row in rows if row["method"] == method and row["tau"] == tau)
        body.append([method, "-" if tau is None else f"{100 * tau:.1f}%", str(kept),
                     *(_cell(by_key.get((method, tau, task))) for task in tasks)])
    return "\n".join([*lines, *markdown_table(["method", "tau", "kept", *(HEADLINES[t][2] for t in tasks)], body)])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per benchmark: the headline against tau, a line (s.e. bars) per method."""
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [task for task in HEADLINES if any(row["task"] == task for row in rows)]
    figure = Figure(figsize=(4.2 * len(tasks), 3.8))
    FigureCanvasAgg(figure)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for axes, task in zip(figure.subplots(1, len(tasks), squeeze=False)[0], tasks):
        for method in methods:
            color = colors[methods.index(method) % len(colors)]
            own = sorted((r for r in rows if r["task"] == task and r["method"] == method), key=lambda r: r["tau"] or 0)
            for row in (r for r in own if r["tau"] is None):
                axes.axhline(row["value"], color=color, linestyle="--", label=f"{method} (all tokens)")
            points = [r for r in own if r["tau"] is not None]
            if points:
                axes.errorbar([100 * r["tau"] for r in points], [r["value"] for r in points],
                              yerr=[r["se"] or 0 for r in points], fmt="o-", capsize=3, color=color, label=method)
        axes.set_title(HEADLINES[task][2])
        axes.set_xlabel("tau: visual tokens kept (%)")
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def write_report(rows: list[dict[str, Any]], out: Path) -> str:
    """accuracy.md, accuracy.csv and accuracy.png in `out`; returns the markdown."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    report = markdown(rows)
    write_text_atomically(out / "accuracy.md", report + "\n")
    write_text_atomically(out / "accuracy.csv", text.getvalue())
    plot(rows, out / "accuracy.png")
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("accuracy", help="evaluation summaries -> the accuracy-vs-tau table and plot",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", type=Path, metavar="SUMMARY.json|FOLDER")
    parser.add_argument("--out", type=Path, required=True, help="write accuracy.md, .csv and .png here")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    try:
        rows = read_results(args.summaries)
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    print(write_report(rows, args.out))
    print(f"\nplot: {args.out / 'accuracy.png'}")
    return 0
