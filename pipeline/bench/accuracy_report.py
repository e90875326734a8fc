"""The accuracy benchmark's report: the cells of `divico bench accuracy` read back, summed up
per (method, tau, condition) over seeds, compared question by question, and written out as
results.json, results.csv, report.md and accuracy_vs_tau.png.

A cell is one `divico eval` run: NAME.json (its summary, whose tags name the method, the seed
and the condition) beside NAME.jsonl (its scored predictions, one question a line). Rows are
keyed by the free method name, so a new method joins the tables without code changes.

Spread (pipeline/stats.py): a row's accuracy is the mean over seeds of each seed's accuracy; its
standard error is the seeds' sample sd / sqrt(seeds) (what retraining moves), or for a single
seed (a training-free method on the one base model) the binomial sqrt(p(1-p)/n) over its
questions (mean_over_seeds). Differences are paired on seed and question and bootstrapped over
both (paired_bootstrap), since the questions' difficulty is shared by both sides.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.durable import write_text_atomically
from pipeline.stats import PairedInterval, mean_over_seeds, paired_bootstrap, proportion_standard_error

BASE = "none"  # the uncompressed base model's method: retention is relative to its clean row
CONDITIONS = ("clean", "noise")
TAGS = ("method", "seed", "condition")

GroupKey = tuple[str, float | None, str]  # (method, tau, condition)


@dataclass(frozen=True)
class Cell:
    """One evaluation run: its tags, its compression, and which of its questions it got right."""

    path: Path  # NAME.json
    method: str
    seed: int
    condition: str
    tau: float | None  # None without compression
    visual_tokens_kept: int | float  # a mean where the mode decides per image
    correct: dict[str, bool]  # question key -> answered correctly
    kinds: dict[str, str]  # question key -> question type

    def fraction(self, keys: list[str]) -> float:
        return sum(self.correct[key] for key in keys) / len(keys)


def read_cells(folder: Path) -> list[Cell]:
    """Every NAME.json in `folder` with its NAME.jsonl, in file-name order. ValueError naming the
    file for a summary without predictions or tags, an unreadable line, or a cell run twice."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    cells = [_read_cell(path) for path in sorted(folder.glob("*.json"))]
    if not cells:
        raise ValueError(f"{folder}: no cells (NAME.json beside NAME.jsonl) in it")
    seen: dict[tuple[Any, ...], Path] = {}
    for cell in cells:
        key = (cell.method, cell.tau, cell.condition, cell.seed)
        if key in seen:
            raise ValueError(f"{cell.path}: the same method, tau, condition and seed as {seen[key]}")
        seen[key] = cell.path
    return cells


def _read_cell(path: Path) -> Cell:
    predictions = path.with_suffix(".jsonl")
    if not predictions.is_file():
        raise ValueError(f"{path}: no predictions beside it ({predictions.name} is missing)")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    tags = summary.get("tags") if isinstance(summary, dict) else None
    if not isinstance(tags, dict) or any(name not in tags for name in TAGS):
        raise ValueError(f"{path}: its tags must hold {', '.join(TAGS)} (found {tags!r})")
    if tags["condition"] not in CONDITIONS:
        raise ValueError(f"{path}: tags.condition={tags['condition']!r}, expected one of {CONDITIONS}")
    try:
        seed = int(tags["seed"])
    except (TypeError, ValueError):
        raise ValueError(f"{path}: tags.seed={tags['seed']!r} is not an integer") from None
    for name in ("tau", "visual_tokens_kept"):
        if name not in summary:
            raise ValueError(f"{path}: no {name!r} in the summary")
    correct, kinds = {}, {}
    for number, line in enumerate(predictions.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, kind, right = str(row["key"]), str(row["question_type"]), row["correct"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{predictions}:{number}: not a scored prediction (key, question_type, correct): "
                             f"{error!r}") from error
        if not isinstance(right, bool):
            raise ValueError(f"{predictions}:{number}: 'correct' is {right!r}, not true or false")
        if key in correct:
            raise ValueError(f"{predictions}:{number}: question key {key!r} appears twice")
        correct[key], kinds[key] = right, kind
    if not correct:
        raise ValueError(f"{predictions}: no predictions in it")
    if summary.get("samples", len(correct)) != len(correct):
        raise ValueError(f"{path}: the summary says {summary.get('samples')} samples, "
                         f"{predictions.name} holds {len(correct)}")
    tau = summary["tau"]
    return Cell(path=path, method=str(tags["method"]), seed=seed, condition=tags["condition"],
                tau=None if tau is None else float(tau), visual_tokens_kept=summary["visual_tokens_kept"],
                correct=correct, kinds=kinds)


def _groups(cells: list[Cell]) -> dict[GroupKey, list[Cell]]:
    """Cells by (method, tau, condition) in first-seen order, each group in seed order."""
    groups: dict[GroupKey, list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.method, cell.tau, cell.condition), []).append(cell)
    return {key: sorted(group, key=lambda cell: cell.seed) for key, group in groups.items()}


def _check_same_questions(first: Cell, second: Cell) -> None:
    if first.correct.keys() != second.correct.keys():
        raise ValueError(f"{first.path} and {second.path} are not on the same questions "
                         f"({len(first.correct.keys() - second.correct.keys())} keys only in the first, "
                         f"{len(second.correct.keys() - first.correct.keys())} only in the second)")


def _row(group: list[Cell]) -> dict[str, Any]:
    first = group[0]
    for cell in group[1:]:
        _check_same_questions(first, cell)
    keys = list(first.correct)
    accuracy, se = mean_over_seeds([cell.fraction(keys) for cell in group], len(keys))
    by_kind = {}
    for kind in sorted(set(first.kinds.values())):
        own = [key for key in keys if first.kinds[key] == kind]
        kind_accuracy, kind_se = mean_over_seeds([cell.fraction(own) for cell in group], len(own))
        by_kind[kind] = {"accuracy": kind_accuracy, "se": kind_se, "questions": len(own)}
    return {"method": first.method, "tau": first.tau, "condition": first.condition, "accuracy": accuracy, "se": se,
            "retention": None, "questions": len(keys), "seeds": len(group),
            "visual_tokens_kept": first.visual_tokens_kept, "by_kind": by_kind}


def results(cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per (method, tau, condition): the base first, then methods in first-seen order,
    each by tau (clean before noise)."""
    order = {method: index for index, method in enumerate(dict.fromkeys(cell.method for cell in cells))}
    rows = sorted((_row(group) for group in _groups(cells).values()),
                  key=lambda row: (row["method"] != BASE, order[row["method"]], row["tau"] is not None,
                                   row["tau"] or 0.0, row["condition"] != "clean"))
    base = next((row for row in rows if row["method"] == BASE and row["condition"] == "clean"), None)
    for row in rows:
        row["retention"] = row["accuracy"] / base["accuracy"] if base and base["accuracy"] > 0 else None
    return rows


def _select(cells: list[Cell], method: str, tau: float | None, condition: str) -> list[Cell]:
    """The cells of `method` at `tau`; an uncompressed method (tau None, the base) stands at every tau."""
    own = [cell for cell in cells if cell.method == method and cell.condition == condition]
    return [cell for cell in own if _same_tau(cell.tau, tau)] or [cell for cell in own if cell.tau is None]


def _same_tau(a: float | None, b: float | None) -> bool:
    """Equal, or equal to the printed precision of a config (0.111 and 0.1110000001 are one tau)."""
    return a == b or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6))


def _differences(first: list[Cell], second: list[Cell]) -> np.ndarray:
    """(pairs, questions) correctness differences, paired by seed; a single-seed side is paired
    with every seed of the other."""
    by_seed = [{cell.seed: cell for cell in side} for side in (first, second)]
    if len(by_seed[0]) == 1 or len(by_seed[1]) == 1:
        pairs = [(a, b) for a in first for b in second]
    elif by_seed[0].keys() != by_seed[1].keys():
        raise ValueError(f"{first[0].method} (seeds {sorted(by_seed[0])}) and {second[0].method} "
                         f"(seeds {sorted(by_seed[1])}): the seeds do not pair up")
    else:
        pairs = [(by_seed[0][seed], by_seed[1][seed]) for seed in sorted(by_seed[0])]
    reference = first[0]
    for cell in first[1:] + second:
        _check_same_questions(reference, cell)
    keys = sorted(reference.correct)
    return np.array([[int(a.correct[key]) - int(b.correct[key]) for key in keys] for a, b in pairs])


def paired(cells: list[Cell], first: str, second: str, tau: float | None, condition: str = "clean") -> PairedInterval:
    """Accuracy of `first` minus `second` at `tau`, paired by seed and question key. ValueError for
    a side without cells there, seeds that do not pair up, or cells on different questions."""
    sides = [_select(cells, method, tau, condition) for method in (first, second)]
    for method, side in zip((first, second), sides):
        if not side:
            raise ValueError(f"no {condition} cells of method {method!r} at tau {tau}")
    return paired_bootstrap(_differences(*sides))


def noise_drops(cells: list[Cell]) -> list[dict[str, Any]]:
    """For each method run clean and noisy at the same tau: what the noise costs it, paired per
    seed and question (clean - noise)."""
    rows = {(row["method"], row["tau"], row["condition"]): row for row in results(cells)}
    groups = _groups(cells)
    drops = []
    for (method, tau, condition), clean in rows.items():
        noisy = rows.get((method, tau, "noise"))
        if condition != "clean" or noisy is None:
            continue
        drop = paired_bootstrap(_differences(groups[method, tau, "clean"], groups[method, tau, "noise"]))
        drops.append({"method": method, "tau": tau, "clean": clean["accuracy"], "noise": noisy["accuracy"],
                      "drop": drop.difference, "se": drop.standard_error, "low": drop.low, "high": drop.high,
                      "relative_drop": drop.difference / clean["accuracy"] if clean["accuracy"] > 0 else None})
    return drops


def write_report(cells: list[Cell], out: Path, *, comparisons: list[tuple[str, str]], header: str) -> None:
    """results.json, results.csv, report.md and accuracy_vs_tau.png in `out`. Each (first, second)
    of `comparisons` is a paired-difference table over the taus where both were run, or a line
    saying which was not run (one list of comparisons serves every size of grid)."""
    rows = results(cells)
    out = Path(out)
    write_text_atomically(out / "results.json", json.dumps(rows, indent=2) + "\n")
    write_text_atomically(out / "results.csv", _csv(rows))
    lines = [header.rstrip(), "", "Accuracy ± s.e. in percent; in parentheses the retention: accuracy / the "
             "uncompressed base's clean accuracy (of the same question kind).", ""]
    kinds = sorted({kind for row in rows for kind in row["by_kind"]})
    for condition in (c for c in CONDITIONS if any(row["condition"] == c for row in rows)):
        for kind in [None, *kinds]:
            lines += _accuracy_table(rows, condition, kind)
    for first, second in comparisons:
        lines += _comparison_table(cells, first, second)
    lines += _noise_table(noise_drops(cells))
    lines.append(_counts(rows))
    write_text_atomically(out / "report.md", "\n".join(lines) + "\n")
    _plot(rows, out / "accuracy_vs_tau.png")


def _csv(rows: list[dict[str, Any]]) -> str:
    kinds = sorted({kind for row in rows for kind in row["by_kind"]})
    flat = [{**{k: v for k, v in row.items() if k != "by_kind"},
             **{f"{stat}_{kind}": row["by_kind"].get(kind, {}).get(stat) for kind in kinds for stat in ("accuracy", "se")}}
            for row in rows]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(flat[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return text.getvalue()


def _tau_text(tau: float | None) -> str:
    return "no compression" if tau is None else f"tau {100 * tau:.1f}%"


def markdown_table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in body), ""]


def _accuracy_table(rows: list[dict[str, Any]], condition: str, kind: str | None) -> list[str]:
    chosen = [row for row in rows if row["condition"] == condition]
    taus = sorted({row["tau"] for row in chosen}, key=lambda tau: (tau is not None, tau or 0.0))
    kept = {row["tau"]: row["visual_tokens_kept"] for row in chosen}

    def stats(row: dict[str, Any] | None) -> dict[str, Any] | None:
        return row if row is None or kind is None else row["by_kind"].get(kind)

    base = stats(next((row for row in rows if row["method"] == BASE and row["condition"] == "clean"), None))
    body = []
    for method in dict.fromkeys(row["method"] for row in chosen):
        line = [method]
        for tau in taus:
            own = stats(next((row for row in chosen if row["method"] == method and row["tau"] == tau), None))
            text = "—" if own is None else f"{100 * own['accuracy']:.1f} ± {100 * own['se']:.1f}"
            if own is not None and base is not None and base["accuracy"] > 0:
                text += f" ({100 * own['accuracy'] / base['accuracy']:.1f}%)"
            line.append(text)
        body.append(line)
    title = f"### Accuracy, {condition}" + ("" if kind is None else f", question kind {kind}")
    return [title, "", *markdown_table(["method", *(f"{_tau_text(t)} ({kept[t]} kept)" for t in taus)], body)]


def _comparison_table(cells: list[Cell], first: str, second: str) -> list[str]:
    title = [f"### Paired difference {first} - {second}, clean", ""]
    missing = [method for method in (first, second) if not any(cell.method == method for cell in cells)]
    if missing:
        return [*title, f"Not run: {', '.join(missing)}.", ""]
    taus = sorted({cell.tau for cell in cells if cell.method in (first, second) and cell.condition == "clean"},
                  key=lambda tau: (tau is not None, tau or 0.0))
    found = [(tau, paired(cells, first, second, tau)) for tau in taus
             if _select(cells, first, tau, "clean") and _select(cells, second, tau, "clean")]
    if not found:
        return [*title, f"No tau where both {first} and {second} were run.", ""]
    body = [[_tau_text(tau), f"{100 * d.difference:+.1f}", f"{100 * d.standard_error:.1f}",
             f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}]", "yes" if d.low > 0 or d.high < 0 else "no",
             "yes" if abs(d.difference) > 2 * d.standard_error else "no", f"{d.seeds} x {d.questions}"]
            for tau, d in found]
    return [*title, *markdown_table(["tau", "difference", "bootstrap s.e.", "95% interval", "interval excludes 0",
                             "beyond 2 s.e.", "pairs x questions"], body)]


def _noise_table(drops: list[dict[str, Any]]) -> list[str]:
    title = ["### Gaussian noise on the encoded images: clean - noise", ""]
    if not drops:
        return [*title, "No method was run under both conditions at the same tau.", ""]
    body = [[d["method"], _tau_text(d["tau"]), f"{100 * d['clean']:.1f}", f"{100 * d['noise']:.1f}",
             f"{100 * d['drop']:+.1f} ± {100 * d['se']:.1f}", f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]",
             "—" if d["relative_drop"] is None else f"{100 * d['relative_drop']:.1f}%"] for d in drops]
    return [*title, *markdown_table(["method", "tau", "clean", "noise", "drop ± s.e.", "95% interval", "relative drop"], body)]


def _counts(rows: list[dict[str, Any]]) -> str:
    questions: dict[str, list[str]] = {}
    seeds: dict[str, list[int]] = {}
    for row in rows:
        kinds = ", ".join(f"{kind} {stats['questions']}" for kind, stats in row["by_kind"].items())
        questions.setdefault(f"{row['questions']} ({kinds})", []).append(row["method"])
        seeds.setdefault(row["method"], []).append(row["seeds"])
    asked = "; ".join(text if len(questions) == 1 else f"{text} for {', '.join(dict.fromkeys(methods))}"
                      for text, methods in questions.items())
    runs = ", ".join(f"{method} {'/'.join(map(str, sorted(set(n))))}" for method, n in seeds.items())
    return f"Questions per seed: {asked}. Seeds per row: {runs}."


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Clean accuracy against tau: a line with s.e. bars per method, a horizontal line and band
    for each uncompressed one (the base)."""
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    clean = [row for row in rows if row["condition"] == "clean"]
    for index, method in enumerate(dict.fromkeys(row["method"] for row in clean)):
        own, color = [row for row in clean if row["method"] == method], colors[index % len(colors)]
        for row in (row for row in own if row["tau"] is None):
            axes.axhline(100 * row["accuracy"], color=color, linestyle="--", label=f"{method} (no compression)")
            axes.axhspan(100 * (row["accuracy"] - row["se"]), 100 * (row["accuracy"] + row["se"]), color=color,
                         alpha=0.15)
        points = [row for row in own if row["tau"] is not None]
        if points:
            axes.errorbar([100 * row["tau"] for row in points], [100 * row["accuracy"] for row in points],
                          yerr=[100 * row["se"] for row in points], fmt="o-" if len(points) > 1 else "o",
                          color=color, capsize=3, label=method)
    axes.set_xlabel("tau: share of visual tokens kept (%)")
    axes.set_ylabel("accuracy, clean (%)")
    axes.grid(alpha=0.3)
    if clean:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_moe(evaluations: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """The Mixture-of-Experts figure: accuracy against tau (with s.e. bars) for each method in
    `evaluations` (method -> eval summaries, e.g. moe, the specialists, the nearest specialist
    at unseen taus), and the MoE model's router weight per expert against tau (from the
    summaries that carry router_weights, by expert: tau067 is the expert of tau 1/15).
    Summaries at the same tau (seeds) are averaged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    accuracy_axes, router_axes = figure.subplots(1, 2)
    for method, summaries in evaluations.items():
        by_tau = _by_tau(summaries)
        accuracies = [statistics.fmean(e["accuracy"] for e in group) for group in by_tau.values()]
        questions = [sum(e["samples"] for e in group) for group in by_tau.values()]
        errors = [proportion_standard_error(a, n) for a, n in zip(accuracies, questions)]
        accuracy_axes.errorbar([100 * tau for tau in by_tau], [100 * a for a in accuracies],
                               yerr=[100 * e for e in errors], fmt="o-" if len(by_tau) > 1 else "o", capsize=3,
                               label=method)
    routed = _by_tau([e for summaries in evaluations.values() for e in summaries if e.get("router_weights")])
    for expert in next(iter(routed.values()))[0]["router_weights"] if routed else []:
        router_axes.plot([100 * tau for tau in routed],
                         [statistics.fmean(e["router_weights"][expert] for e in group) for group in routed.values()],
                         "o-", label=f"expert {expert}")
    for axes, ylabel in ((accuracy_axes, "held-out accuracy (%)"), (router_axes, "mean router weight")):
        axes.set_xlabel("tau: share of visual tokens kept (%)")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _by_tau(summaries: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    groups: dict[float, list[dict[str, Any]]] = {}
    for summary in summaries:
        groups.setdefault(round(summary["tau"], 6), []).append(summary)
    return dict(sorted(groups.items()))
