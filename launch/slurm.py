"""`divico launch slurm`: one sbatch script per stage, submitted as an afterok chain, then followed.

Scripts go to <root>/slurm/NN-<stage>.sbatch (templates in launch/slurm/). A train stage runs
one task per GPU under srun (RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/SLURM_LOCALID/
SLURM_NTASKS, MASTER_ADDR = the first node), one array element per sweep point. Submission
skips tasks whose outputs are complete, so running the command again after a failure resumes
the pipeline where it stopped. <root>/slurm/jobs.json records what was submitted for
`divico launch status`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

from launch.stages import Pipeline, Stage, Task
from pipeline.contract import EXIT_PREEMPTED

TEMPLATES = Path(__file__).parent / "slurm"
# Once one rank has exited, the others get this long to follow before srun ends the step:
# ranks leaving after a checkpoint finish within seconds; a crashed rank's peers would
# otherwise wait in a collective until the distributed timeout.
RANK_EXIT_WAIT_SECONDS = 120
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


class LaunchError(RuntimeError):
    """sbatch or scontrol refused something; the message says what and where."""


@dataclass
class SubmittedTask:
    index: int
    label: str
    log: str  # the batch script's output (SLURM's --output for this array element)
    rank_logs: str  # train stages: rank-N.log per rank


@dataclass
class Submission:
    stage: str
    job_id: str
    swept: bool
    script: str
    tasks: list[SubmittedTask]


@dataclass
class TaskState:
    stage: str
    label: str
    job: str  # "123" or "123_1" (array element)
    # SLURM's JobState; "DEPENDENCY_NEVER_SATISFIED" for a job that can never start; "UNKNOWN" once
    # scontrol has forgotten the job (MinJobAge after it ended; sacct still knows it).
    state: str
    exit_code: str
    restarts: int
    log: str
    rank_logs: str

    @property
    def finished(self) -> bool:
        return self.state in FINISHED or self.state in ("DEPENDENCY_NEVER_SATISFIED", "UNKNOWN")


def render(pipeline: Pipeline) -> dict[str, Path]:
    """Write one sbatch script per stage under <root>/slurm/; returns {stage: script}."""

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                                     keep_trailing_newline=True, trim_blocks=True)
    environment.filters["quote"] = lambda value: shlex.quote(str(value))
    out = pipeline.root / "slurm"
    out.mkdir(parents=True, exist_ok=True)
    scripts = {}
    for number, stage in enumerate(pipeline.stages):
        path = out / f"{number:02d}-{stage.name}.sbatch"
        template = environment.get_template(f"{stage.kind}.sbatch.j2")
        path.write_text(template.render(pipeline=pipeline, cluster=pipeline.cluster, stage=stage,
                                        r=stage.resources, log_dir=pipeline.log_dir(stage.name),
                                        script_name=path, exit_preempted=EXIT_PREEMPTED,
                                        rank_exit_wait=RANK_EXIT_WAIT_SECONDS))
        path.chmod(0o755)
        pipeline.log_dir(stage.name).mkdir(parents=True, exist_ok=True)  # sbatch does not create it
        scripts[stage.name] = path
    return scripts


def submit(pipeline: Pipeline, scripts: dict[str, Path]) -> list[Submission]:
    """sbatch every stage with unfinished tasks, each after the stages it depends on."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: submit from a SLURM login node, or use --dry-run "
                          "(scripts only) or `divico launch local`")
    submitted: list[Submission] = []
    job_ids: dict[str, str] = {}
    for stage in pipeline.stages:
        todo = [task for task in stage.tasks if not task.complete()]
        if not todo:
            continue
        command = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
        dependencies = [job_ids[name] for name in stage.after if name in job_ids]
        if dependencies:
            command.append("--dependency=afterok:" + ":".join(dependencies))
        if stage.swept:
            command.append("--array=" + ",".join(str(task.index) for task in todo))
        command.append(str(scripts[stage.name]))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            _cancel(submitted)
            raise LaunchError(f"{shlex.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}"
                              + (f"; cancelled the jobs submitted before it ({', '.join(s.job_id for s in submitted)})"
                                 if submitted else ""))
        job_id = result.stdout.strip().split(";")[0]  # "id" or "id;cluster"
        job_ids[stage.name] = job_id
        submitted.append(Submission(stage=stage.name, job_id=job_id, swept=stage.swept,
                                    script=str(scripts[stage.name]),
                                    tasks=[_submitted_task(pipeline, stage, task, job_id) for task in todo]))
    record = pipeline.root / "slurm" / "jobs.json"
    record.write_text(json.dumps([asdict(s) for s in submitted], indent=2))
    return submitted


def _submitted_task(pipeline: Pipeline, stage: Stage, task: Task, job_id: str) -> SubmittedTask:
    name = f"job-{job_id}_{task.index}.out" if stage.swept else f"job-{job_id}.out"
    return SubmittedTask(index=task.index, label=task.label, log=str(pipeline.log_dir(stage.name) / name),
                         rank_logs=str(pipeline.task_log_dir(task)) if stage.kind == "train" else "")


def _cancel(submitted: list[Submission]) -> None:
    if submitted:
        subprocess.run(["scancel", *(s.job_id for s in submitted)], capture_output=True)


def load_submissions(pipeline: Pipeline) -> list[Submission]:
    record = pipeline.root / "slurm" / "jobs.json"
    if not record.is_file():
        raise LaunchError(f"{record}: not found; nothing was submitted for this pipeline root")
    return [Submission(**{**entry, "tasks": [SubmittedTask(**task) for task in entry["tasks"]]})
            for entry in json.loads(record.read_text())]


def states(submitted: list[Submission]) -> list[TaskState]:
    """The current state of every submitted task, from scontrol (finished jobs stay for MinJobAge)."""
    result = []
    for submission in submitted:
        records = _scontrol_records(submission.job_id)
        for task in submission.tasks:
            record = records.get(task.index if submission.swept else None)
            job = f"{submission.job_id}_{task.index}" if submission.swept else submission.job_id
            if record is None:
                state, exit_code, restarts = "UNKNOWN", "?", 0
            else:
                state, exit_code, restarts = record
            result.append(TaskState(stage=submission.stage, label=task.label, job=job, state=state,
                                    exit_code=exit_code, restarts=restarts, log=task.log, rank_logs=task.rank_logs))
    return result


def _scontrol_records(job_id: str) -> dict[int | None, tuple[str, str, int]]:
    """{array task id (None for a plain job): (state, exit code, restarts)}."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    records: dict[int | None, tuple[str, str, int]] = {}
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(?:^|\s)(JobState|Reason|ExitCode|Restarts|ArrayTaskId)=(\S+)", line))
        if "JobState" not in fields:
            continue
        state = fields["JobState"]
        if state == "PENDING" and fields.get("Reason") == "DependencyNeverSatisfied":
            state = "DEPENDENCY_NEVER_SATISFIED"
        value = (state, fields.get("ExitCode", "?"), int(fields.get("Restarts", 0)))
        if "ArrayTaskId" not in fields:
            records[None] = value
            continue
        for index in _expand_indices(fields["ArrayTaskId"]):  # pending elements share one record
            records[index] = value
    return records


def _expand_indices(spec: str) -> list[int]:
    indices = []
    for part in spec.split("%")[0].split(","):
        low, _, high = part.partition("-")
        indices += range(int(low), int(high or low) + 1)
    return indices


def follow(submitted: list[Submission], *, poll_seconds: float = 5.0, echo=print) -> list[TaskState]:
    """Poll until every submitted task has finished, echoing each state change."""
    seen: dict[str, str] = {}
    while True:
        current = states(submitted)
        for task in current:
            if seen.get(task.job) != task.state:
                seen[task.job] = task.state
                restarts = f", restarts {task.restarts}" if task.restarts else ""
                echo(f"{time.strftime('%H:%M:%S')}  {task.stage:<12} {task.label:<16} {task.job:<10} "
                     f"{task.state}{restarts}")
        if all(task.finished for task in current):
            return current
        time.sleep(poll_seconds)
