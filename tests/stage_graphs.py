"""The rendered stage graph of every shipped pipeline, as plain data, for tests/test_stage_graphs.py.

Each task becomes (stage, after, label, resources, argv: its command's words, outputs); a train task also carries its training
run's effective config (the recipes and overrides merged), so moving a fact from one YAML to
another is invisible here while any change to what runs is not. Paths under the pipeline root
read ROOT, paths under the repository REPO.

    python tests/stage_graphs.py --write   # after an intended change: rewrite the snapshot
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from launch.stages import load_pipeline
from pipeline.bench.accuracy import QUICK
from pipeline.train.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "tests" / "fixtures" / "stage_graphs.json"
ROOT = "/ROOT"
# Each shipped pipeline, as `divico launch` renders it, and the bench as `divico bench accuracy --quick` does.
PIPELINES = {
    "demo": ("configs/pipelines/demo.yaml", []),
    "a100": ("configs/pipelines/a100.yaml", []),
    "bench_accuracy": ("configs/pipelines/bench_accuracy.yaml", []),
    "bench_accuracy_quick": ("configs/pipelines/bench_accuracy.yaml", QUICK),
}


def effective_config(train_args: tuple[str, ...]) -> list[str]:
    """The config `divico train TRAIN_ARGS` would run with, as the `key=value` lines where it
    differs from the schema's defaults."""
    args = list(train_args)
    recipes = [args[i + 1] for i, arg in enumerate(args) if arg == "--config"]
    overrides = [arg for i, arg in enumerate(args) if "=" in arg and args[i - 1] != "--config"]
    config, defaults = (flat(to_dict(load_config(paths, values)))
                        for paths, values in (([REPO / recipe for recipe in recipes], overrides), ([], [])))
    return [f"{key}={value}" for key, value in config.items() if defaults.get(key) != value]


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    items: dict[str, Any] = {}
    for key, value in tree.items():
        items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return items


def rendered(name: str) -> list[dict[str, Any]]:
    path, overrides = PIPELINES[name]
    pipeline = load_pipeline(REPO / path, [f"root={ROOT}", *overrides], workdir=REPO)
    tasks = []
    for stage in pipeline.stages:
        for task in stage.tasks:
            entry = {"stage": stage.name, "after": list(stage.after), "label": task.label,
                     "resources": dataclasses.asdict(stage.resources), "argv": shlex.split(task.command),
                     "outputs": [str(output) for output in task.outputs]}
            if task.train_args:
                entry["config"] = effective_config(task.train_args)
            tasks.append(entry)
    return json.loads(json.dumps(tasks).replace(str(REPO), "REPO"))


def rendered_all() -> dict[str, list[dict[str, Any]]]:
    return {name: rendered(name) for name in PIPELINES}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {SNAPSHOT.relative_to(REPO)}")
    args = parser.parse_args()
    graphs = rendered_all()
    if args.write:
        SNAPSHOT.write_text(json.dumps(graphs, indent=1, sort_keys=True) + "\n")
    print(shlex.join([f"{name}:{len(tasks)}" for name, tasks in graphs.items()]))
