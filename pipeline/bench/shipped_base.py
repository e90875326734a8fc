"""The grid task's base model, trained once and kept in the repository (pipeline/bench/grid_base/).

Training the base is the benchmark's longest stage, and every method row starts from it, so
`divico bench accuracy` reuses the shipped export when the graph would train the same base: the
same grid side and training split (vars.grid_side, vars.train) and the same base recipe. It is
installed as DIR/base/model (each file checked against its sha256 first) and the graph's
tiny_llava, base and base_model stages are dropped. `--retrain-base` trains it instead.

`divico bench accuracy --ship-base` writes the shipped folder from a trained DIR/base: the export
in fp16, base.json (the vars, the recipe, the command, steps and minutes, each file's sha256),
and the training's record (train_summary.json, the learning curve's curve.jsonl when there is one).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from launch.stages import Pipeline
from pipeline.contract import TRAIN_SUMMARY_FILE
from pipeline.durable import folder_written_whole, sha256_file

SHIPPED = Path(__file__).parent / "grid_base"
MANIFEST = "base.json"
RECORD = "record"  # train_summary.json and curve.jsonl of the run that made it
BASE_STAGES = ("tiny_llava", "base", "base_model")  # what the shipped base replaces


class ShippedBaseError(RuntimeError):
    """The shipped base's files do not match their recorded sha256."""


# Settings of the base's recipe that do not change the model it trains: paths, logging,
# checkpoint cadence, and DiViCo's (the base trains without compression).
_NOT_TRAINING = {"model": ("base",), "data": ("shards", "num_workers"),
                 "train": ("output_dir", "tensorboard_dir", "deepspeed_config", "stage", "save_every_steps",
                           "log_every_steps", "keep_last", "max_steps", "log_sample_keys", "dist_timeout_minutes")}


def trained_as(pipeline: Pipeline) -> dict[str, Any]:
    """What decides the base model: the grid, the training split and the resolved recipe."""
    from pipeline.cli import parse
    from pipeline.train.config import load_config, to_dict

    (task,) = pipeline.stage("base").tasks
    args = parse(["train", *task.train_args])
    recipe = to_dict(load_config(args.config, args.overrides))
    recipe.pop("divico")
    for section, keys in _NOT_TRAINING.items():
        for key in keys:
            recipe[section].pop(key)
    return {"grid_side": pipeline.vars["grid_side"], "train": pipeline.vars["train"], "recipe": recipe}


def applies(pipeline: Pipeline, shipped: Path = SHIPPED) -> bool:
    manifest = shipped / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text())["trained_as"] == trained_as(pipeline)


def install(pipeline: Pipeline, shipped: Path = SHIPPED) -> Pipeline:
    """Copy the shipped model to DIR/base/model (verified, with its manifest) and return the
    pipeline without the stages that would train it; a DIR whose base was trained here keeps it."""
    manifest = json.loads((shipped / MANIFEST).read_text())
    target = pipeline.root / "base" / "model"
    if target.is_dir() and not (target / MANIFEST).is_file():
        return pipeline  # trained by an earlier run in DIR (--retrain-base): its stages are complete
    if not target.is_dir():
        for name, digest in manifest["sha256"].items():
            if sha256_file(shipped / name) != digest:
                raise ShippedBaseError(f"{shipped / name}: sha256 differs from {shipped / MANIFEST}'s; "
                                       "restore it from git or pass --retrain-base")
        target.parent.mkdir(parents=True, exist_ok=True)
        with folder_written_whole(target) as partial:
            partial.mkdir()
            for name in [*manifest["sha256"], MANIFEST]:
                shutil.copy(shipped / name, partial / name)
    return dataclasses.replace(pipeline, stages=tuple(s for s in pipeline.stages if s.name not in BASE_STAGES))


def describe(pipeline: Pipeline) -> str:
    """One line for report headers: where DIR's base model came from and what it took."""
    summary = pipeline.root / "base" / TRAIN_SUMMARY_FILE
    if summary.is_file():
        return f"trained here, {json.loads(summary.read_text())['run/seconds'] / 60:.1f} min"
    manifest = pipeline.root / "base" / "model" / MANIFEST
    if not manifest.is_file():
        return "none yet"
    recorded = json.loads(manifest.read_text())
    return (f"the repository's export ({recorded['steps']} steps, {recorded['minutes']} min of training; "
            f"`{recorded['command']}`)")


def ship(pipeline: Pipeline, shipped: Path = SHIPPED) -> Path:
    """Export the trained DIR/base in fp16 into `shipped` with its manifest and record."""
    from pipeline.train.export import export

    run = pipeline.root / "base"
    summary = run / TRAIN_SUMMARY_FILE
    if not summary.is_file():
        raise ShippedBaseError(f"{run}: no finished base training ({TRAIN_SUMMARY_FILE}); train it first")
    if shipped.exists():
        shutil.rmtree(shipped)
    export(run, shipped, dtype=torch.float16)
    files = sorted(path.name for path in shipped.iterdir() if path.is_file())
    (shipped / RECORD).mkdir()
    shutil.copy(summary, shipped / RECORD / TRAIN_SUMMARY_FILE)
    curve = pipeline.root / "curve" / "curve.jsonl"
    if curve.is_file():
        shutil.copy(curve, shipped / RECORD / curve.name)
    finished = json.loads(summary.read_text())
    manifest = {"trained_as": trained_as(pipeline), "command": shlex.join(["divico", *sys.argv[1:]]),
                "steps": finished["steps"], "minutes": round(finished["run/seconds"] / 60, 1),
                "sha256": {name: sha256_file(shipped / name) for name in files}}
    (shipped / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return shipped
