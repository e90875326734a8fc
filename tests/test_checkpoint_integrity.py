"""Damaged checkpoints through `divico train`: `--resume auto` skips the newest checkpoint when
any one of its files is damaged and still ends with the weights of an uninterrupted run;
`--resume DIR` of a damaged one, or a run with no intact one, exits 1 naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import final_weights, run, sample_log, train_args

from pipeline.contract import EXIT_FAILURE, TRAINABLES_FILE, TRAINER_STATE_FILE
from pipeline.train.checkpoint import complete_checkpoints, read_state

pytestmark = pytest.mark.slow

NUM_SAMPLES = 32  # global batch 8 -> 4 optimizer steps; a checkpoint after steps 2 and 4


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def change_step(path: Path) -> None:  # valid JSON of the same size that would resume at the wrong step
    text = path.read_text()
    assert '"step": 4,' in text
    path.write_text(text.replace('"step": 4,', '"step": 3,'))


# Every kind of file a checkpoint holds, and a way it gets damaged.
DAMAGE = {
    "engine/mp_rank_00_model_states.pt": truncate,
    "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt": flip_a_bit,
    TRAINABLES_FILE: truncate,
    "adapter/adapter_model.safetensors": flip_a_bit,
    TRAINER_STATE_FILE: change_step,
    "rng/rank-00000.json": truncate,
}


@pytest.fixture(scope="module")
def uninterrupted(tiny_llava_dir, make_shard_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """One epoch without a stop, checkpointed after steps 2 and 4; and the arguments that trained it."""
    out = tmp_path_factory.mktemp("uninterrupted")
    args = train_args(tiny_llava_dir, make_shard_dir(NUM_SAMPLES, 1), out, "train.save_every_steps=2")
    result = run(args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002", "step-00000004"]
    return out, args


def copy_run(source: Path, target: Path, args: list[str]) -> list[str]:
    shutil.copytree(source, target)
    return [arg.replace(str(source), str(target)) for arg in args]


@pytest.mark.parametrize("damaged", sorted(DAMAGE))
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_ends_as_the_uninterrupted_run(
        uninterrupted, tmp_path, damaged):
    reference_dir, reference_args = uninterrupted
    out = tmp_path / "run"
    args = copy_run(reference_dir, out, reference_args)
    newest, older = out / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000002"
    DAMAGE[damaged](newest / damaged)

    resumed = run([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"skipping {newest}: DAMAGED: {damaged}: " in resumed.stderr
    assert f"resuming from {older} at step 2/4" in resumed.stderr
    assert read_state(newest).step == 4  # rewritten
    reference, weights = final_weights(reference_dir), final_weights(out)
    assert reference.keys() == weights.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert sample_log(out) == sample_log(reference_dir)
    assert run(["checkpoint", "verify", str(out)]).returncode == 0


def test_resume_of_a_damaged_checkpoint_or_a_run_with_none_intact_exits_1_naming_the_file(uninterrupted, tmp_path):
    reference_dir, reference_args = uninterrupted
    out = tmp_path / "run"
    args = copy_run(reference_dir, out, reference_args)
    newest, older = out / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000002"
    truncate(newest / TRAINABLES_FILE)

    named = run([*args, "--resume", str(newest)])
    assert named.returncode == EXIT_FAILURE
    assert f"{newest}: DAMAGED: {TRAINABLES_FILE}: " in named.stderr
    assert "Loading weights" not in named.stderr  # refused before the model loads

    (older / "rng" / "rank-00000.json").unlink()
    auto = run([*args, "--resume", "auto"])
    assert auto.returncode == EXIT_FAILURE
    assert f"skipping {older}: DAMAGED: rng/rank-00000.json: missing" in auto.stderr
    assert "none of the 2 checkpoints is intact" in auto.stderr
