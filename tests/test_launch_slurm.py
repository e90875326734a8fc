"""`divico launch slurm` on a real SLURM cluster (.ci/slurm-up.sh starts one on this machine).

The embedded default pipeline runs as a chain of jobs; a training job is preempted with USR1,
requeues itself and resumes to the same weights as the uninterrupted run; a failing stage
stops its dependants; the 4x A100 scripts are accepted by `sbatch --test-only`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    """Without sbatch these tests are skipped, except in CI (CI=true), where the cluster is part
    of the job (.ci/run) and its absence is a failure."""
    if shutil.which("sbatch") is None:
        reason = "sbatch not on PATH: start the test cluster with .ci/slurm-up.sh (as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)


def launch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["divico", "launch", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def job_fields(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))


def wait_for(predicate, what: str, timeout: float = 300, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def submitted(root: Path) -> dict[str, dict]:
    return {entry["stage"]: entry for entry in json.loads((root / "slurm/jobs.json").read_text())}


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    summary = json.loads((output_dir / "train_summary.json").read_text())
    checkpoint = Path(summary["checkpoint"])
    files = sorted(checkpoint.rglob("*.safetensors"))
    assert files, f"no safetensors in {checkpoint}"
    return {f"{path.relative_to(checkpoint)}:{key}": value for path in files for key, value in load_file(path).items()}


# 160 samples = 20 steps of 8 for base and divico; two tau.
CHAIN_OVERRIDES = ["vars.train.samples=160", "vars.finetune.samples=160", "vars.heldout.samples=40",
                   "vars.taus=[0.1111111,0.1666667]", "vars.unseen_taus=[0.0888889]"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory):
    """configs/pipelines/demo.yaml (the embedded default), shortened: 20 steps per stage, two tau."""
    root = tmp_path_factory.mktemp("chain")
    result = launch("slurm", "--config", "configs/pipelines/demo.yaml", "--wait", f"root={root}", *CHAIN_OVERRIDES,
                    timeout=1200)
    return root, result


def test_chain_runs_in_order(chain) -> None:
    from launch.stages import load_pipeline

    root, result = chain
    assert result.returncode == 0, result.stdout + result.stderr
    pipeline = load_pipeline(REPO / "configs/pipelines/demo.yaml", [f"root={root}", *CHAIN_OVERRIDES], workdir=REPO)
    jobs = submitted(root)
    assert list(jobs) == [stage.name for stage in pipeline.stages]
    start, end = {}, {}
    for stage, entry in jobs.items():
        assert len(entry["tasks"]) == len(pipeline.stage(stage).tasks)
        for task in entry["tasks"]:
            job = f"{entry['job_id']}_{task['index']}" if entry["swept"] else entry["job_id"]
            fields = job_fields(job)
            assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (job, fields)
            start[stage] = min(start.get(stage, datetime.max), datetime.fromisoformat(fields["StartTime"]))
            end[stage] = max(end.get(stage, datetime.min), datetime.fromisoformat(fields["EndTime"]))
    for stage in pipeline.stages:
        for dependency in stage.after:
            assert start[stage.name] >= end[dependency], f"{stage.name} started before {dependency} ended"
        assert all(task.complete() for task in stage.tasks), stage.name
    for run in ("base", "divico-tau111", "divico-tau167"):  # one TensorBoard run per stage and tau
        assert list((root / "tensorboard" / run).glob("events.out.tfevents.*")), run
    for tau in ("tau111", "tau167"):
        assert json.loads((root / f"divico-{tau}/train_summary.json").read_text())["steps"] == 20
        assert sorted(p.name for p in (root / f"logs/divico/{tau}").iterdir()) == ["rank-0.log", "rank-1.log"]
        for name in (f"divico-{tau}", f"fastv-{tau}"):
            evaluation = json.loads((root / f"eval/{name}.json").read_text())
            assert evaluation["samples"] == 40 and evaluation["visual_tokens_kept"] == {"tau111": 11, "tau167": 17}[tau]
    assert f"tensorboard --logdir {root / 'tensorboard'}" in result.stdout
    # Everything is complete now: launching again submits nothing.
    again = launch("slurm", "--config", "configs/pipelines/demo.yaml", f"root={root}", *CHAIN_OVERRIDES)
    assert again.returncode == 0 and "complete already, not submitted: synth, shards" in again.stdout, again.stdout


def test_preempted_job_checkpoints_requeues_and_resumes(chain, tmp_path: Path) -> None:
    """USR1 twice with max_requeues=1: requeued once, then left failed; launching again finishes
    the run from its checkpoint, with the weights of the chain's uninterrupted tau=1/9 run."""
    from pipeline.train.checkpoint import latest_checkpoint

    chain_root, chain_result = chain
    assert chain_result.returncode == 0, chain_result.stdout
    pipeline = tmp_path / "preempt.yaml"
    pipeline.write_text(textwrap.dedent(f"""\
        root: {tmp_path}/run
        cluster:
          partition: local
          setup: source .venv/bin/activate
          env: {{DS_ACCELERATOR: cpu, OMP_NUM_THREADS: "1"}}
          signal_seconds: 60
          max_requeues: 1
        stages:
          divico:
            train:
              config: [configs/debug/tiny.yaml]
              overrides: [model.base={chain_root}/base/model, data.shards={chain_root}/shards/finetune,
                          divico.tau=0.1111111, train.save_every_steps=3]
              output_dir: ${{root}}/divico
            resources: {{tasks_per_node: 2, time: "00:20:00"}}
        """))
    output_dir = tmp_path / "run/divico"
    result = launch("slurm", "--config", str(pipeline))
    assert result.returncode == 0, result.stdout + result.stderr
    job = submitted(tmp_path / "run")["divico"]["job_id"]
    log = tmp_path / f"run/logs/divico/job-{job}.out"

    # 1st warning: checkpoint, exit 3, requeue (Restarts=1), resume.
    first = wait_for(lambda: latest_checkpoint(output_dir), "the first periodic checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: job_fields(job)["Restarts"] == "1" and job_fields(job)["JobState"] == "PENDING",
             "the job to requeue itself")
    preempted_at = latest_checkpoint(output_dir)
    assert preempted_at.name > first.name  # the checkpoint written on the signal
    # Skip the requeue delay, but not within the second of the requeue: slurmd refuses a job
    # credential created in the same second its previous run's was revoked ("credential revoked").
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)

    # 2nd warning: checkpoint and exit 3 again, but max_requeues=1 is used up: the job fails.
    def resumed_and_checkpointed() -> bool:
        if latest_checkpoint(output_dir).name > preempted_at.name:
            return True
        assert job_fields(job)["JobState"] not in ("FAILED", "CANCELLED", "COMPLETED"), log.read_text()
        return False

    wait_for(resumed_and_checkpointed, "a checkpoint after the resume")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: job_fields(job)["JobState"] == "FAILED", "the job to fail after its last requeue")
    fields = job_fields(job)
    assert fields["ExitCode"] == "3:0" and fields["Restarts"] == "1"
    text = log.read_text()
    assert "attempt 1" in text and "attempt 2" in text and "requeueing (restart 1 of at most 1)" in text
    assert "not requeueing again" in text
    assert not (output_dir / "train_summary.json").exists()
    rank0 = (tmp_path / "run/logs/divico/divico/rank-0.log").read_text()
    assert rank0.count("resuming from") == 1

    # Launching again submits only the unfinished stage; it resumes and completes.
    again = launch("slurm", "--config", str(pipeline), "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (tmp_path / "run/logs/divico/divico/rank-0.log").read_text().count("resuming from") == 2

    expected, got = final_weights(chain_root / "divico-tau111"), final_weights(output_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        assert (expected[key] - got[key]).abs().max().item() <= 1e-6, key


def test_failing_stage_stops_its_dependants(tmp_path: Path) -> None:
    pipeline = tmp_path / "fail.yaml"
    pipeline.write_text(textwrap.dedent(f"""\
        root: {tmp_path}/run
        cluster: {{partition: local, setup: source .venv/bin/activate, env: {{DS_ACCELERATOR: cpu}}}}
        stages:
          shards:
            command: divico prep shard --data {tmp_path}/missing.json --image-root {tmp_path} --out ${{root}}/shards
            outputs: ["${{root}}/shards/manifest.json"]
          train:
            after: [shards]
            train: {{config: [configs/debug/tiny.yaml], overrides: ["data.shards=${{root}}/shards"], output_dir: "${{root}}/train"}}
            resources: {{tasks_per_node: 2}}
          report:
            after: [train]
            command: touch ${{root}}/report
            outputs: ["${{root}}/report"]
          bad_train:
            train: {{config: [configs/debug/tiny.yaml], overrides: [data.shards={tmp_path}/no-shards], output_dir: "${{root}}/bad"}}
            resources: {{tasks_per_node: 2}}
        """))
    result = launch("slurm", "--config", str(pipeline), "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    jobs = submitted(tmp_path / "run")
    failed_log = tmp_path / f"run/logs/shards/job-{jobs['shards']['job_id']}.out"
    assert str(failed_log) in result.stdout
    assert "missing.json" in failed_log.read_text()  # the prep's own error message
    for stage in ("train", "report"):
        fields = job_fields(jobs[stage]["job_id"])
        assert fields["JobState"] == "CANCELLED" or fields["Reason"] == "DependencyNeverSatisfied", fields
    # A training failure that is not a preemption is not requeued.
    bad = job_fields(jobs["bad_train"]["job_id"])
    assert bad["JobState"] == "FAILED" and bad["Restarts"] == "0" and bad["ExitCode"] != "3:0", bad
    assert f"{tmp_path}/run/logs/bad_train/bad_train/rank-N.log" in result.stdout
    status = launch("status", "--config", str(pipeline))
    assert status.returncode == 1 and str(failed_log) in status.stdout, status.stdout


def test_a100_scripts_pass_sbatch_test_only(tmp_path: Path) -> None:
    """The 4x A100 example against the cluster's emulated A100 partition (see .ci/slurm-up.sh)."""
    result = launch("slurm", "--config", "configs/pipelines/a100.yaml", "--dry-run", f"root={tmp_path}")
    assert result.returncode == 0, result.stderr
    scripts = sorted((tmp_path / "slurm").glob("*.sbatch"))
    assert [p.name for p in scripts] == [
        "00-shards.sbatch", "01-eval_base.sbatch", "02-eval_fastv.sbatch", "03-eval_training_free.sbatch",
        "04-eval_own_count.sbatch", "05-divico.sbatch", "06-moe.sbatch", "07-baselines.sbatch",
        "08-divico_model.sbatch", "09-moe_model.sbatch", "10-baselines_model.sbatch", "11-moe_warm.sbatch",
        "12-eval_trained.sbatch", "13-eval_divico.sbatch", "14-eval_moe.sbatch", "15-report.sbatch"]
    for script in scripts:
        check = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
        assert check.returncode == 0 and "to start at" in check.stderr, (script, check.stderr)
    # The check has teeth: three nodes, or five GPUs per node, do not exist there.
    for override in ("stages.divico.resources.nodes=3",
                     "stages.divico.resources.gpus_per_node=5 stages.divico.resources.tasks_per_node=5"):
        launch("slurm", "--config", "configs/pipelines/a100.yaml", "--dry-run", f"root={tmp_path}", *override.split())
        check = subprocess.run(["sbatch", "--test-only", str(tmp_path / "slurm/05-divico.sbatch")],
                               capture_output=True, text=True)
        assert check.returncode != 0 and "not available" in check.stderr, (override, check.stderr)
