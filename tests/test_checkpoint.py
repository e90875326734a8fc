"""Checkpoint bookkeeping that needs no engine: which directories count, RNG round trips,
checksum records and what `verify` finds, pruning."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from train_helpers import run

from pipeline.contract import CHECKSUMS_FILE
from pipeline.train.checkpoint import (
    CheckpointError,
    Problem,
    TrainerState,
    _prune,
    complete_checkpoints,
    latest_checkpoint,
    newest_intact,
    read_state,
    record_checksums,
    rng_state,
    set_rng_state,
    verify,
)


def make(root, name, step):
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps(
        {"step": step, "samples_per_rank": step * 4, "world_size": 2, "total_steps": 100}))
    return path


def test_only_complete_checkpoints_count_newest_last(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    make(tmp_path, "step-00000010", 10)
    make(tmp_path, "step-00000002", 2)
    make(tmp_path, "step-00000020.tmp", 20)  # a save that crashed: never counted
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000010"]
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    assert read_state(latest_checkpoint(tmp_path)) == TrainerState(step=10, samples_per_rank=40, world_size=2,
                                                                   total_steps=100)


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state()))  # what the checkpoint file holds
    expected = (random.random(), np.random.rand(3), torch.rand(3), torch.randn(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(saved)
    got = (random.random(), np.random.rand(3), torch.rand(3), torch.randn(2))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


def make_recorded(root, name, step):
    """A checkpoint with a few files in subfolders, as the engine and the ranks write them, and its record."""
    path = make(root, name, step)
    (path / "engine").mkdir()
    (path / "engine" / "optim_states.pt").write_bytes(bytes(range(256)) * 64)
    (path / "rng").mkdir()
    (path / "rng" / "rank-00000.json").write_text('{"torch": [1, 2, 3]}')
    (path / "trainables.safetensors").write_bytes(b"\x01" * 1000)
    record_checksums(path)
    return path


def test_verify_names_each_missing_resized_changed_and_stray_file(tmp_path):
    ckpt = make_recorded(tmp_path, "step-00000004", 4)
    assert set(json.loads((ckpt / CHECKSUMS_FILE).read_text())["files"]) == {
        "engine/optim_states.pt", "rng/rank-00000.json", "trainables.safetensors", "trainer_state.json"}
    result = verify(ckpt)
    assert result.intact and result.recorded and str(result) == f"{ckpt}: OK"

    (ckpt / "rng" / "rank-00000.json").unlink()
    (ckpt / "trainables.safetensors").write_bytes(b"\x01" * 600)  # truncated
    data = bytearray((ckpt / "engine" / "optim_states.pt").read_bytes())
    data[5000] ^= 1  # one flipped bit, same size
    (ckpt / "engine" / "optim_states.pt").write_bytes(bytes(data))
    (ckpt / "engine" / "stray.pt").write_bytes(b"x")
    result = verify(ckpt)
    assert not result.intact
    assert sorted(result.problems, key=lambda p: p.file) == [
        Problem("engine/optim_states.pt", "sha256 differs from the record"),
        Problem("engine/stray.pt", "not in the record"),
        Problem("rng/rank-00000.json", "missing"),
        Problem("trainables.safetensors", "600 bytes, recorded 1000"),
    ]
    assert str(result).startswith(f"{ckpt}: DAMAGED: ")
    # A scope checks only the files named (a folder with a trailing /): what export reads.
    assert verify(ckpt, ("rng/", "trainer_state.json")).problems == [Problem("rng/rank-00000.json", "missing")]
    assert verify(ckpt, ("trainer_state.json",)).intact


def test_a_checkpoint_without_record_is_not_verified_and_an_unreadable_record_is_damage(tmp_path):
    old = make(tmp_path, "step-00000002", 2)  # written by a version that recorded no checksums
    result = verify(old)
    assert result.intact and not result.recorded
    assert "not verified: no checksums.json" in str(result)
    (old / CHECKSUMS_FILE).write_text('{"files": {"trainer_st')  # truncated
    result = verify(old)
    assert [p.file for p in result.problems] == [CHECKSUMS_FILE] and "unreadable" in result.problems[0].reason


def test_newest_intact_skips_damaged_checkpoints_saying_why(tmp_path, caplog):
    assert newest_intact(tmp_path) is None
    older = make_recorded(tmp_path, "step-00000002", 2)
    newest = make_recorded(tmp_path, "step-00000004", 4)
    assert newest_intact(tmp_path) == newest
    (newest / "trainables.safetensors").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert newest_intact(tmp_path) == older
    assert f"skipping {newest}: DAMAGED: trainables.safetensors: 0 bytes, recorded 1000" in caplog.text
    (older / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints is intact"):
        newest_intact(tmp_path)


def test_prune_keeps_the_newest_up_to_the_saved_step_and_drops_newer_ones(tmp_path):
    for step in (2, 4, 6, 8):
        make(tmp_path, f"step-{step:08d}", step)
    # Resumed from step 4 (step 8 was damaged) and saved step 6 again: 8 would otherwise push out 4.
    _prune(tmp_path, keep_last=2, step=6)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]


def test_checkpoint_verify_command_prints_a_line_per_checkpoint_and_exits_0_1_2(tmp_path):
    older = make_recorded(tmp_path, "step-00000002", 2)
    newest = make_recorded(tmp_path, "step-00000004", 4)
    result = run(["checkpoint", "verify", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{older}: OK", f"{newest}: OK"]

    (newest / "engine" / "optim_states.pt").write_bytes(b"")
    result = run(["checkpoint", "verify", str(tmp_path)])
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"{older}: OK", f"{newest}: DAMAGED: engine/optim_states.pt: 0 bytes, "
                                                            "recorded 16384"]
    assert run(["checkpoint", "verify", str(older)]).returncode == 0  # one checkpoint

    result = run(["checkpoint", "verify", str(tmp_path / "checkpoints")])  # neither a checkpoint nor a run
    assert result.returncode == 2 and "neither a checkpoint nor a run's output dir" in result.stderr
