"""`divico launch {slurm,local,status}`: run a pipeline file (configs/pipelines/*.yaml)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    launch = commands.add_parser("launch", help="run a pipeline's stage graph on SLURM or on this machine",
                                 description=__doc__)
    modes = launch.add_subparsers(dest="launch_command", required=True)

    slurm = modes.add_parser("slurm", help="render one sbatch script per stage and submit the afterok chain")
    _common(slurm)
    slurm.add_argument("--dry-run", action="store_true", help="only write the scripts (under <root>/slurm/)")
    slurm.add_argument("--wait", action="store_true",
                       help="follow the jobs until all have finished; exit 1 if any failed")
    slurm.set_defaults(func=_slurm)

    local = modes.add_parser("local", help="run the stages here, train stages through the deepspeed launcher")
    _common(local)
    local.set_defaults(func=_local)

    status = modes.add_parser("status", help="the state of the jobs `launch slurm` last submitted")
    _common(status)
    status.set_defaults(func=_status)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True,
                        help="pipeline file, e.g. configs/pipelines/a100.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the pipeline file, e.g. "
                                                     "root=/scratch/me/run2 cluster.account=proj42")


def _load(args: argparse.Namespace):
    from launch.stages import PipelineError, load_pipeline

    try:
        return load_pipeline(args.config, args.overrides)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def _slurm(args: argparse.Namespace) -> int:
    from launch import slurm

    pipeline = _load(args)
    if pipeline is None:
        return 2
    scripts = slurm.render(pipeline)
    print(f"scripts written to {pipeline.root / 'slurm'}: {', '.join(p.name for p in scripts.values())}")
    if args.dry_run:
        return 0
    try:
        submitted = slurm.submit(pipeline, scripts)
    except slurm.LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    _print_submitted(pipeline, submitted)
    if not args.wait or not submitted:
        return 0
    return _report(slurm.follow(submitted))


def _print_submitted(pipeline, submitted) -> None:
    from rich.console import Console
    from rich.table import Table

    done = [stage.name for stage in pipeline.stages if stage.name not in {s.stage for s in submitted}]
    table = Table("stage", "job", "tasks", "after", "log")
    for submission in submitted:
        log = pipeline.log_dir(submission.stage) / f"job-{submission.job_id}{'_<task>' if submission.swept else ''}.out"
        table.add_row(submission.stage, submission.job_id, " ".join(t.label for t in submission.tasks),
                      " ".join(pipeline.stage(submission.stage).after), str(log))
    console = Console(width=200, markup=False)  # paths and labels are plain text
    console.print(table)
    if done:
        console.print(f"complete already, not submitted: {', '.join(done)}")
    console.print(f"logs: {pipeline.root / 'logs'}/<stage>/ (train ranks: <stage>/<task>/rank-N.log)")
    console.print(f"TensorBoard: tensorboard --logdir {pipeline.tensorboard_dir}")
    console.print(f"follow: squeue -u $USER, or divico launch status --config {pipeline.path}")


def _report(task_states) -> int:
    """A table of every task's state; the failed ones with their logs. 1 if any did not complete."""
    from rich.console import Console
    from rich.table import Table

    table = Table("stage", "task", "job", "state", "exit", "restarts")
    for task in task_states:
        table.add_row(task.stage, task.label, task.job, task.state, task.exit_code, str(task.restarts))
    console = Console(width=200, markup=False)  # paths and labels are plain text
    console.print(table)
    failed = [task for task in task_states if task.finished and task.state != "COMPLETED"]
    for task in failed:
        if task.state == "UNKNOWN":
            console.print(f"{task.stage} {task.label}: job {task.job} is no longer known to scontrol; "
                          f"ask sacct -j {task.job}; log {task.log}")
            continue
        if not Path(task.log).exists():
            console.print(f"{task.stage} {task.label}: {task.state}, never started (a stage it depends on "
                          "failed, or it was cancelled)")
            continue
        rank_logs = f"; rank logs: {task.rank_logs}/rank-N.log" if task.rank_logs else ""
        console.print(f"{task.stage} {task.label} FAILED ({task.state}, exit {task.exit_code}): log {task.log}{rank_logs}")
    return 1 if failed else 0


def _status(args: argparse.Namespace) -> int:
    from launch import slurm

    pipeline = _load(args)
    if pipeline is None:
        return 2
    try:
        submitted = slurm.load_submissions(pipeline)
    except slurm.LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    task_states = slurm.states(submitted)
    code = _report(task_states)
    return code if all(task.finished for task in task_states) else 0


def _local(args: argparse.Namespace) -> int:
    from launch import local

    pipeline = _load(args)
    if pipeline is None:
        return 2
    return local.run(pipeline)
