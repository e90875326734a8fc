"""The stage graph on this machine: `divico launch local` (one process per task) and `divico run`
(every task in the calling process).

Stages run in dependency order; a task whose outputs are complete is skipped, so running again
continues where it stopped (train stages also resume inside the epoch, --resume auto).

`divico launch local`: each task's output is shown and kept in <root>/logs/<stage>/local-<task>.log;
each rank of a train stage logs under <root>/logs/<stage>/<task>/. The cluster's `env` applies
here too; its `setup` lines do not (run from the environment you want). A train stage gets
nodes x tasks_per_node ranks on this machine, through the DeepSpeed launcher.

In-process (`run_in_process`): every task is a `divico ...` command line, parsed and run by the
`divico` CLI in this process, so all train stages share one process group of one rank; the
cluster block and the resources do not apply.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from launch.stages import Pipeline, PipelineError, Stage, Task
from pipeline.contract import EXIT_FAILURE

log = logging.getLogger(__name__)
DEEPSPEED_SCRIPTS = Path(__file__).parent / "deepspeed"


def walk(pipeline: Pipeline, execute: Callable[[Stage, Task], int], *,
         logs: Callable[[Stage, Task], str] | None = None, echo=print, progress: bool = False) -> int:
    """Run every unfinished task with `execute` (returns its exit status); stop at the first failure.
    `logs` says where a task's output is kept, if not only on the terminal. `progress`: a bar over
    all tasks, with the ETA of those left. Returns 0 or the failing exit status."""
    tasks = [(stage, task) for stage in pipeline.stages for task in stage.tasks]
    bar = tqdm(total=len(tasks), desc="tasks", unit="task", disable=not progress, dynamic_ncols=True)
    with bar:
        status = _walk_tasks(tasks, execute, logs, echo if not progress else bar.write, bar)
    if status == 0:
        echo(f"== all stages complete under {pipeline.root}; TensorBoard: tensorboard --logdir "
             f"{pipeline.tensorboard_dir}")
    return status


def _walk_tasks(tasks: list[tuple[Stage, Task]], execute: Callable[[Stage, Task], int],
                logs: Callable[[Stage, Task], str] | None, echo, bar: tqdm) -> int:
    for stage, task in tasks:
        if task.complete():
            echo(f"== {stage.name} {task.label}: outputs complete, skipped")
            bar.update()
            continue
        where = logs(stage, task) if logs else None
        echo(f"== {stage.name} {task.label}: running" + (f" (log: {where})" if where else ""))
        status = execute(stage, task)
        see = f"; see {where}" if where else ""
        if status != 0:
            echo(f"== {stage.name} {task.label}: failed with exit status {status}{see}")
            return status
        missing = [str(path) for path in task.outputs if not path.exists()]
        if missing:
            echo(f"== {stage.name} {task.label}: exited 0 but did not write {missing}{see}")
            return EXIT_FAILURE
        bar.update()
    return 0


def run(pipeline: Pipeline, *, echo=print) -> int:
    """`divico launch local`: each task in its own process, train tasks through single_node.sh."""
    env = {**os.environ, **pipeline.cluster.env}

    def log_file(stage: Stage, task: Task) -> Path:
        return pipeline.log_dir(stage.name) / f"local-{task.label}.log"

    def logs(stage: Stage, task: Task) -> str:
        ranks = f"; rank logs in {pipeline.task_log_dir(task)}" if stage.kind == "train" else ""
        return f"{log_file(stage, task)}{ranks}"

    def execute(stage: Stage, task: Task) -> int:
        return _run_logged(task_command(pipeline, stage, task), log_file(stage, task), pipeline.workdir, env)

    return walk(pipeline, execute, logs=logs, echo=echo)


def task_command(pipeline: Pipeline, stage: Stage, task: Task) -> list[str]:
    if stage.kind == "command":
        return ["bash", "-c", task.command]
    r = stage.resources
    ranks = r.nodes * r.tasks_per_node
    placement = ["--gpus", ",".join(map(str, range(ranks)))] if r.gpus_per_node else ["--ranks", str(ranks)]
    return [str(DEEPSPEED_SCRIPTS / "single_node.sh"), *placement, "--logs", str(pipeline.task_log_dir(task)),
            "--", *task.train_args]


def _run_logged(command: list[str], log: Path, cwd: Path, env: dict[str, str]) -> int:
    """Run `command`, copying its output to the terminal and to `log` (appended: one file per task)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as file, subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            file.write(line)
    return process.returncode


def run_in_process(pipeline: Pipeline, *, echo=print, progress: bool = False) -> int:
    """Every unfinished task in this process, from the pipeline's working directory (relative
    paths in the commands mean the same as for the other runners)."""
    for stage in pipeline.stages:
        for task in stage.tasks:
            if shlex.split(task.command)[:1] != ["divico"]:
                raise PipelineError(f"pipeline file {pipeline.path}: stage {stage.name} ({task.label}): to run in "
                                    f"one process every command must be a `divico ...` line, got: {task.command}")
    cwd = Path.cwd()
    os.chdir(pipeline.workdir)
    try:
        return walk(pipeline, _execute_here, echo=echo, progress=progress)
    finally:
        os.chdir(cwd)


def _execute_here(stage: Stage, task: Task) -> int:
    from pipeline.cli import parse

    try:
        args = parse(shlex.split(task.command)[1:])
    except SystemExit as error:  # argparse has printed the usage and the problem
        return int(error.code or 0)
    try:
        return args.func(args) or 0
    except Exception:  # what a task's own process would print before exiting 1
        log.exception("stage %s (%s) raised", stage.name, task.label)
        return EXIT_FAILURE
