"""The deepspeed launcher scripts with 2 CPU ranks: `divico launch local` trains through
single_node.sh, and multi_node.sh starts a node's ranks from a hostfile."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 synthetic samples = 8 steps of 8."""
    root = tmp_path_factory.mktemp("ds_data")
    subprocess.run(["divico", "prep", "synth", "--out", str(root / "synth"), "--num-samples", "64"], check=True,
                   capture_output=True)
    subprocess.run(["divico", "prep", "shard", "--data", str(root / "synth/llava_v1_5_mix665k.json"),
                    "--image-root", str(root / "synth/images"), "--out", str(root / "shards"), "--workers", "1"],
                   check=True, capture_output=True)
    return root / "shards"


def test_launch_local_trains_through_the_deepspeed_launcher(tmp_path: Path, tiny_llava_dir: Path,
                                                            shards: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(textwrap.dedent(f"""\
        root: {tmp_path}/run
        cluster: {{env: {{DS_ACCELERATOR: cpu, OMP_NUM_THREADS: "1"}}}}
        stages:
          divico:
            sweep: {{tau: [0.1111]}}
            train:
              config: [configs/debug/tiny.yaml]
              overrides: [model.base={tiny_llava_dir}, data.shards={shards}, "divico.tau=${{tau}}"]
              output_dir: ${{root}}/${{run_name:divico,${{tau}}}}
            resources: {{tasks_per_node: 2}}
          report:
            after: [divico]
            command: cp ${{root}}/divico-tau111/train_summary.json ${{root}}/report.json
            outputs: ["${{root}}/report.json"]
        """))
    args = ["divico", "launch", "local", "--config", str(pipeline)]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "report.json").read_text())["steps"] == 8
    rank_logs = sorted((run / "logs/divico/tau111").glob("*_rank*.log"))
    assert [p.name.split("_")[-1] for p in rank_logs] == ["rank0.log", "rank1.log"]
    assert "checkpoint written" in rank_logs[0].read_text()
    assert list((run / "tensorboard/divico-tau111").glob("events.out.tfevents.*"))
    assert f"TensorBoard: tensorboard --logdir {run / 'tensorboard'}" in result.stdout

    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("outputs complete, skipped") == 2, again.stdout


def test_multi_node_script_from_a_hostfile(tmp_path: Path, tiny_llava_dir: Path, shards: Path) -> None:
    """One node of a hostfile, started the no-ssh way (--node-rank), as each node of a cluster would be."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one node, two CPU ranks\nlocalhost slots=2\n")
    output_dir = tmp_path / "run"
    result = subprocess.run(
        [str(REPO / "launch/deepspeed/multi_node.sh"), "--hostfile", str(hostfile), "--node-rank", "0",
         "--logs", str(tmp_path / "logs"), "--", "--config", "configs/debug/tiny.yaml",
         f"model.base={tiny_llava_dir}", f"data.shards={shards}", f"train.output_dir={output_dir}",
         "train.max_steps=2", "train.save_every_steps=2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": "29731"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((output_dir / "checkpoints/step-00000002/trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert len(list((tmp_path / "logs").glob("*_rank*.log"))) == 2
