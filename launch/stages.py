"""The stage graph as data: a pipeline YAML -> validated stages -> one Task per stage and sweep point.

A pipeline file (configs/pipelines/*.yaml) names a root directory, a cluster, and the stages:

    root: runs/sweep                      # every output, log and TensorBoard run lands here
    cluster: {partition: gpu, ...}        # see ClusterConfig
    stages:
      shards:                             # a "command" stage: one command line, one process
        command: divico prep shard ... --out ${root}/data/shards
        outputs: [${root}/data/shards/manifest.json]
      divico:                             # a "train" stage: `divico train` on every rank
        after: [shards]
        sweep: {tau: "${paper_taus:}"}      # one task (SLURM array element) per value
        train:
          config: [configs/llava15_lora.yaml]
          overrides: [data.shards=${root}/data/shards, divico.tau=${tau}]
          output_dir: ${root}/${run_name:divico,${tau}}   # runs/sweep/divico-tau111
        export: {options: --dtype fp32}   # adds the stage divico_model: each run's export, <output_dir>/model
        resources: {nodes: 1, tasks_per_node: 4, gpus_per_node: 4, time: "24:00:00"}
      eval:
        after: [divico_model]
        sweep: {tau: "${paper_taus:}"}
        command: divico eval model=${stages.divico.train.output_dir}/model data=... divico.tau=${tau}

`include: [include/synthetic_base.yaml]` merges other pipeline files (relative to this one) under
it: their stages come first, and this file's keys win (e.g. an included stage's resources).

Strings are OmegaConf interpolations: ${root}, the sweep variables (${tau}), the free values
under `vars:` (${vars.samples}), any other key of the file (${stages.base.train.output_dir})
and resolvers: OmegaConf's (${oc.env:USER}) and the project's (pipeline/resolvers.py: ${paper_taus:},
${run_name:STAGE,${tau}}, ${nearest_tau:${tau},${vars.taus}}, ...). A tau sweep point is labelled tau111, any other one key-value
(`method-lora`); a train task's TensorBoard run is <stage>-<label>. A stage is
complete when all its outputs exist; a train stage's output is <output_dir>/train_summary.json,
which `divico train` writes only after the epoch's last step. New stages (the MoE stage,
evaluation) are new entries in the file: the SLURM and local runners know only these two kinds.
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.contract import TRAIN_SUMMARY_FILE, tau_label
from pipeline.resolvers import register_resolvers

register_resolvers()  # ${paper_taus:}, ${run_name:divico,${tau}} and the others


class PipelineError(ValueError):
    """The pipeline file is invalid; the message names the file, the stage and the field."""


@dataclass
class Resources:
    nodes: int = 1
    tasks_per_node: int = 1  # train stages: ranks per node (one per GPU on a GPU cluster)
    gpus_per_node: int = 0  # 0: CPU ranks (DS_ACCELERATOR=cpu)
    cpus_per_task: int = 1
    mem: str | None = None  # per node, sbatch syntax ("480G"); null: the partition's default
    time: str = "01:00:00"  # sbatch --time


@dataclass
class TrainSpec:
    config: list[str] = field(default_factory=list)  # recipe YAMLs, merged in order
    overrides: list[str] = field(default_factory=list)  # key=value, after the recipes
    output_dir: str = "???"


@dataclass
class ExportSpec:
    options: str = ""  # after `divico export DIR --out DIR/model`, e.g. "--dtype fp32"
    resources: Resources = field(default_factory=Resources)


@dataclass
class StageConfig:
    after: list[str] = field(default_factory=list)
    command: str | None = None  # a command stage: one shell command line
    train: TrainSpec | None = None  # a train stage
    # A train stage's export: the stage <name>_model, `divico export` of each task's
    # output_dir into output_dir/model, at the same sweep points.
    export: ExportSpec | None = None
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)


@dataclass
class ClusterConfig:
    partition: str | None = None
    account: str | None = None
    # Shell lines at the top of every job, run in the launch directory: activate the environment.
    setup: str = ""
    env: dict[str, str] = field(default_factory=dict)  # exported in every job and local run
    gpu_type: str | None = None  # e.g. "a100" -> --gpus-per-node=a100:4
    signal_seconds: int = 300  # the preemption / time-limit warning comes this long before the end
    max_requeues: int = 5  # a job preempted more often than this fails instead of requeueing
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH options, e.g. "--qos=high"


@dataclass
class PipelineConfig:
    # Pipeline files merged under this one, in order (relative to it): the stages and vars
    # several pipelines share. This file's keys win; its new stages come after theirs.
    include: list[str] = field(default_factory=list)
    root: str = "???"
    vars: dict[str, Any] = field(default_factory=dict)  # free values for ${vars.NAME}, e.g. sizes
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One stage at one sweep point: a SLURM array element, or one local run."""

    stage: str
    index: int  # position in the stage's sweep (the SLURM array task id)
    label: str  # "tau111", "recipe-lora", or the stage name when the stage has no sweep
    command: str  # a shell command line
    outputs: tuple[Path, ...]
    train_args: tuple[str, ...] = ()  # train stages: the arguments after `divico train`

    def complete(self) -> bool:
        return bool(self.outputs) and all(path.exists() for path in self.outputs)


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # "command" or "train"
    after: tuple[str, ...]
    resources: Resources
    tasks: tuple[Task, ...]
    swept: bool  # True: a SLURM array, even of one element


@dataclass(frozen=True)
class Pipeline:
    path: Path
    root: Path
    workdir: Path  # commands run here; relative paths in them are relative to it
    cluster: ClusterConfig
    stages: tuple[Stage, ...]  # in dependency order
    vars: dict[str, Any] = field(default_factory=dict)  # the file's `vars`, resolved

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def upstream(self, names: Iterable[str]) -> set[str]:
        """The stages `names` need, transitively, without `names` themselves."""
        after = {stage.name: stage.after for stage in self.stages}
        needed: set[str] = set()
        todo = [before for name in names for before in after.get(name, ())]
        while todo:
            name = todo.pop()
            if name not in needed and name in after:  # a stage dropped from this pipeline is not needed
                needed.add(name)
                todo += after[name]
        return needed

    def restricted(self, names: Iterable[str]) -> Pipeline:
        """This pipeline with only the stages `names` (PipelineError for an unknown one) and
        those they need."""
        names = set(names)
        unknown = names - {stage.name for stage in self.stages}
        if unknown:
            raise PipelineError(f"pipeline file {self.path}: no stage(s) {sorted(unknown)}; "
                                f"stages: {[stage.name for stage in self.stages]}")
        keep = names | self.upstream(names)
        return dataclasses.replace(self, stages=tuple(stage for stage in self.stages if stage.name in keep))

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tensorboard"

    def log_dir(self, stage: str) -> Path:
        return self.root / "logs" / stage

    def task_log_dir(self, task: Task) -> Path:
        """Per-rank logs of one task."""
        return self.log_dir(task.stage) / task.label


def load_pipeline(path: str | Path, overrides: list[str] | None = None,
                  workdir: str | Path | None = None) -> Pipeline:
    """Read, validate and expand a pipeline file. `overrides` are OmegaConf dotlist entries."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline file {path}: not found")
    workdir = Path(workdir or Path.cwd()).resolve()
    try:
        raw = OmegaConf.merge(OmegaConf.structured(PipelineConfig), *_included(path),
                              OmegaConf.from_dotlist(list(overrides or [])))
    except PipelineError:
        raise
    except Exception as error:  # omegaconf names the key and the problem
        raise PipelineError(f"pipeline file {path}: {error}") from error
    _add_export_stages(path, raw)
    if OmegaConf.is_missing(raw, "root"):
        raise PipelineError(f"pipeline file {path}: `root` (where outputs and logs go) is not set")
    root = Path(str(raw.root))
    root = root if root.is_absolute() else workdir / root
    raw.root = str(root)
    if not raw.stages:
        raise PipelineError(f"pipeline file {path}: no stages")
    order = _dependency_order(path, raw)
    # Interpolations resolve against the whole file plus each sweep point's variables, set in
    # turn on one copy (building a copy per task took seconds for the bench's 200-odd tasks).
    variables = {variable for stage in raw.stages.values() for variable in stage.sweep}
    scope = OmegaConf.create({**OmegaConf.to_container(raw, resolve=False), **dict.fromkeys(variables, "???")})
    stages = tuple(_expand_stage(path, raw, scope, name, workdir) for name in order)
    cluster = OmegaConf.to_object(raw.cluster)
    if cluster.signal_seconds < 1 or cluster.max_requeues < 0:
        raise PipelineError(f"pipeline file {path}: cluster.signal_seconds must be >= 1 and "
                            "cluster.max_requeues >= 0")
    try:
        variables = OmegaConf.to_container(raw.vars, resolve=True)
    except Exception as error:
        raise PipelineError(f"pipeline file {path}: vars: {error}") from error
    return Pipeline(path=path.resolve(), root=root, workdir=workdir, cluster=cluster, stages=stages, vars=variables)


def _included(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The file's includes (each with its own, depth first), then the file itself."""
    if path.resolve() in seen:
        raise PipelineError(f"pipeline file {path}: includes itself ({' -> '.join(map(str, seen))})")
    own = OmegaConf.load(path)
    configs = []
    for include in own.get("include", []):
        included = path.parent / include
        if not included.is_file():
            raise PipelineError(f"pipeline file {path}: include {include}: not found (relative to {path.parent})")
        configs += _included(included, (*seen, path.resolve()))
    return [*configs, own]


def _add_export_stages(path: Path, raw: DictConfig) -> None:
    """For each train stage with `export`, the command stage <name>_model right after it."""
    stages = {}
    for name, stage in raw.stages.items():
        stages[name] = stage
        if stage.export is None:
            continue
        if stage.train is None or f"{name}_model" in raw.stages:
            raise PipelineError(f"pipeline file {path}: stage {name}: `export` needs a train stage and adds "
                                f"the stage {name}_model, which the file must not declare itself")
        model = f"${{stages.{name}.train.output_dir}}/model"
        stages[f"{name}_model"] = OmegaConf.merge(OmegaConf.structured(StageConfig), {
            "after": [name], "sweep": stage.sweep, "resources": stage.export.resources,
            "command": f"divico export ${{stages.{name}.train.output_dir}} --out {model} {stage.export.options}",
            "outputs": [model]})
    raw.stages = stages


def _dependency_order(path: Path, raw: DictConfig) -> list[str]:
    graph = {}
    for name, stage in raw.stages.items():
        unknown = [dep for dep in stage.after if dep not in raw.stages]
        if unknown:
            raise PipelineError(f"pipeline file {path}: stage {name}: `after` names unknown stage(s) "
                                f"{unknown}; stages are {list(raw.stages)}")
        graph[name] = list(stage.after)
    try:
        # Ties keep the file's order, so the graph reads top to bottom like the file.
        sorter = TopologicalSorter(graph)
        sorter.prepare()
        order = []
        while sorter.is_active():
            ready = sorted(sorter.get_ready(), key=list(raw.stages).index)
            order += ready
            sorter.done(*ready)
        return order
    except CycleError as error:
        raise PipelineError(f"pipeline file {path}: the stages' `after` lists form a cycle: "
                            f"{' -> '.join(error.args[1])}") from error


def _expand_stage(path: Path, raw: DictConfig, scope: DictConfig, name: str, workdir: Path) -> Stage:
    where = f"pipeline file {path}: stage {name}"
    stage = raw.stages[name]
    # Unresolved: ${tau} and friends only have values per sweep point (see _task).
    spec = OmegaConf.to_container(stage, resolve=False)
    has_command, has_train = spec["command"] is not None, spec["train"] is not None
    if has_command == has_train:
        raise PipelineError(f"{where}: give exactly one of `command` (a shell command) or `train`")
    kind = "command" if has_command else "train"
    resources = OmegaConf.to_object(stage.resources)
    _check_resources(where, kind, resources)
    for variable, values in stage.sweep.items():
        if variable in raw:
            raise PipelineError(f"{where}: sweep variable `{variable}` hides the top-level key of that name")
        if not values:
            raise PipelineError(f"{where}: sweep variable `{variable}` has no values")
        if variable == "tau" and not all(isinstance(value, (int, float)) for value in values):
            raise PipelineError(f"{where}: sweep variable `tau` takes kept fractions (numbers), got {list(values)}")
    variables = list(stage.sweep)
    points = [dict(zip(variables, values)) for values in itertools.product(*stage.sweep.values())]
    for variable in set(scope) - set(raw):
        scope[variable] = "???"  # another stage's sweep variable is unset here, not stale
    tasks = tuple(_task(where, raw, scope, name, kind, index, point, workdir) for index, point in enumerate(points))
    return Stage(name=name, kind=kind, after=tuple(stage.after), resources=resources, tasks=tasks,
                 swept=bool(variables))


def _check_resources(where: str, kind: str, r: Resources) -> None:
    if min(r.nodes, r.tasks_per_node, r.cpus_per_task) < 1 or r.gpus_per_node < 0:
        raise PipelineError(f"{where}: resources need nodes, tasks_per_node, cpus_per_task >= 1 and "
                            f"gpus_per_node >= 0 (got {r})")
    if kind == "command" and (r.nodes != 1 or r.tasks_per_node != 1):
        raise PipelineError(f"{where}: a command stage is one process: nodes and tasks_per_node must be 1")
    if kind == "train" and r.gpus_per_node and r.tasks_per_node != r.gpus_per_node:
        raise PipelineError(f"{where}: one rank per GPU: tasks_per_node ({r.tasks_per_node}) must equal "
                            f"gpus_per_node ({r.gpus_per_node})")


def _task(where: str, raw: DictConfig, scope: DictConfig, name: str, kind: str, index: int,
          point: dict[str, Any], workdir: Path) -> Task:
    for variable, value in point.items():
        scope[variable] = value
    label = "-".join(tau_label(value) if key == "tau" else f"{key}-{value}" for key, value in point.items()) or name
    try:
        stage = OmegaConf.to_container(scope.stages[name], resolve=True, throw_on_missing=True)
    except Exception as error:
        raise PipelineError(f"{where} ({label}): {error}") from error
    outputs = [Path(output) for output in stage["outputs"]]
    if kind == "command":
        return Task(stage=name, index=index, label=label, command=_tidy(stage["command"]), outputs=tuple(outputs))
    # One TensorBoard run per stage and sweep point: run_name(name, tau) for a tau sweep.
    run = f"{name}-{label}" if point else name
    train_args, output_dir = _train_args(where, raw, run, stage["train"], workdir)
    return Task(stage=name, index=index, label=label, command=shlex.join(["divico", "train", *train_args]),
                outputs=(*outputs, output_dir / TRAIN_SUMMARY_FILE), train_args=train_args)


def _tidy(command: str) -> str:
    """The command with single spaces between words (an empty optional value leaves two),
    unless that would change a quoted word."""
    tidy = " ".join(command.split())
    return tidy if shlex.split(tidy) == shlex.split(command) else command.strip()


def _train_args(where: str, raw: DictConfig, run: str, train: dict[str, Any],
                workdir: Path) -> tuple[tuple[str, ...], Path]:
    if not train["config"]:
        raise PipelineError(f"{where}: train.config lists no recipe YAML")
    # A wrong path should fail now, not after hours in the queue.
    missing = [recipe for recipe in train["config"] if not (workdir / recipe).is_file()]
    if missing:
        raise PipelineError(f"{where}: train.config {missing}: not found (relative paths are relative "
                            f"to {workdir}, the directory you launch from)")
    output_dir = Path(train["output_dir"])
    # The launcher owns where a run writes and how its TensorBoard run is named, so that all
    # stages and sweep points share one TensorBoard root, one run each (e.g. divico-tau111).
    owned = {"train.output_dir": str(output_dir), "train.stage": run,
             "train.tensorboard_dir": str(Path(raw.root) / "tensorboard")}
    clash = [o for o in train["overrides"] if o.split("=", 1)[0] in owned]
    if clash:
        raise PipelineError(f"{where}: {clash}: set these through the stage (train.output_dir) and "
                            "the pipeline root, not as overrides")
    args = []
    for recipe in train["config"]:
        args += ["--config", recipe]
    args += train["overrides"] + [f"{key}={value}" for key, value in owned.items()] + ["--resume", "auto"]
    return tuple(args), output_dir
