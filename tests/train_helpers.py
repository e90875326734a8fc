"""Running `divico train` the way users do (one process, or the real deepspeed launcher) from tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_RECIPE = REPO / "configs" / "debug" / "tiny.yaml"


def env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_args(model_dir: Path, shards: Path, output_dir: Path, *overrides: str, recipes: tuple[Path, ...] = ()
               ) -> list[str]:
    """The tiny recipe, then `recipes` merged over it, then the overrides."""
    configs = [arg for recipe in (TINY_RECIPE, *recipes) for arg in ("--config", str(recipe))]
    return ["train", *configs, f"model.base={model_dir}", f"data.shards={shards}",
            f"train.output_dir={output_dir}", f"train.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}",
            "train.log_sample_keys=true", *overrides]


def command(args: list[str], ranks: int = 1, port: int | None = None) -> list[str]:
    if ranks == 1:
        return [str(BIN / "divico"), *args]
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port or free_port()),
            str(BIN / "divico"), *args]


def run(args: list[str], ranks: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """`divico ARGS` on `ranks` CPU ranks; a run that ends well leaves no DeepSpeed all-reduce
    segment in /dev/shm (pipeline.train.distributed.release_cpu_allreduce_buffer)."""
    port = free_port()
    result = subprocess.run(command(args, ranks, port), env=env(), cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert result.returncode != 0 or not left, f"the run left DeepSpeed's CPU all-reduce segments: {left}"
    return result


def preempt_after_first_checkpoint(args: list[str], output_dir: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    """Start `divico train`, and once its first checkpoint exists send SIGTERM to every process of
    the job, as SLURM does at a time limit or preemption; the launcher's exit and output."""
    from pipeline.train.checkpoint import latest_checkpoint

    launcher = subprocess.Popen(command(args, ranks), env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while latest_checkpoint(output_dir) is None and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(launcher.pid, signal.SIGTERM)
    output, _ = launcher.communicate(timeout=120)
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, output)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """Every trained weight of the newest checkpoint: the LoRA adapter + the other trainables."""
    from pipeline.train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(output_dir)
    weights = load_file(str(newest / "trainables.safetensors"))
    weights.update({f"adapter.{k}": v for k, v in load_file(str(newest / "adapter" / "adapter_model.safetensors")).items()})
    return weights


def sample_log(output_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """rank file -> [(step, key), ...] as the trainer recorded them."""
    return {name: [(step, key) for step, key, *_ in rows] for name, rows in sample_log_rows(output_dir).items()}


def sample_log_rows(output_dir: Path) -> dict[str, list[tuple]]:
    """rank file -> [(step, key[, keep ratio]), ...]: the rate column of a MoE step included."""
    def row(line: str) -> tuple:
        step, key, *rate = line.split("\t")
        return (int(step), key, *map(float, rate))

    return {path.name: [row(line) for line in path.read_text().splitlines()]
            for path in sorted((output_dir / "samples").glob("rank-*.tsv"))}


def scalars(output_dir: Path) -> dict[str, list[float]]:
    """tag -> values, in step order, of the run's TensorBoard event files (read by tensorboard itself)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (output_dir / "tensorboard").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
