"""Preemption of `divico train` run as one plain process (as srun starts each rank): SIGUSR1
makes it finish its step, checkpoint and exit with EXIT_PREEMPTED; --resume auto ends the epoch."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from train_helpers import REPO, command, env, run, sample_log, train_args

from pipeline.contract import EXIT_PREEMPTED
from pipeline.train.checkpoint import complete_checkpoints, latest_checkpoint, read_state

pytestmark = pytest.mark.slow

NUM_SAMPLES = 96  # one process, global batch 8 -> 12 optimizer steps
TOTAL_STEPS = 12


def test_sigusr1_checkpoints_exits_3_and_the_run_resumes_to_the_end(tiny_llava_dir, make_shard_dir, tmp_path):
    # No periodic checkpoint before the end: the one found after the signal is the preemption's.
    out = tmp_path / "out"
    args = train_args(tiny_llava_dir, make_shard_dir(NUM_SAMPLES, 2), out, f"train.save_every_steps={TOTAL_STEPS}")
    log = tmp_path / "train.log"  # a file, not a pipe: nothing blocks while the test waits
    with log.open("w") as stderr:
        trainer = subprocess.Popen(command(args), env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    keys = out / "samples" / "rank-00000.tsv"  # a step's sample keys are written once it is done
    deadline = time.time() + 300
    while not (keys.is_file() and keys.stat().st_size) and trainer.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    trainer.send_signal(signal.SIGUSR1)
    trainer.wait(timeout=300)
    stderr = log.read_text()
    assert trainer.returncode == EXIT_PREEMPTED, stderr[-4000:]
    (checkpoint,) = complete_checkpoints(out)
    stopped_at = read_state(checkpoint).step
    assert 1 <= stopped_at < TOTAL_STEPS
    assert f"preempted: checkpoint for step {stopped_at} written; exiting with {EXIT_PREEMPTED}" in stderr

    resumed = run([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {checkpoint} at step {stopped_at}/{TOTAL_STEPS}" in resumed.stderr
    assert read_state(latest_checkpoint(out)).step == TOTAL_STEPS
    # Every sample of the epoch trained exactly once, across the two processes.
    (seen,) = sample_log(out).values()
    assert [step for step, _ in seen] == sorted(step for step, _ in seen)
    assert len(seen) == NUM_SAMPLES == len({key for _, key in seen})
