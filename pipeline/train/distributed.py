"""Joining the job: rank variables from srun, a one-process group, preemption signals, and the
shared-memory segment DeepSpeed's CPU all-reduce leaves behind.

`divico train` runs under the deepspeed launcher, torchrun, srun (one task per GPU: SLURM_* are
mapped to RANK/WORLD_SIZE/LOCAL_RANK; MASTER_ADDR/MASTER_PORT come from the job script) or as one
plain process. SIGUSR1/SIGTERM only set a flag: the loop finishes its step, all ranks agree at
the step boundary, a checkpoint is written and the process exits with EXIT_PREEMPTED.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

from pipeline.contract import EXIT_PREEMPTED

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_preempt_requested = False


class TrainingError(RuntimeError):
    """The run cannot continue (bad resume point, non-finite loss, srun without MASTER_ADDR); the
    message says why."""


def map_slurm_env() -> None:
    """srun without a launcher sets SLURM_* only; torch.distributed reads RANK/WORLD_SIZE/LOCAL_RANK."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    if "MASTER_ADDR" not in os.environ:
        raise TrainingError("srun with several tasks: export MASTER_ADDR (the first host of "
                            "$SLURM_JOB_NODELIST) and MASTER_PORT in the job script")
    os.environ.setdefault("MASTER_PORT", "29500")


def single_process_env() -> None:
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def preemption_requested() -> bool:
    """True once SIGUSR1 or SIGTERM arrived (after install_preemption_handlers)."""
    return _preempt_requested


def install_preemption_handlers() -> None:
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, _request_preemption)


def _request_preemption(signum: int, _frame) -> None:
    global _preempt_requested
    _preempt_requested = True
    log.warning("received %s: finishing this step, then checkpointing and exiting with %d",
                signal.Signals(signum).name, EXIT_PREEMPTED)


def release_cpu_allreduce_buffer() -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp
    names it deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank} and never unlinks
    it): each CPU run would otherwise leave 66 MB per rank in memory until reboot. Called at exit,
    when every rank has long opened the others' segments (a mapped segment outlives its name)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{os.environ.get('RANK', '0')}")
    Path("/dev/shm", name).unlink(missing_ok=True)
