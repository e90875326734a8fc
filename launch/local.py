"""`divico launch local`: the stage graph on this machine, train stages through the DeepSpeed launcher.

Stages run in dependency order; a task whose outputs are complete is skipped, so running the
command again continues where it stopped (train stages also resume inside the epoch,
--resume auto). Each task's output is shown and kept in <root>/logs/<stage>/local-<task>.log;
each rank of a train stage logs under <root>/logs/<stage>/<task>/. The cluster's `env` applies
here too; its `setup` lines do not (run from the environment you want). A train stage gets
nodes x tasks_per_node ranks on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launch.stages import Pipeline, Stage, Task

DEEPSPEED_SCRIPTS = Path(__file__).parent / "deepspeed"


def run(pipeline: Pipeline, *, echo=print) -> int:
    """Run every unfinished task; stop at the first failure. Returns 0 or the failing exit status."""
    env = {**os.environ, **pipeline.cluster.env}
    for stage in pipeline.stages:
        for task in stage.tasks:
            if task.complete():
                echo(f"== {stage.name} {task.label}: outputs complete, skipped")
                continue
            log = pipeline.log_dir(stage.name) / f"local-{task.label}.log"
            echo(f"== {stage.name} {task.label}: running (log: {log})")
            status = _run_logged(task_command(pipeline, stage, task), log, pipeline.workdir, env)
            if status != 0:
                rank_logs = f"; rank logs in {pipeline.task_log_dir(task)}" if stage.kind == "train" else ""
                echo(f"== {stage.name} {task.label}: failed with exit status {status}; see {log}{rank_logs}")
                return status
            missing = [str(path) for path in task.outputs if not path.exists()]
            if missing:
                echo(f"== {stage.name} {task.label}: exited 0 but did not write {missing}; see {log}")
                return 1
    echo(f"== all stages complete under {pipeline.root}; TensorBoard: tensorboard --logdir {pipeline.tensorboard_dir}")
    return 0


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
